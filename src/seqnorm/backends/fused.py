"""The fused CPU backend: Numba kernels behind ``torch.library`` custom ops.

Each kernel family is one forward and one backward custom op
(``seqnorm::rowwise_fwd`` / ``seqnorm::rowwise_bwd``, ``featurewise_*``,
``power_*``, ``groupwise_*``) with a fake (meta) implementation, tied together by
``register_autograd`` (:mod:`.custom_ops`), so modules, autograd and
``torch.compile`` see ordinary torch ops. Tensors reach the kernels as
zero-copy NumPy views; inputs are made contiguous first. Numba's thread count
follows ``torch.get_num_threads()``.

Only CPU float32, float64, bfloat16 and float16 tensors come here (the chooser
registered at the end hands everything else to the torch backend). The 16-bit
types reach the kernels as their raw bits; they read and write them and compute in float32
(:mod:`.kernels.rows`). float16 needs hardware conversions (F16C on x86-64):
without them it is not taken here, and ``functional`` casts it to float32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numba
import numpy as np
import torch
from torch import Tensor

from ..kernels import NCHUNK, featurewise, groupwise, rows, rowwise
from . import backend_named, register_backend
from .custom_ops import BackwardOp, ForwardOp, power_autograd, eager_function, needs_grad

__all__ = ["FusedBackend", "supports"]


def supports(x: Tensor) -> bool:
    """Whether the fused kernels can run ``x``."""
    return x.device.type == "cpu" and x.dtype in DTYPES


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _a(t: Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a contiguous CPU tensor (bool → uint8; bfloat16 →
    its uint16 bits, float16 → its int16 bits, which the kernels widen to
    float32 row by row)."""
    t = t.detach()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    elif t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    return t.numpy()


#: The 16-bit dtypes the kernels read and write themselves.
LOW_PRECISION = (torch.bfloat16,) + ((torch.float16,) if rows.HALF_NATIVE else ())
#: Every dtype the kernels take.
DTYPES = (torch.float32, torch.float64) + LOW_PRECISION

# The dtype the kernels compute in, per input dtype: the 16-bit types are
# computed in float32 (statistics, accumulation, parameters), read and written
# as themselves.
_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.float32,
             torch.float16: np.float32}
_STORAGE = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.int16,
            torch.float16: np.int16}


_16BIT = (torch.bfloat16, torch.float16)


def _stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the statistics and parameter gradients the ops return for ``x``."""
    return torch.float32 if x.dtype in _16BIT else x.dtype


def _k(x: Tensor, eps: float, inv: float) -> np.ndarray:
    """The kernels' constants in the compute dtype: [eps, inv, 1, 0]."""
    return np.array([eps, inv, 1.0, 0.0], dtype=_NP_DTYPE[x.dtype])


def _stats(shape, x: Tensor) -> Tuple[np.ndarray, Tensor]:
    """A new array in the compute dtype, and the tensor sharing its memory."""
    a = np.empty(shape, dtype=_NP_DTYPE[x.dtype])
    return a, torch.from_numpy(a)


def _empty(shape, x: Tensor) -> Tuple[np.ndarray, Tensor]:
    """A new array for an output in ``x``'s dtype (as the kernels see it) and the
    tensor sharing its memory (cheaper than torch.empty)."""
    a = np.empty(shape, dtype=_STORAGE[x.dtype])
    t = torch.from_numpy(a)
    if x.dtype == torch.bfloat16:
        return a.view(np.uint16), t.view(torch.bfloat16)
    if x.dtype == torch.float16:
        return a, t.view(torch.float16)
    return a, t


def _rows_or_none(t: Optional[Tensor], like: Tensor) -> np.ndarray:
    """``t`` as the kernels see it, or a ``(0, D)`` array of ``like``'s kind for "none"."""
    if t is None:
        return np.empty((0, like.shape[1]), dtype=_a(like[:0]).dtype)
    return _a(t.contiguous())


def _pad(pad: Optional[Tensor], rows: int) -> np.ndarray:
    return np.zeros(rows, np.uint8) if pad is None else _a(pad.contiguous())


def _param(p: Optional[Tensor], d: int, fill: float, like: Tensor) -> np.ndarray:
    """A per-feature tensor (weight, bias, running statistic) in the compute dtype."""
    if p is None:
        return np.full(d, fill, dtype=_NP_DTYPE[like.dtype])
    return _a(p.to(_stat_dtype(like)).contiguous())


def _sum_chunks(part: np.ndarray) -> np.ndarray:
    """Add the per-chunk partials in chunk order (deterministic for any thread count)."""
    # NumPy reduces axis 0 of a C-contiguous array row after row, in order.
    return part.sum(axis=0, dtype=np.float64)


# ---------------------------------------------------------------------------
# Row-wise: LayerNorm / RMSNorm (+ residual Add)
# ---------------------------------------------------------------------------


def _rowwise_fwd_impl(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                      pad: Optional[Tensor], eps: float, center: bool
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, s, shift, delta, rstd)``; ``s = x + residual`` (empty without
    residual); the per-row statistics are in the compute dtype."""
    return _rowwise_forward(x, residual, weight, bias, pad, eps, center, keep_sum=True)


def _rowwise_forward(x, residual, weight, bias, pad, eps, center, keep_sum):
    """:func:`_rowwise_fwd_impl`, and with ``keep_sum=False`` the inference-only
    post-norm Add & Norm: the sum is normalized but not written out (``s`` comes
    back empty), which saves one of the four x-sized passes of the forward."""
    _threads()
    x = x.contiguous()
    rows, d = x.shape
    y_a, y = _empty((rows, d), x)
    (sh_a, shift), (de_a, delta), (rs_a, rstd) = _stats(rows, x), _stats(rows, x), _stats(rows, x)
    if residual is None or not keep_sum:
        s_a, s = _rows_or_none(None, x), x.new_empty(0)
    else:
        s_a, s = _empty((rows, d), x)
    rowwise.forward(_a(x), _rows_or_none(residual, x), _param(weight, d, 1.0, x), _param(bias, d, 0.0, x),
                    _pad(pad, rows), _k(x, eps, 1.0 / max(d, 1)), center, y_a, s_a, sh_a, de_a, rs_a)
    return y, s, shift, delta, rstd


def _rowwise_fwd_fake(x, residual, weight, bias, pad, eps, center):
    rows, sd = x.shape[0], _stat_dtype(x)
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return (torch.empty_like(x), s, x.new_empty(rows, dtype=sd), x.new_empty(rows, dtype=sd),
            x.new_empty(rows, dtype=sd))


def _rowwise_bwd_impl(dy: Tensor, src: Tensor, src2: Optional[Tensor], ds: Optional[Tensor],
                      weight: Optional[Tensor], pad: Optional[Tensor], shift: Tensor, delta: Tensor, rstd: Tensor,
                      center: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dsrc, dweight, dbias)`` (the parameter grads as if both existed).

    ``src`` is what the forward normalized, or with ``src2`` (16-bit with the
    residual Add) its two addends, whose exact sum the kernel re-forms. ``ds``,
    the gradient of the returned sum, is added to ``dsrc`` (None: nothing to add)."""
    _threads()
    dy, src = dy.contiguous(), src.contiguous()
    rows, d = src.shape
    dx_a, dx = _empty((rows, d), src)
    dw_part, db_part = _stats((NCHUNK, d), src)[0], _stats((NCHUNK, d), src)[0]
    rowwise.backward(_a(dy), _a(src), _rows_or_none(src2, src), _rows_or_none(ds, src), _param(weight, d, 1.0, src),
                     _pad(pad, rows), _a(shift), _a(delta), _a(rstd), _k(src, 0.0, 1.0 / max(d, 1)), center,
                     dx_a, dw_part, db_part)
    sd = _stat_dtype(src)
    return dx, torch.from_numpy(_sum_chunks(dw_part)).to(sd), torch.from_numpy(_sum_chunks(db_part)).to(sd)


def _rowwise_bwd_fake(dy, src, src2, ds, weight, pad, shift, delta, rstd, center):
    d, sd = src.shape[1], _stat_dtype(src)
    return torch.empty_like(src), src.new_empty(d, dtype=sd), src.new_empty(d, dtype=sd)


rowwise_bwd = BackwardOp("rowwise_bwd", _rowwise_bwd_impl, _rowwise_bwd_fake)


def _rowwise_setup(ctx, inputs, output):
    x, residual, weight, bias, pad, eps, center = inputs
    _, s, shift, delta, rstd = output
    if x.dtype in _16BIT:  # the rounded s is not what was normalized: keep both addends
        src, src2 = x, residual
    else:
        src, src2 = (x if residual is None else s), None
    ctx.save_for_backward(src, src2, weight, pad, shift, delta, rstd)
    ctx.center = center
    ctx.has_residual, ctx.has_bias = residual is not None, bias is not None


def _rowwise_backward(ctx, dy, ds, _shift, _delta, _rstd):
    src, src2, weight, pad, shift, delta, rstd = ctx.saved_tensors
    if dy is None:  # only the sum s was used downstream
        dy = torch.zeros_like(src)
    ds = ds if ctx.has_residual else None
    dx, dw, db = rowwise_bwd(dy, src, src2, ds, weight, pad, shift, delta, rstd,
                                                       ctx.center)
    dw = dw.reshape(weight.shape) if weight is not None else None
    db = db if ctx.has_bias else None
    return dx, (dx if ctx.has_residual else None), dw, db, None, None, None


rowwise_fwd = ForwardOp("rowwise_fwd", _rowwise_fwd_impl, _rowwise_fwd_fake, _rowwise_setup, _rowwise_backward, 2)


# ---------------------------------------------------------------------------
# Feature-wise: masked BatchNorm
# ---------------------------------------------------------------------------


def _featurewise_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
                    mean: Optional[Tensor], var: Optional[Tensor], eps: float
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, batch_mean, batch_var, count, shift, delta, rstd)``.

    With ``mean``/``var`` (running statistics, eval) those are used and the
    batch statistics are not computed (returned as zeros).
    """
    _threads()
    x = x.contiguous()
    n_rows, d = x.shape
    k = _k(x, eps, 0.0)
    p = _pad(pad, n_rows)
    dtype = _NP_DTYPE[x.dtype]
    if mean is None:
        shift = np.empty(d, dtype)
        delta64 = np.empty(d, np.float64)
        var64 = np.empty(d, np.float64)
        count = int(featurewise.moments(_a(x), p, k, NCHUNK, shift, delta64, var64))
        batch_mean = torch.from_numpy(shift.astype(np.float64) + delta64).to(_stat_dtype(x))
        batch_var = torch.from_numpy(var64).to(_stat_dtype(x))
        delta = delta64.astype(dtype)
        rstd = (1.0 / np.sqrt(var64 + eps)).astype(dtype)
    else:
        count = int(n_rows - p.sum(dtype=np.int64))
        shift = _param(mean, d, 0.0, x)
        delta = np.zeros(d, dtype)
        rstd = (1.0 / np.sqrt(_param(var, d, 1.0, x).astype(np.float64) + eps)).astype(dtype)
        batch_mean = x.new_zeros(d, dtype=_stat_dtype(x))
        batch_var = x.new_zeros(d, dtype=_stat_dtype(x))
    w = _param(weight, d, 1.0, x)
    scale = (rstd * w).astype(dtype)
    y_a, y = _empty((n_rows, d), x)
    featurewise.normalize(_a(x), p, shift, delta, scale, _param(bias, d, 0.0, x), k, y_a)
    return (y, batch_mean, batch_var, torch.tensor(count), torch.from_numpy(shift), torch.from_numpy(delta),
            torch.from_numpy(rstd))


def _featurewise_fwd_fake(x, weight, bias, pad, mean, var, eps):
    d, sd = x.shape[1], _stat_dtype(x)
    return (torch.empty_like(x), x.new_empty(d, dtype=sd), x.new_empty(d, dtype=sd), torch.empty((), dtype=torch.int64),
            x.new_empty(d, dtype=sd), x.new_empty(d, dtype=sd), x.new_empty(d, dtype=sd))


def _featurewise_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], pad: Optional[Tensor], shift: Tensor,
                          delta: Tensor, rstd: Tensor, count: Tensor, batch_stats: bool
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias)``; ``count`` (a 0-d tensor, so that tracing
    never reads data) is the number of real rows."""
    _threads()
    count = int(count)
    dy, x = dy.contiguous(), x.contiguous()
    n_rows, d = x.shape
    k = _k(x, 0.0, 0.0)
    dtype = _NP_DTYPE[x.dtype]
    p = _pad(pad, n_rows)
    dg_part = np.empty((NCHUNK, d), dtype)
    db_part = np.empty((NCHUNK, d), dtype)
    featurewise.grad_sums(_a(dy), _a(x), p, _a(shift), _a(delta), _a(rstd), k, dg_part, db_part)
    dgamma, dbeta = _sum_chunks(dg_part), _sum_chunks(db_part)
    a = _a(rstd).astype(np.float64) * _param(weight, d, 1.0, x)
    if batch_stats and count > 0:
        c1, c2 = a * dbeta / count, a * dgamma / count
    else:
        c1, c2 = np.zeros(d), np.zeros(d)
    dx_a, dx = _empty((n_rows, d), x)
    featurewise.bn_input_grad(_a(dy), _a(x), p, _a(shift), _a(delta), _a(rstd), a.astype(dtype),
                              c1.astype(dtype), c2.astype(dtype), k, dx_a)
    return dx, torch.from_numpy(dgamma).to(_stat_dtype(x)), torch.from_numpy(dbeta).to(_stat_dtype(x))


def _featurewise_bwd_fake(dy, x, weight, pad, shift, delta, rstd, count, batch_stats):
    d, sd = x.shape[1], _stat_dtype(x)
    return torch.empty_like(x), x.new_empty(d, dtype=sd), x.new_empty(d, dtype=sd)


featurewise_bwd = BackwardOp("featurewise_bwd", _featurewise_bwd_impl, _featurewise_bwd_fake)


def _featurewise_setup(ctx, inputs, output):
    x, weight, bias, pad, mean, var, eps = inputs
    _, _, _, count, shift, delta, rstd = output
    ctx.save_for_backward(x, weight, pad, shift, delta, rstd)
    ctx.count, ctx.batch_stats = count, mean is None  # a tensor: int() only in the backward (traceable)
    ctx.has_bias = bias is not None


def _featurewise_backward(ctx, dy, *_):
    x, weight, pad, shift, delta, rstd = ctx.saved_tensors
    if dy is None:
        return (None,) * 7
    dx, dw, db = featurewise_bwd(dy, x, weight, pad, shift, delta, rstd,
                                                               ctx.count, ctx.batch_stats)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None, None, None, None


featurewise_fwd = ForwardOp("featurewise_fwd", _featurewise_fwd_impl, _featurewise_fwd_fake, _featurewise_setup,
                            _featurewise_backward, 1)


# ---------------------------------------------------------------------------
# PowerNorm
# ---------------------------------------------------------------------------


def _power_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
              running_phi: Tensor, running_nu: Optional[Tensor], eps: float, factor: float
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, batch_phi, count, rstd, nu_before)``; ``rstd = 1/√(ψ² + ε)`` of
    the running ψ², ``nu_before`` a copy of ν (empty without one).

    ``factor`` is not read here: the backward moves ν in place with it
    (Algorithm 1's approximate backward), and reads the ν of this forward from
    ``nu_before`` — a saved output, so that torch.compile's backward graph reads
    it too (a buffer it only closes over is not what it reads).
    """
    _threads()
    x = x.contiguous()
    n_rows, d = x.shape
    dtype = _NP_DTYPE[x.dtype]
    k = _k(x, eps, 0.0)
    rstd = (1.0 / np.sqrt(_param(running_phi, d, 1.0, x).astype(np.float64) + eps)).astype(dtype)
    scale = (rstd * _param(weight, d, 1.0, x)).astype(dtype)
    y_a, y = _empty((n_rows, d), x)
    n_part = np.zeros(NCHUNK, np.int64)
    q_part = np.empty((NCHUNK, d), dtype)
    featurewise.power_forward(_a(x), _pad(pad, n_rows), scale, _param(bias, d, 0.0, x), k, y_a, n_part, q_part)
    count = int(n_part.sum())
    phi = _sum_chunks(q_part) / max(count, 1)
    return (y, torch.from_numpy(phi).to(_stat_dtype(x)), torch.tensor(count), torch.from_numpy(rstd),
            _nu_before(running_nu, x))


def _nu_before(running_nu: Optional[Tensor], x: Tensor) -> Tensor:
    return x.new_empty(0) if running_nu is None else running_nu.detach().clone()


def _power_fwd_fake(x, weight, bias, pad, running_phi, running_nu, eps, factor):
    d, sd = x.shape[1], _stat_dtype(x)
    return (torch.empty_like(x), x.new_empty(d, dtype=sd), torch.empty((), dtype=torch.int64), x.new_empty(d, dtype=sd),
            x.new_empty(0) if running_nu is None else torch.empty_like(running_nu))


def _power_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], pad: Optional[Tensor], rstd: Tensor,
              nu: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias)``; ``nu`` (ν, read only) may be None (= 0)."""
    _threads()
    dy, x = dy.contiguous(), x.contiguous()
    n_rows, d = x.shape
    dtype = _NP_DTYPE[x.dtype]
    nu_np = _param(nu, d, 0.0, x)
    dg_part = np.empty((NCHUNK, d), dtype)
    db_part = np.empty((NCHUNK, d), dtype)
    dx_a, dx = _empty((n_rows, d), x)
    featurewise.power_backward(_a(dy), _a(x), _pad(pad, n_rows), _param(weight, d, 1.0, x), _a(rstd), nu_np,
                               _k(x, 0.0, 0.0), dx_a, dg_part, db_part)
    sd = _stat_dtype(x)
    return dx, torch.from_numpy(_sum_chunks(dg_part)).to(sd), torch.from_numpy(_sum_chunks(db_part)).to(sd)


def _power_bwd_fake(dy, x, weight, pad, rstd, nu):
    d, sd = x.shape[1], _stat_dtype(x)
    return torch.empty_like(x), x.new_empty(d, dtype=sd), x.new_empty(d, dtype=sd)


power_bwd = BackwardOp("power_bwd", _power_bwd_impl, _power_bwd_fake)


_power_setup, _power_backward = power_autograd(power_bwd)


power_fwd = ForwardOp("power_fwd", _power_fwd_impl, _power_fwd_fake, _power_setup, _power_backward, 1)


# ---------------------------------------------------------------------------
# Group-wise: masked GroupNorm / InstanceNorm
# ---------------------------------------------------------------------------


def _steps(pad: Optional[Tensor], b: int, t: int) -> np.ndarray:
    """Real steps of each sequence, ``(B,)`` int64."""
    if pad is None:
        return np.full(b, t, np.int64)
    return (t - pad.sum(1, dtype=torch.int64)).numpy()


def _groupwise_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
                        eps: float, groups: int
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x (B, C, T)`` → ``(y, mean (B, G), var (B, G), steps (B,), shift, delta, rstd)``;
    the last three ``(B·G,)`` in the compute dtype, for the backward."""
    _threads()
    x = x.contiguous()
    b, c, t = x.shape
    y_a, y = _empty((b * c, t), x)
    (sh_a, shift), (de_a, delta), (rs_a, rstd) = (_stats(b * groups, x) for _ in range(3))
    mean64, var64 = np.empty(b * groups), np.empty(b * groups)
    steps = _steps(pad, b, t)
    p = np.zeros((b, t), np.uint8) if pad is None else _a(pad.contiguous())
    groupwise.forward(_a(x).reshape(b * c, t), p, _param(weight, c, 1.0, x), _param(bias, c, 0.0, x), groups,
                      steps, _k(x, eps, 0.0), y_a, sh_a, de_a, rs_a, mean64, var64)
    sd = _stat_dtype(x)
    return (y.reshape(b, c, t), torch.from_numpy(mean64).to(sd).reshape(b, groups),
            torch.from_numpy(var64).to(sd).reshape(b, groups), torch.from_numpy(steps), shift, delta, rstd)


def _groupwise_fwd_fake(x, weight, bias, pad, eps, groups):
    b, sd = x.shape[0], _stat_dtype(x)
    stats = [x.new_empty(b * groups, dtype=sd) for _ in range(3)]
    return (torch.empty_like(x), x.new_empty(b, groups, dtype=sd), x.new_empty(b, groups, dtype=sd),
            torch.empty(b, dtype=torch.int64), *stats)


def _groupwise_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], pad: Optional[Tensor], steps: Tensor,
                        shift: Tensor, delta: Tensor, rstd: Tensor, groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias)`` (the parameter grads as if both existed)."""
    _threads()
    dy, x = dy.contiguous(), x.contiguous()
    b, c, t = x.shape
    dtype = _NP_DTYPE[x.dtype]
    dx_a, dx = _empty((b * c, t), x)
    dw_part, db_part = np.empty((b, c), dtype), np.empty((b, c), dtype)
    p = np.zeros((b, t), np.uint8) if pad is None else _a(pad.contiguous())
    groupwise.backward(_a(dy).reshape(b * c, t), _a(x).reshape(b * c, t), p, _param(weight, c, 1.0, x), groups,
                       _a(steps), _a(shift), _a(delta), _a(rstd), _k(x, 0.0, 0.0), dx_a, dw_part, db_part)
    sd = _stat_dtype(x)
    return dx.reshape(b, c, t), torch.from_numpy(_sum_chunks(dw_part)).to(sd), \
        torch.from_numpy(_sum_chunks(db_part)).to(sd)


def _groupwise_bwd_fake(dy, x, weight, pad, steps, shift, delta, rstd, groups):
    c, sd = x.shape[1], _stat_dtype(x)
    return torch.empty_like(x), x.new_empty(c, dtype=sd), x.new_empty(c, dtype=sd)


groupwise_bwd = BackwardOp("groupwise_bwd", _groupwise_bwd_impl, _groupwise_bwd_fake)


def _groupwise_setup(ctx, inputs, output):
    x, weight, bias, pad, eps, groups = inputs
    _, _, _, steps, shift, delta, rstd = output
    ctx.save_for_backward(x, weight, pad, steps, shift, delta, rstd)
    ctx.groups, ctx.has_bias = groups, bias is not None


def _groupwise_backward(ctx, dy, *_):
    x, weight, pad, steps, shift, delta, rstd = ctx.saved_tensors
    if dy is None:
        return (None,) * 6
    dx, dw, db = groupwise_bwd(dy, x, weight, pad, steps, shift, delta, rstd, ctx.groups)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None, None, None


groupwise_fwd = ForwardOp("groupwise_fwd", _groupwise_fwd_impl, _groupwise_fwd_fake, _groupwise_setup,
                          _groupwise_backward, 1)


def _add_norm_16bit_no_sum(x, residual, weight, bias, pad, eps, center):
    """Post-norm Add & Norm of a 16-bit input, with autograd: the backward re-forms
    the float32 sum from the two addends (:func:`_rowwise_setup`), so the rounded
    sum is needed by nobody and is not written (one 16-bit pass fewer)."""
    return _rowwise_forward(x, residual, weight, bias, pad, eps, center, keep_sum=False)


_AddNorm16BitFunction = eager_function("add_norm_16bit_no_sum", _add_norm_16bit_no_sum, _rowwise_setup,
                                       _rowwise_backward, 2)


class FusedBackend:
    """Numba kernels behind custom ops. See :mod:`seqnorm.backends` for the contract."""

    name = "fused"
    reduces = False
    #: dtypes every op here takes as it is (read and written in that dtype,
    #: computed in float32); functional casts any other low-precision input
    native_low_precision = LOW_PRECISION
    #: every dtype the ops here take (the others go to torch)
    dtypes = DTYPES

    @staticmethod
    def rowwise_norm(x, weight, bias, eps, pad, center):
        return rowwise_fwd(x, None, weight, bias, pad, float(eps), center)[0]

    @staticmethod
    def add_rowwise_norm(x, residual, weight, bias, eps, pad, center, need_sum=True):
        args = (x, residual, weight, bias, pad, float(eps), center)
        if not need_sum and not torch.compiler.is_compiling():   # post-norm, eager: s is never written
            if not needs_grad(args):
                return _rowwise_forward(*args, keep_sum=False)[0], None           # inference
            if x.dtype in _16BIT:
                return _AddNorm16BitFunction.apply(*args)[0], None                # backward reads x and residual
        y, s, *_ = rowwise_fwd(*args)
        return y, s

    @staticmethod
    def featurewise_norm(x, weight, bias, eps, pad, mean=None, var=None, reduce=None):
        y, bm, bv, count, *_ = featurewise_fwd(x, weight, bias, pad, mean, var, float(eps))
        return y, bm, bv, count

    @staticmethod
    def power_norm(x, weight, bias, eps, pad, running_phi, running_nu, factor, reduce=None):
        y, phi, count, *_ = power_fwd(x, weight, bias, pad, running_phi, running_nu, float(eps), float(factor))
        return y, phi, count

    @staticmethod
    def groupwise_norm(x, weight, bias, eps, pad, groups):
        y, mean, var, steps, *_ = groupwise_fwd(x, weight, bias, pad, float(eps), int(groups))
        return y, mean, var, steps


register_backend("fused", lambda x: FusedBackend if supports(x) else backend_named("torch", x))
