"""The triton backend: the kernels of :mod:`.triton_kernels` as custom ops with autograd
(:mod:`.custom_ops`: ``torch.compile(fullgraph=True)`` sees ordinary ops).

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
from .custom_ops import BackwardOp, ForwardOp, power_autograd
from .triton_kernels import featurewise as fk
from .triton_kernels import groupwise as gk
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
    """Whether the kernels run ``x``: rows ``(R, D)`` with ``D`` ≤ :data:`MAX_FEATURES`
    (held in registers), or a group-wise ``(B, C, T)`` of any ``T`` (read in blocks)."""
    on_device = x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())
    return on_device and x.dtype in DTYPES and (x.dim() == 3 or x.shape[-1] <= MAX_FEATURES)


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


def _grads_fake(dy, x, *_):
    """Every backward op's outputs: ``(dx like x, dγ (D,), dβ (D,))`` in float32."""
    d = x.shape[1]
    return torch.empty_like(x), x.new_empty(d, dtype=torch.float32), x.new_empty(d, dtype=torch.float32)


# ---------------------------------------------------------------------------
# Row-wise
# ---------------------------------------------------------------------------


def _rowwise_fwd_impl(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                      pad: Optional[Tensor], eps: float, center: bool, write_sum: bool
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, s, shift, delta, rstd)`` of the row-wise norm of ``x (+ residual)``;
    ``s`` is empty unless ``write_sum``."""
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


def _rowwise_bwd_impl(dy: Tensor, x: Tensor, residual: Optional[Tensor], ds: Optional[Tensor],
                      weight: Optional[Tensor], pad: Optional[Tensor], shift: Tensor, delta: Tensor, rstd: Tensor,
                      center: bool) -> Tuple[Tensor, Tensor, Tensor]:
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


def _rowwise_fwd_fake(x, residual, weight, bias, pad, eps, center, write_sum):
    rows = x.shape[0]
    return (torch.empty_like(x), torch.empty_like(x) if write_sum else x.new_empty(0),
            *(x.new_empty(rows, dtype=torch.float32) for _ in range(3)))


rowwise_bwd = BackwardOp("triton_rowwise_bwd", _rowwise_bwd_impl, _grads_fake)


def _rowwise_setup(ctx, inputs, output):
    x, residual, weight, bias, pad, eps, center, write_sum = inputs
    _, _, shift, delta, rstd = output
    ctx.save_for_backward(x, residual, weight, pad, shift, delta, rstd)
    ctx.center, ctx.has_bias = center, bias is not None


def _rowwise_backward(ctx, dy, ds, *_):
    """The backward re-forms the float32 sum from both addends (never a rounded sum)."""
    x, residual, weight, pad, shift, delta, rstd = ctx.saved_tensors
    if dy is None:  # only the sum was used downstream
        dy = torch.zeros_like(x)
    ds = ds if residual is not None and ds is not None and ds.numel() else None
    dx, dw, db = rowwise_bwd(dy, x, residual, ds, weight, pad, shift, delta, rstd, ctx.center)
    return (dx, dx if residual is not None else None,
            dw.to(weight.dtype).reshape(weight.shape) if weight is not None else None,
            db if ctx.has_bias else None, None, None, None, None)


rowwise_fwd = ForwardOp("triton_rowwise_fwd", _rowwise_fwd_impl, _rowwise_fwd_fake, _rowwise_setup,
                        _rowwise_backward, 2)


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


def _featurewise_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
                          mean: Optional[Tensor], var: Optional[Tensor], eps: float
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Masked BatchNorm: ``(y, batch_mean, batch_var, count, shift, delta, rstd, a)``.
    With ``mean``/``var`` given (eval) those are used and the batch statistics
    are returned as zeros."""
    x = _rows(x)
    if mean is None:
        shift, delta, var, count = moments(x, pad)
        batch_mean, batch_var = shift + delta, var.clone()
    else:
        shift, delta, var = mean.float().contiguous(), torch.zeros_like(mean, dtype=torch.float32), var.float()
        count = (x.shape[0] - pad.sum() if pad is not None else torch.full((), x.shape[0], device=x.device)).float()
        batch_mean, batch_var = (x.new_zeros(x.shape[1], dtype=torch.float32) for _ in range(2))
    rstd = torch.rsqrt(var + eps)
    a = (rstd * weight.float() if weight is not None else rstd.clone()).contiguous()
    y, _, _ = normalize(x, pad, shift, delta, a, bias)
    return y, batch_mean, batch_var, count.to(torch.int64), shift.clone(), delta, rstd, a


def _featurewise_fwd_fake(x, weight, bias, pad, mean, var, eps):
    d = x.shape[1]
    f32 = [x.new_empty(d, dtype=torch.float32) for _ in range(6)]
    return (torch.empty_like(x), f32[0], f32[1], x.new_empty((), dtype=torch.int64), *f32[2:])


def _grad_sums(dy, x, pad, shift, delta, rstd):
    """``(Σ dy ⊙ x̂, Σ dy)`` over the real rows, float32 (per-block partials, summed in order)."""
    n, d = x.shape
    p, f = _feature_grid(n, d)
    dg_part = x.new_zeros((p, d), dtype=torch.float32)
    db_part = x.new_zeros((p, d), dtype=torch.float32)
    if n and d:
        stats = torch.stack([shift, delta, rstd])
        fk.grad_partial[(p, f)](dy, x, _pad_bits(pad, x), stats, dg_part, db_part, dy.stride(0), x.stride(0), n, d,
                                HAS_PAD=pad is not None, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    return dg_part.sum(0), db_part.sum(0)


def _bn_input_grad(dy, x, pad, shift, delta, rstd, a, c1, c2):
    """``dx = a·dy − c1 − x̂·c2`` at real rows, 0 at padding."""
    n, d = x.shape
    p, f = _feature_grid(n, d)
    dx = torch.empty_like(x)
    if n and d:
        stats, coef = torch.stack([shift, delta, rstd]), torch.stack([a, c1, c2])
        fk.bn_input_grad[(p, f)](dy, x, _pad_bits(pad, x), stats, coef, dx, dy.stride(0), x.stride(0), dx.stride(0),
                                 n, d, HAS_PAD=pad is not None, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    elif n:
        dx.zero_()
    return dx


def _featurewise_bwd_impl(dy: Tensor, x: Tensor, pad: Optional[Tensor], shift: Tensor, delta: Tensor, rstd: Tensor,
                          a: Tensor, count: Tensor, use_batch: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dγ, dβ)`` of masked BatchNorm (dγ, dβ float32 sums)."""
    dy, x = _rows(dy), _rows(x)
    dgamma, dbeta = _grad_sums(dy, x, pad, shift, delta, rstd)
    if use_batch:
        inv_n = 1.0 / count.float().clamp_min(1)
        c1, c2 = (a * dbeta * inv_n).contiguous(), (a * dgamma * inv_n).contiguous()
    else:
        c1 = c2 = torch.zeros_like(a)
    return _bn_input_grad(dy, x, pad, shift, delta, rstd, a, c1, c2), dgamma, dbeta


featurewise_bwd = BackwardOp("triton_featurewise_bwd", _featurewise_bwd_impl, _grads_fake)


def _featurewise_setup(ctx, inputs, output):
    x, weight, bias, pad, mean, var, eps = inputs
    _, _, _, count, shift, delta, rstd, a = output
    ctx.save_for_backward(x, weight, pad, shift, delta, rstd, a, count)
    ctx.use_batch, ctx.has_bias = mean is None, bias is not None


def _featurewise_backward(ctx, dy, *_):
    x, weight, pad, shift, delta, rstd, a, count = ctx.saved_tensors
    if dy is None:
        return (None,) * 7
    dx, dgamma, dbeta = featurewise_bwd(dy, x, pad, shift, delta, rstd, a, count, ctx.use_batch)
    return (dx, dgamma.to(weight.dtype) if weight is not None else None, dbeta if ctx.has_bias else None,
            None, None, None, None)


featurewise_fwd = ForwardOp("triton_featurewise_fwd", _featurewise_fwd_impl, _featurewise_fwd_fake,
                            _featurewise_setup, _featurewise_backward, 1)


def _power_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
                    running_phi: Tensor, running_nu: Optional[Tensor], eps: float, factor: Tensor
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """PowerNorm: ``(y, batch_phi, count, rstd, nu_before)``, dividing by the running
    ψ²; ``nu_before`` is a copy of ν (empty without one), which the backward reads
    while it moves ν in place (Algorithm 1) — a saved output, so that
    torch.compile's backward graph reads the same value."""
    x = _rows(x)
    rstd = torch.rsqrt(running_phi.detach().float() + eps)
    a = rstd * weight.float() if weight is not None else rstd
    y, sumsq, count = normalize(x, pad, None, None, a.contiguous(), bias, sumsq=True)
    nu_before = x.new_empty(0) if running_nu is None else running_nu.detach().clone()
    return y, sumsq / count.clamp_min(1), count.to(torch.int64), rstd, nu_before


def _power_fwd_fake(x, weight, bias, pad, running_phi, running_nu, eps, factor):
    d = x.shape[1]
    return (torch.empty_like(x), x.new_empty(d, dtype=torch.float32), x.new_empty((), dtype=torch.int64),
            x.new_empty(d, dtype=torch.float32), x.new_empty(0) if running_nu is None else torch.empty_like(running_nu))


def _power_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], pad: Optional[Tensor], rstd: Tensor,
                    nu: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dγ, dβ)``: ``dx = (w·dy − ν·x̂)·r`` with ν before this step's update (0 without one)."""
    dy, x = _rows(dy), _rows(x)
    n, d = x.shape
    p, f = _feature_grid(n, d)
    w = weight.float().contiguous() if weight is not None else torch.ones_like(rstd)
    dg_part = x.new_zeros((p, d), dtype=torch.float32)
    db_part = x.new_zeros((p, d), dtype=torch.float32)
    dx = torch.empty_like(x)
    if n and d:
        fk.power_input_grad[(p, f)](dy, x, _pad_bits(pad, x), w, rstd,
                                    _f32(nu, x) if nu is not None else torch.zeros_like(rstd), dx,
                                    dg_part, db_part, dy.stride(0), x.stride(0), dx.stride(0), n, d,
                                    HAS_PAD=pad is not None, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    elif n:
        dx.zero_()
    return dx, dg_part.sum(0), db_part.sum(0)


power_bwd = BackwardOp("triton_power_bwd", _power_bwd_impl, _grads_fake)


_power_setup, _power_backward = power_autograd(power_bwd)


power_fwd = ForwardOp("triton_power_fwd", _power_fwd_impl, _power_fwd_fake, _power_setup, _power_backward, 1)


# ---------------------------------------------------------------------------
# Feature-wise with a StatsReduce hook (the local part of the Sync modules):
# the same kernels, split where the hook's collectives go in between.
# ---------------------------------------------------------------------------


class _ReducedFeaturewise(torch.autograd.Function):
    """Masked BatchNorm whose statistics pass through ``reduce`` (training):
    local moments → ``reduce.moments`` → normalize; the backward's two sums pass
    through ``reduce.sums``. Parameter gradients stay local (DDP reduces them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, pad, reduce):
        ctx.set_materialize_grads(False)
        x = _rows(x)
        shift, delta, var, count = moments(x, pad)
        n, mean, var = reduce.moments(count, shift + delta, var)
        # the global mean as this rank's K plus a small δ, formed in float64 (as the CPU kernels keep it)
        delta = (mean.double() - shift.double()).float()
        rstd = torch.rsqrt(var.float() + eps)
        a = (rstd * weight.float() if weight is not None else rstd).contiguous()
        y, _, _ = normalize(x, pad, shift, delta, a, bias)
        ctx.save_for_backward(x, pad, shift, delta, rstd, a, n)
        ctx.reduce, ctx.has_weight, ctx.has_bias = reduce, weight is not None, bias is not None
        mean, var = mean.float(), var.float()
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, *_):
        x, pad, shift, delta, rstd, a, n = ctx.saved_tensors
        if dy is None:  # every process must still join the collective
            dy = torch.zeros_like(x)
        dy = _rows(dy)
        dgamma, dbeta = _grad_sums(dy, x, pad, shift, delta, rstd)
        d = x.shape[1]
        sums = ctx.reduce.sums(torch.cat([dbeta, dgamma]))
        inv_n = 1.0 / n.float().clamp_min(1)
        c1, c2 = (a * sums[:d].float() * inv_n).contiguous(), (a * sums[d:].float() * inv_n).contiguous()
        dx = _bn_input_grad(dy, x, pad, shift, delta, rstd, a, c1, c2)
        return dx, dgamma if ctx.has_weight else None, dbeta if ctx.has_bias else None, None, None, None


class _ReducedPower(torch.autograd.Function):
    """PowerNorm whose ψ_B² and ν statistics pass through ``reduce``: the forward
    sums ``[n, Σ x²]``, the backward ``[Σ x̂², Σ x̂ ⊙ g]``; ν is kept in the scale of
    the gradient DDP applies (the average over ``W = reduce.world`` processes), so a
    process's own gradient subtracts ``W·ν ⊙ x̂`` (as the torch backend)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pad, running_phi, running_nu, eps, factor, reduce):
        ctx.set_materialize_grads(False)
        x = _rows(x)
        rstd = torch.rsqrt(running_phi.detach().float() + eps)
        a = (rstd * weight.float() if weight is not None else rstd).contiguous()
        y, sumsq, count = normalize(x, pad, None, None, a, bias, sumsq=True)
        sums = reduce.sums(torch.cat([count.reshape(1), sumsq]))
        n = sums[0]
        phi = (sums[1:] / n.clamp_min(1)).float()
        nu_before = None if running_nu is None else running_nu.detach().clone()
        ctx.save_for_backward(x, weight, pad, rstd, sumsq, n, nu_before)
        ctx.nu, ctx.factor, ctx.reduce, ctx.has_bias = running_nu, factor, reduce, bias is not None
        ctx.mark_non_differentiable(phi, n)
        return y, phi, n

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, pad, rstd, sumsq, n, nu_before = ctx.saved_tensors
        nu, reduce = ctx.nu, ctx.reduce
        if dy is None:  # every process must still join the collective
            dy = torch.zeros_like(x)
        nu_scaled = None if nu is None else nu_before.float() * reduce.world
        dx, dgamma, dbeta = _power_bwd_impl(_rows(dy), x, weight, pad, rstd, nu_scaled)
        if nu is not None:
            w = weight.float() if weight is not None else torch.ones_like(rstd)
            sums = reduce.sums(torch.cat([rstd * rstd * sumsq, w * dgamma]))     # Σ x̂², Σ x̂ ⊙ g
            with torch.no_grad():
                d, m = x.shape[1], n.to(sums.dtype).clamp_min(1)
                gamma, lam = sums[:d] / m, sums[d:] / (m * reduce.world)
                update_running_nu(nu, nu_step(nu_before, gamma, lam, ctx.factor), n > 0)
        return (dx, dgamma.to(weight.dtype) if weight is not None else None, dbeta if ctx.has_bias else None,
                None, None, None, None, None, None)


# ---------------------------------------------------------------------------
# Group-wise: masked GroupNorm / InstanceNorm
# ---------------------------------------------------------------------------


def _block_t(t: int) -> int:
    return min(triton.next_power_of_2(max(t, 1)), 1024)


def _groupwise_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
                        eps: float, groups: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x (B, C, T)`` → ``(y, mean (B, G), var (B, G), steps (B,), rstd (B·G,))``,
    the statistics float32."""
    x = x.contiguous()
    b, c, t = x.shape
    y = torch.empty_like(x)
    mean, rstd, var = (x.new_empty(b * groups, dtype=torch.float32) for _ in range(3))
    steps = torch.full((b,), t, dtype=torch.int64, device=x.device) if pad is None else \
        t - pad.sum(1, dtype=torch.int64)
    if b and c:
        gk.groupwise_fwd[(b * groups,)](
            x, y, _f32(weight, x), _f32(bias, x), _pad_bits(pad, x), mean, rstd, var, c, t, c // groups,
            groups, float(eps), HAS_W=weight is not None, HAS_B=bias is not None, HAS_PAD=pad is not None,
            BLOCK_T=_block_t(t), num_warps=4)
    return y, mean.reshape(b, groups), var.reshape(b, groups), steps, rstd


def _groupwise_fwd_fake(x, weight, bias, pad, eps, groups):
    b = x.shape[0]
    return (torch.empty_like(x), x.new_empty(b, groups, dtype=torch.float32),
            x.new_empty(b, groups, dtype=torch.float32), x.new_empty(b, dtype=torch.int64),
            x.new_empty(b * groups, dtype=torch.float32))


def _groupwise_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], pad: Optional[Tensor], steps: Tensor,
                        mean: Tensor, rstd: Tensor, groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``, the parameter gradients as float32 sums over the batch."""
    dy, x = dy.contiguous(), x.contiguous()
    b, c, t = x.shape
    dx = torch.empty_like(x)
    dw_part = x.new_zeros((b, c), dtype=torch.float32)
    db_part = x.new_zeros((b, c), dtype=torch.float32)
    if b and c:
        gk.groupwise_bwd[(b * groups,)](
            dy, x, dx, _f32(weight, x), _pad_bits(pad, x), steps, mean.reshape(-1), rstd, dw_part, db_part, c, t,
            c // groups, groups, HAS_W=weight is not None, HAS_PAD=pad is not None, BLOCK_T=_block_t(t),
            num_warps=4)
    return dx, dw_part.sum(0), db_part.sum(0)


def _groupwise_bwd_fake(dy, x, weight, pad, steps, mean, rstd, groups):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


groupwise_bwd = BackwardOp("triton_groupwise_bwd", _groupwise_bwd_impl, _groupwise_bwd_fake)


def _groupwise_setup(ctx, inputs, output):
    x, weight, bias, pad, eps, groups = inputs
    _, mean, _, steps, rstd = output
    ctx.save_for_backward(x, weight, pad, steps, mean, rstd)
    ctx.groups, ctx.has_bias = groups, bias is not None


def _groupwise_backward(ctx, dy, *_):
    x, weight, pad, steps, mean, rstd = ctx.saved_tensors
    if dy is None:
        return (None,) * 6
    dx, dw, db = groupwise_bwd(dy, x, weight, pad, steps, mean, rstd, ctx.groups)
    return dx, (dw.to(weight.dtype) if weight is not None else None), (db if ctx.has_bias else None), None, None, None


groupwise_fwd = ForwardOp("triton_groupwise_fwd", _groupwise_fwd_impl, _groupwise_fwd_fake, _groupwise_setup,
                          _groupwise_backward, 1)


class TritonBackend:
    """Triton kernels. See :mod:`seqnorm.backends` for the contract."""

    name = "triton"
    native_low_precision = (torch.bfloat16, torch.float16)
    reduces = True

    @staticmethod
    def rowwise_norm(x, weight, bias, eps, pad, center):
        return rowwise_fwd(x, None, weight, bias, pad, float(eps), center, False)[0]

    @staticmethod
    def add_rowwise_norm(x, residual, weight, bias, eps, pad, center, need_sum=True):
        y, s, *_ = rowwise_fwd(x, residual, weight, bias, pad, float(eps), center, need_sum)
        return y, (s if need_sum else None)

    @staticmethod
    def featurewise_norm(x, weight, bias, eps, pad, mean=None, var=None, reduce=None):
        if reduce is not None and mean is None:
            return _ReducedFeaturewise.apply(x, weight, bias, float(eps), pad, reduce)
        return featurewise_fwd(x, weight, bias, pad, mean, var, float(eps))[:4]

    @staticmethod
    def power_norm(x, weight, bias, eps, pad, running_phi, running_nu, factor, reduce=None):
        # factor as a 0-d tensor: the cumulative average's is one where the host is not asked
        factor = factor if isinstance(factor, Tensor) else torch.full((), factor, device=x.device)
        if reduce is not None:
            return _ReducedPower.apply(x, weight, bias, pad, running_phi, running_nu, float(eps), factor, reduce)
        return power_fwd(x, weight, bias, pad, running_phi, running_nu, float(eps), factor.float())[:3]

    @staticmethod
    def groupwise_norm(x, weight, bias, eps, pad, groups):
        return groupwise_fwd(x, weight, bias, pad, float(eps), int(groups))[:4]


register_backend("triton", lambda x: TritonBackend if supports(x) else backend_named("torch", x))
