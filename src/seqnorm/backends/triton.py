"""The triton backend: the kernels of :mod:`.triton_kernels` behind autograd.

It runs CUDA tensors of float32, bfloat16 and float16 (read and written as
they are, computed in float32) with up to 65,536 features per row; the chooser
hands anything else to the torch backend. With ``TRITON_INTERPRET=1`` Triton
runs the same kernels on CPU tensors (slowly): that is how the test suite
checks them without a GPU — ``seqnorm.use_backend("triton")`` on CPU tensors
is then this backend, and ``"auto"`` keeps CPU tensors on the fused kernels.

See :mod:`seqnorm.backends` for the contract. A padded row is never read;
parameter gradients and feature statistics are reduced from per-program
partials in a fixed order (the same bits on every run).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton

from ..running import nu_step, update_running_nu
from . import backend_named, register_backend
from .triton_kernels import featurewise as fk
from .triton_kernels import rowwise as rk

__all__ = ["TritonBackend", "supports", "MAX_FEATURES"]

Tensor = torch.Tensor

#: the longest row the row-wise kernels hold in registers
MAX_FEATURES = 1 << 16
#: the dtypes the kernels read and write
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(x: Tensor) -> bool:
    """Whether the kernels run ``x (rows, D)``."""
    on_device = x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())
    return on_device and x.dtype in DTYPES and x.shape[-1] <= MAX_FEATURES


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t (R, D)`` with unit feature stride (any row stride is read as it is)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _pad_bits(pad: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.uint8) if pad is None else pad.contiguous().view(torch.uint8)


def _f32(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A per-feature tensor as contiguous float32 (an empty stand-in for None)."""
    return like.new_empty(0, dtype=torch.float32) if t is None else t.detach().float().contiguous()


def _programs(device: torch.device) -> int:
    """How many programs share the rows of a reduction (a fixed number per device,
    so that the partition — and the bits — are the same on every run)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _block_d(d: int) -> Tuple[int, int]:
    block = triton.next_power_of_2(max(d, 1))
    return block, min(max(block // 256, 1), 16)


# ---------------------------------------------------------------------------
# Row-wise
# ---------------------------------------------------------------------------


def rowwise_forward(x, residual, weight, bias, pad, eps, center, write_sum):
    """``(y, s, shift, delta, rstd)``; ``s`` is empty unless ``write_sum``."""
    x, residual = _rows(x), _rows(residual)
    rows, d = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if write_sum else x.new_empty(0)
    shift, delta, rstd = (x.new_empty(rows, dtype=torch.float32) for _ in range(3))
    if rows and d:
        block, warps = _block_d(d)
        res = residual if residual is not None else x
        rk.rowwise_fwd[(rows,)](
            x, res, y, s if write_sum else x, _f32(weight, x), _f32(bias, x), _pad_bits(pad, x), shift, delta, rstd,
            x.stride(0), res.stride(0), y.stride(0), s.stride(0) if write_sum else 0, d, float(eps),
            HAS_RES=residual is not None, WRITE_S=write_sum, HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_PAD=pad is not None, CENTER=center, BLOCK_D=block, num_warps=warps)
    else:
        shift.zero_(), delta.zero_(), rstd.zero_(), y.zero_()
        if write_sum:
            s.copy_(x if residual is None else (x.float() + residual.float()).to(x.dtype))
    return y, s, shift, delta, rstd


def rowwise_backward(dy, x, residual, ds, weight, pad, shift, delta, rstd, center):
    """``(dx, dweight, dbias)``, the parameter gradients as float32 sums."""
    dy, x, residual, ds = _rows(dy), _rows(x), _rows(residual), _rows(ds)
    rows, d = x.shape
    dx = torch.empty_like(x)
    programs = max(1, min(rows, _programs(x.device)))
    per = triton.cdiv(max(rows, 1), programs)
    programs = triton.cdiv(max(rows, 1), per)
    dw_part = x.new_zeros((programs, d), dtype=torch.float32)
    db_part = x.new_zeros((programs, d), dtype=torch.float32)
    if rows and d:
        block, warps = _block_d(d)
        res = residual if residual is not None else x
        dsr = ds if ds is not None else x
        rk.rowwise_bwd[(programs,)](
            dy, x, res, dsr, dx, _f32(weight, x), _pad_bits(pad, x), shift, delta, rstd, dw_part, db_part,
            dy.stride(0), x.stride(0), res.stride(0), dsr.stride(0), dx.stride(0), rows, d, per,
            HAS_RES=residual is not None, HAS_DS=ds is not None, HAS_W=weight is not None,
            HAS_PAD=pad is not None, CENTER=center, BLOCK_D=block, num_warps=warps)
    elif rows:
        dx.zero_()
    return dx, dw_part.sum(0), db_part.sum(0)


class _Rowwise(torch.autograd.Function):
    """``(y, s)`` of the row-wise norm of ``x (+ residual)``; ``s`` is empty
    unless ``write_sum``. The backward re-forms the float32 sum from both addends."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, pad, eps, center, write_sum):
        ctx.set_materialize_grads(False)
        y, s, shift, delta, rstd = rowwise_forward(x, residual, weight, bias, pad, eps, center, write_sum)
        ctx.save_for_backward(x, residual, weight, pad, shift, delta, rstd)
        ctx.center, ctx.has_bias = center, bias is not None
        if not write_sum:
            ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        x, residual, weight, pad, shift, delta, rstd = ctx.saved_tensors
        if dy is None:  # only the sum was used downstream
            dy = torch.zeros_like(x)
        ds = ds if residual is not None and ds is not None and ds.numel() else None
        dx, dw, db = rowwise_backward(dy, x, residual, ds, weight, pad, shift, delta, rstd, ctx.center)
        return (dx, dx if residual is not None else None, dw.to(weight.dtype).reshape(weight.shape)
                if weight is not None else None, db.to(dw.dtype) if ctx.has_bias else None, None, None, None, None)


# ---------------------------------------------------------------------------
# Feature-wise
# ---------------------------------------------------------------------------

BLOCK_N, BLOCK_F = 32, 64


def _feature_grid(n: int, d: int):
    return triton.cdiv(max(n, 1), BLOCK_N), triton.cdiv(max(d, 1), BLOCK_F)


def first_real_row(x, pad):
    """``K (D,)``: the first real row of ``x`` as float32 (0 without one), found on
    the device (no host synchronization)."""
    if pad is None or x.shape[0] == 0:
        return x[:1].float().sum(0) if x.shape[0] else x.new_zeros(x.shape[1], dtype=torch.float32)
    real = ~pad
    first = torch.argmax(real.to(torch.uint8))
    k = x.index_select(0, first.reshape(1))[0].float()
    return torch.where(real.any(), k, torch.zeros_like(k))


def moments(x, pad):
    """Per-feature ``(K, δ, biased var, count)`` of the real rows (``μ = K + δ``),
    float32, no host synchronization."""
    n, d = x.shape
    p, f = _feature_grid(n, d)
    shift = first_real_row(x, pad).contiguous()
    count_part = x.new_zeros(p, dtype=torch.float32)
    mean_part = x.new_zeros((p, d), dtype=torch.float32)
    m2_part = x.new_zeros((p, d), dtype=torch.float32)
    delta = x.new_zeros(d, dtype=torch.float32)
    var = x.new_zeros(d, dtype=torch.float32)
    count = x.new_zeros((), dtype=torch.float32)
    if n and d:
        fk.moments_partial[(p, f)](x, _pad_bits(pad, x), shift, count_part, mean_part, m2_part, x.stride(0), n, d,
                                   HAS_PAD=pad is not None, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
        fk.moments_merge[(f,)](count_part, mean_part, m2_part, delta, var, count, p, d, BLOCK_F=BLOCK_F)
    return shift, delta, var, count


def normalize(x, pad, shift, delta, scale, bias, sumsq=False):
    """``y = ((x − K) − δ)·scale + bias`` (0 at padding; no shift: ``y = x·scale + bias``);
    with ``sumsq`` also the real rows' ``(Σ x² (D,), count ())`` for PowerNorm's ψ_B²."""
    n, d = x.shape
    p, f = _feature_grid(n, d)
    y = torch.empty_like(x)
    sumsq_part = x.new_zeros((p if sumsq else 0, d), dtype=torch.float32)
    count_part = x.new_zeros(p if sumsq else 0, dtype=torch.float32)
    if n and d:
        fk.normalize[(p, f)](x, _pad_bits(pad, x), _f32(shift, x), _f32(delta, x), scale, _f32(bias, x), y,
                             sumsq_part, count_part, x.stride(0), y.stride(0), n, d, HAS_PAD=pad is not None,
                             HAS_MEAN=shift is not None, HAS_B=bias is not None, SUMSQ=sumsq,
                             BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    elif n:
        y.zero_()
    return y, sumsq_part.sum(0), count_part.sum()


class _Featurewise(torch.autograd.Function):
    """Masked BatchNorm; with ``mean``/``var`` given (eval) those are used and
    the batch statistics are returned as zeros."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, pad, mean, var):
        x = _rows(x)
        use_batch = mean is None
        if use_batch:
            shift, delta, var, count = moments(x, pad)
            batch_mean, batch_var = shift + delta, var
        else:
            shift, delta, var = mean.float().contiguous(), torch.zeros_like(mean, dtype=torch.float32), var.float()
            count = (x.shape[0] - pad.sum() if pad is not None else torch.tensor(x.shape[0], device=x.device)).float()
            batch_mean = batch_var = x.new_zeros(x.shape[1], dtype=torch.float32)
        rstd = torch.rsqrt(var + eps)
        a = rstd * weight.float() if weight is not None else rstd
        y, _, _ = normalize(x, pad, shift, delta, a.contiguous(), bias)
        ctx.save_for_backward(x, weight, pad, shift, delta, rstd, a, count)
        ctx.use_batch, ctx.has_bias = use_batch, bias is not None
        count = count.to(torch.int64)
        ctx.mark_non_differentiable(batch_mean, batch_var, count)
        return y, batch_mean, batch_var, count

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, pad, shift, delta, rstd, a, count = ctx.saved_tensors
        if dy is None:
            return (None,) * 7
        dy = _rows(dy)
        n, d = x.shape
        p, f = _feature_grid(n, d)
        dg_part = x.new_zeros((p, d), dtype=torch.float32)
        db_part = x.new_zeros((p, d), dtype=torch.float32)
        if n and d:
            fk.grad_partial[(p, f)](dy, x, _pad_bits(pad, x), shift, delta, rstd, dg_part, db_part, dy.stride(0),
                                    x.stride(0), n, d, HAS_PAD=pad is not None, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
        dgamma, dbeta = dg_part.sum(0), db_part.sum(0)
        if ctx.use_batch:
            inv_n = 1.0 / count.clamp_min(1)
            c1, c2 = a * dbeta * inv_n, a * dgamma * inv_n
        else:
            c1 = c2 = torch.zeros_like(a)
        dx = torch.empty_like(x)
        if n and d:
            fk.bn_input_grad[(p, f)](dy, x, _pad_bits(pad, x), shift, delta, rstd, a, c1.contiguous(),
                                     c2.contiguous(), dx, dy.stride(0), x.stride(0), dx.stride(0), n, d,
                                     HAS_PAD=pad is not None, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
        elif n:
            dx.zero_()
        return (dx, dgamma.to(weight.dtype) if weight is not None else None,
                dbeta.to(a.dtype) if ctx.has_bias else None, None, None, None, None)


class _Power(torch.autograd.Function):
    """PowerNorm: divide by the running ψ²; Algorithm 1's backward moves ν."""

    @staticmethod
    def forward(ctx, x, weight, bias, pad, running_phi, running_nu, eps, factor):
        x = _rows(x)
        rstd = torch.rsqrt(running_phi.detach().float() + eps)
        a = rstd * weight.float() if weight is not None else rstd
        y, sumsq, count = normalize(x, pad, None, None, a.contiguous(), bias, sumsq=True)
        phi = sumsq / count.clamp_min(1)
        ctx.save_for_backward(x, weight, pad, rstd, phi, count)
        ctx.nu, ctx.factor, ctx.has_bias = running_nu, factor, bias is not None
        count = count.to(torch.int64)
        ctx.mark_non_differentiable(phi, count)
        return y, phi, count

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, pad, rstd, phi, count = ctx.saved_tensors
        if dy is None:
            return (None,) * 8
        dy = _rows(dy)
        n, d = x.shape
        p, f = _feature_grid(n, d)
        nu = ctx.nu
        w = weight.float() if weight is not None else torch.ones_like(rstd)
        dg_part = x.new_zeros((p, d), dtype=torch.float32)
        db_part = x.new_zeros((p, d), dtype=torch.float32)
        dx = torch.empty_like(x)
        if n and d:
            fk.power_input_grad[(p, f)](dy, x, _pad_bits(pad, x), w.contiguous(), rstd,
                                        _f32(nu, x) if nu is not None else torch.zeros_like(rstd), dx,
                                        dg_part, db_part, dy.stride(0), x.stride(0), dx.stride(0), n, d,
                                        HAS_PAD=pad is not None, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
        elif n:
            dx.zero_()
        dgamma, dbeta = dg_part.sum(0), db_part.sum(0)
        if nu is not None:
            with torch.no_grad():
                gamma = rstd * rstd * phi                              # mean of x̂² over real rows
                lam = w * dgamma / count.clamp_min(1)                  # mean of x̂ ⊙ (w ⊙ dy)
                update_running_nu(nu, nu_step(nu, gamma, lam, ctx.factor), count > 0)
        return (dx, dgamma.to(weight.dtype) if weight is not None else None,
                dbeta if ctx.has_bias else None, None, None, None, None, None)


class TritonBackend:
    """Triton kernels. See :mod:`seqnorm.backends` for the contract."""

    name = "triton"
    native_low_precision = (torch.bfloat16, torch.float16)
    reduces = False

    @staticmethod
    def rowwise_norm(x, weight, bias, eps, pad, center):
        return _Rowwise.apply(x, None, weight, bias, pad, float(eps), center, False)[0]

    @staticmethod
    def add_rowwise_norm(x, residual, weight, bias, eps, pad, center, need_sum=True):
        y, s = _Rowwise.apply(x, residual, weight, bias, pad, float(eps), center, need_sum)
        return y, (s if need_sum else None)

    @staticmethod
    def featurewise_norm(x, weight, bias, eps, pad, mean=None, var=None, reduce=None):
        return _Featurewise.apply(x, weight, bias, float(eps), pad, mean, var)

    @staticmethod
    def power_norm(x, weight, bias, eps, pad, running_phi, running_nu, factor, reduce=None):
        return _Power.apply(x, weight, bias, pad, running_phi, running_nu, float(eps), factor)


register_backend("triton", lambda x: TritonBackend if supports(x) else backend_named("torch", x))
