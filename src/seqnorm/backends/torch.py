r"""The torch backend: composite torch ops, on every device and dtype torch supports.

Row-wise norms call ``torch.nn.functional.layer_norm`` / ``rms_norm``, so that
unpadded results are torch's, bit for bit. Feature-wise norms (masked
BatchNorm, PowerNorm) are written out here as two small steps with a hook
between them, and this is the *one* feature-wise path on the torch side — the
Sync modules of :mod:`seqnorm.distributed` run it with a hook that performs
their collectives:

1. **statistics** of this process's real rows — masked BatchNorm: the count
   ``n``, mean ``μ`` and biased variance per feature (:func:`masked_moments`); PowerNorm: ``[n, Σ x²]``;
2. ``reduce`` (a :class:`StatsReduce`) turns them into the statistics of the
   whole batch: :class:`LocalStats` returns them as they are; a collective
   gathers every process's and merges them with Chan's formula
   (:func:`merge_moments`), or sums them;
3. **normalize** with the reduced statistics.

The backward is written out the same way (the sums it needs pass through
``reduce.sums``), for BatchNorm with ``x̂ = (x − μ)/σ`` and ``a = γ/σ``:

.. math::
    \frac{\partial L}{\partial x} = a\Bigl(dy − c_1 − \hat{x}\,c_2\Bigr),\qquad
    c_1 = \frac{1}{n}\sum_{\text{real}} dy,\quad c_2 = \frac{1}{n}\sum_{\text{real}} dy\,\hat{x}
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import running
from ..masks import host_rows
from ..running import nu_step, update_running_nu
from . import register_backend

__all__ = ["TorchBackend", "StatsReduce", "LocalStats", "LOCAL", "masked_moments", "merge_moments",
           "zero_padded_rows", "real_rows", "featurewise_train_on_host", "batch_norm_train_rows", "affine", "group_moments",
           "groupwise_norm"]

Tensor = torch.Tensor


def zero_padded_rows(t: Tensor, pad: Optional[Tensor]) -> Tensor:
    """0 at padded rows. A fill (not a multiply) so that NaN/Inf in a padded row
    cannot leak, and the gradient to a padded row is exactly 0.

    On the CPU the rows are filled by index (``index_fill`` of the padded rows'
    indices): measured 50 µs for a (396, 768) float32 tensor against 270 µs for
    ``masked_fill`` with the broadcast row mask, which dominated a small masked
    LayerNorm. Where reading the indices back would synchronize (an accelerator,
    torch.compile: :func:`seqnorm.running.sync_free`) it is ``masked_fill``. The
    indices are read once per mask (:func:`seqnorm.masks.host_rows`): one op fills
    the same rows 2–7 times."""
    if pad is None:
        return t
    if running.sync_free(pad):
        return t.masked_fill(pad.unsqueeze(-1), 0)
    return t.index_fill(0, host_rows(pad).padded, 0)


def real_rows(pad: Tensor) -> Tensor:
    """Indices of the real rows of a host-readable ``pad (N,)`` (a CPU tensor:
    reading it costs no synchronization), read once per mask
    (:func:`seqnorm.masks.host_rows`, as :func:`zero_padded_rows`'s padded rows):
    a training step's norms share one mask."""
    return host_rows(pad).real


def featurewise_train_on_host(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                              pad: Optional[Tensor], running_mean: Optional[Tensor],
                              running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                              momentum) -> Optional[Tensor]:
    """Masked BatchNorm's training step where the padding can be read on the host
    (CPU, eager, no ``reduce`` hook): :func:`batch_norm_train_rows` on the real rows,
    in ~12 torch calls with the running update instead of ~45
    (:class:`_FeaturewiseFunction` and the general policy) — the host time of a
    small call (issue 16). Returns ``y (N, D)``, or ``None`` where this path does
    not apply (fewer than 2 real rows: the general path returns zeros or raises; a
    device or trace; mixed dtypes)."""
    if running.sync_free(x) or (pad is not None and running.sync_free(pad)):
        return None
    rows = None if pad is None else real_rows(pad)
    n = x.shape[0] if rows is None else rows.shape[0]
    if n < 2 or x.shape[1] == 0 or any(t is not None and t.dtype != x.dtype for t in (running_mean, running_var)):
        return None
    if rows is not None and n == x.shape[0]:
        rows = None
    return batch_norm_train_rows(x, weight, bias, eps, rows, running_mean, running_var, num_batches_tracked,
                                 momentum)


def batch_norm_train_rows(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                          rows: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          num_batches_tracked: Optional[Tensor], momentum) -> Tensor:
    r"""BatchNorm's training step on the real rows ``rows`` (indices; None: every row,
    at least 2 either way) of ``x (N, D)``, on the host's policy: gather them, shift
    them by the first of them, let ``torch.batch_norm`` normalize them (one fused
    forward and backward) and scatter them back into zeros; the running statistics
    are then moved by :func:`~seqnorm.running.update_from_host_stats`. Returns
    ``y (N, D)``, 0 at padded rows (which are never read: NaN/Inf there reach
    nothing, and their gradient is 0).

    **Accuracy.** torch's CPU batch norm sums its inputs in order in the input's
    dtype, which costs the mean ~3e-3 of a standard deviation at an offset of
    1e4 in float32. Subtracting a shift ``s`` near the data first — the first real
    row — makes every sum one of ``O(σ)`` terms: ``x − s`` is exact or rounded
    relative to ``|x − s|``, the normalized output is the same function (a
    per-feature shift cancels in ``x − μ``, so treating ``s`` as a constant is
    also the exact gradient), and the batch mean is ``s + mean(x − s)``. torch
    computes the unbiased variance ``Σ(x − μ)²/(n − 1)`` itself (its running
    update with momentum 1 into zeros stores it exactly); the biased one is never
    needed here. (A mean as the shift cost two reductions more per call for no
    accuracy the tests can see: ``x − s`` is ``O(σ)`` either way.)"""
    xr = x if rows is None else x.index_select(0, rows)
    shift = xr.select(0, 0)
    if shift.requires_grad:
        shift = shift.detach()
    stats = x.new_zeros(2, x.shape[1])          # rows: the batch mean, the unbiased variance
    batch_mean, batch_var = stats.unbind(0)      # of x − s
    # (torch.batch_norm's CPU path without its dispatch layer: the same kernel and backward)
    yr = torch.native_batch_norm(xr - shift, weight, bias, batch_mean, batch_var, True, 1.0, eps)[0]
    if running_mean is not None:
        # not in place: torch.batch_norm's backward reads the tensors it was given as running statistics.
        # stats is finite iff [shift + its mean, its variance] is: a NaN/Inf shift makes every other x − s
        # non-finite, and |s + mean(x − s)| reaches the float's limit only with (x − s)² overflowing
        running.update_from_host_stats([running_mean, running_var], [batch_mean + shift, batch_var], stats,
                                       momentum, num_batches_tracked)
    return yr if rows is None else torch.zeros_like(x).index_copy_(0, rows, yr)


def count_real(x: Tensor, pad: Optional[Tensor]) -> Tensor:
    """Number of real rows of ``x (N, D)``, as a 0-d int64 tensor on x's device."""
    return torch.tensor(x.shape[0], device=x.device) if pad is None else (~pad).sum()


def affine(xhat: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    y = xhat if weight is None else xhat * weight
    return y if bias is None else y + bias


def masked_moments(x: Tensor, pad: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-feature mean and biased variance of the real rows of ``x (N, D)``.

    Corrected two-pass algorithm: ``m₁ = Σx/n``, ``δ = x − m₁``,
    ``mean = m₁ + Σδ/n``, ``var = Σδ²/n − (Σδ/n)²``. The second pass removes
    the rounding error of the first, so an offset of 1e4 costs no accuracy
    in float32 (no E[x²] − E[x]² cancellation). ``x`` must already be 0 at
    padded rows. Returns ``(mean (D,), var (D,), count ())``; an all-padding
    batch gives mean 0, var 0 (not 0/0).
    """
    count = count_real(x, pad)
    n = count.clamp_min(1).to(x.dtype)
    m1 = x.sum(0) / n
    delta = zero_padded_rows(x - m1, pad)
    correction = delta.sum(0) / n
    var = (delta * delta).sum(0) / n - correction * correction
    return m1 + correction, var.clamp_min(0), count


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Chan's parallel merge of per-part ``(n, μ, M)``, in order.

    .. math::
        n = n_a + n_b,\quad Δ = μ_b − μ_a,\quad μ = μ_a + Δ\,\frac{n_b}{n},\quad
        M = M_a + M_b + Δ^2\,\frac{n_a n_b}{n}

    Parts are weighted by their real rows, and a part with none contributes
    nothing. No data-dependent branch (no host synchronization).

    Args:
        counts: ``(W,)``; means, m2s: ``(W, D)`` — one row per part.

    Returns:
        ``(n (), mean (D,), var (D,))`` with ``var = M/n`` biased (0 where n = 0).
    """
    n = torch.zeros((), dtype=means.dtype, device=means.device)
    mean = torch.zeros(means.shape[1], dtype=means.dtype, device=means.device)
    m2 = torch.zeros_like(mean)
    for r in range(counts.shape[0]):
        nb = counts[r].to(means.dtype)
        total = n + nb
        w = torch.where(total > 0, nb / total.clamp_min(1), torch.zeros_like(nb))
        delta = means[r] - mean
        mean = mean + delta * w
        m2 = m2 + m2s[r] + delta * delta * (n * w)
        n = total
    return n, mean, m2 / n.clamp_min(1)


class StatsReduce:
    """The hook between statistics and normalization (see the module docstring).

    ``world`` is the number of processes whose gradients DistributedDataParallel
    averages (PowerNorm keeps ν in that scale); ``moments`` takes this process's
    ``(n (), mean (D,), var (D,))`` (biased variance) and returns the whole
    batch's, the same three; ``sums`` returns the sum over processes of
    a tensor of sums.
    """

    world = 1

    def moments(self, count: Tensor, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def sums(self, t: Tensor) -> Tensor:
        raise NotImplementedError


class LocalStats(StatsReduce):
    """This process's batch is the whole batch."""

    def moments(self, count, mean, var):
        return count, mean, var

    def sums(self, t):
        return t


LOCAL = LocalStats()


class _FeaturewiseFunction(torch.autograd.Function):
    """Masked BatchNorm: statistics → ``reduce`` → normalize; the backward's two
    sums pass through ``reduce.sums``. With ``mean``/``var`` given (running
    statistics, eval) the batch statistics are still returned (for the caller)
    but not used, and the backward has no batch terms."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, pad, mean, var, reduce):
        ctx.set_materialize_grads(False)
        x = zero_padded_rows(x, pad)
        local_mean, local_var, count = masked_moments(x, pad)
        n, batch_mean, batch_var = reduce.moments(count, local_mean, local_var)
        batch_mean, batch_var = batch_mean.to(x.dtype), batch_var.to(x.dtype)
        use_batch = mean is None
        if use_batch:
            mean, var = batch_mean, batch_var
        rstd = torch.rsqrt(var + eps)                                             # D
        xhat = zero_padded_rows((x - mean) * rstd, pad)                           # N,D
        y = zero_padded_rows(affine(xhat, weight, bias), pad)
        ctx.save_for_backward(xhat, rstd, weight, pad)
        ctx.n, ctx.reduce, ctx.use_batch, ctx.has_bias = n, reduce, use_batch, bias is not None
        ctx.mark_non_differentiable(batch_mean, batch_var, n)
        return y, batch_mean, batch_var, n

    @staticmethod
    def backward(ctx, dy, *_):
        xhat, rstd, weight, pad = ctx.saved_tensors
        if dy is None:  # every process must still join the collective below
            dy = torch.zeros_like(xhat)
        dy = zero_padded_rows(dy, pad)
        dbias = dy.sum(0)                                                         # Σ dy
        dweight = (dy * xhat).sum(0)                                              # Σ dy·x̂
        a = rstd if weight is None else rstd * weight
        if ctx.use_batch:
            d = dy.shape[1]
            sums = ctx.reduce.sums(torch.cat([dbias, dweight]))
            n = ctx.n.clamp_min(1).to(sums.dtype)
            c1, c2 = (sums[:d] / n).to(dy.dtype), (sums[d:] / n).to(dy.dtype)
            dy = dy - c1 - xhat * c2
        dx = zero_padded_rows(dy * a, pad)
        # Parameter gradients are this process's sums, as torch.nn.SyncBatchNorm's:
        # DistributedDataParallel reduces them itself.
        return (dx, dweight if weight is not None else None, dbias if ctx.has_bias else None,
                None, None, None, None, None)


class _PowerNormFunction(torch.autograd.Function):
    r"""PowerNorm's forward with Algorithm 1's approximate backward.

    The forward divides by the running ψ² (a constant here) and returns the
    batch's quadratic mean ``ψ_B² = Σ_real x² / n`` (through ``reduce.sums``)
    for the running update. The backward, with ``g = γ ⊙ ∂L/∂y``, returns
    ``(g − W·ν ⊙ x̂)/√(ψ² + ε)`` and moves ν with ``Γ = Σ x̂²/n`` and
    ``Λ = Σ x̂ ⊙ g/(W·n)`` (sums through ``reduce.sums``; ``W = reduce.world``:
    ν is kept in the scale of the gradient DistributedDataParallel applies, the
    average over processes, so it is the ν of one process minimizing the mean
    of their losses). See :func:`seqnorm.reference.power_norm_backward`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pad, running_phi, running_nu, eps, factor, reduce):
        ctx.set_materialize_grads(False)
        x = zero_padded_rows(x, pad)
        with torch.no_grad():
            count = count_real(x, pad).to(x.dtype).reshape(1)
            sums = reduce.sums(torch.cat([count, (x * x).sum(0)]))                 # 1 + D
            n = sums[0]
            phi = (sums[1:] / n.clamp_min(1)).to(x.dtype)
        rstd = torch.rsqrt(running_phi.to(x.dtype) + eps)                       # D
        xhat = zero_padded_rows(x * rstd, pad)                                  # N,D
        y = zero_padded_rows(affine(xhat, weight, bias), pad)
        # ν as of this forward, saved (not only closed over): torch.compile's backward reads saved tensors
        nu_before = None if running_nu is None else running_nu.detach().clone()
        ctx.save_for_backward(xhat, rstd, weight, pad, nu_before)
        ctx.nu, ctx.factor, ctx.reduce, ctx.n = running_nu, factor, reduce, n
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(phi, n)
        return y, phi, n

    @staticmethod
    def backward(ctx, dy, *_):
        xhat, rstd, weight, pad, nu_before = ctx.saved_tensors
        nu, reduce = ctx.nu, ctx.reduce
        if dy is None:  # every process must still join the collective below
            dy = torch.zeros_like(xhat)
        dy = zero_padded_rows(dy, pad)
        g = dy if weight is None else dy * weight                               # ∂L/∂x̂
        dweight = (dy * xhat).sum(0) if weight is not None else None
        dbias = dy.sum(0) if ctx.has_bias else None
        if nu is not None:
            nu_prev = nu_before.to(g.dtype)                                     # ν before it moves
            sums = reduce.sums(torch.cat([(xhat * xhat).sum(0), (xhat * g).sum(0)]))
            g = g - reduce.world * nu_prev * xhat                               # g̃
            with torch.no_grad():
                d, n = xhat.shape[1], ctx.n.to(sums.dtype)
                gamma, lam = sums[:d] / n.clamp_min(1), sums[d:] / (n.clamp_min(1) * reduce.world)
                # an all-padding batch carries no information about ν
                update_running_nu(nu, nu_step(nu_before, gamma, lam, ctx.factor), n > 0)
        dx = zero_padded_rows(g * rstd, pad)
        return dx, dweight, dbias, None, None, None, None, None, None


def _power_of_two_below(a: Tensor) -> Tensor:
    """``2^e ≤ a < 2^(e+1)`` for ``a ≥ 1``, else 1: a scale that divides exactly."""
    _, e = torch.frexp(a)
    return torch.ldexp(torch.ones_like(a), e - 1).clamp_min(1)


def group_moments(xg: Tensor, pad4: Optional[Tensor], count: Tensor,
                  keep4: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of each ``(b, g)`` of ``xg (B, G, Cg, T)`` over
    its real elements (``xg`` already 0 at padding; ``count (B, 1, 1, 1)`` real
    elements), by :func:`masked_moments`' corrected two-pass formula. Returns
    ``(mean, var)`` of shape ``(B, G, 1, 1)``; no real element gives 0, 0.
    ``keep4``: ``1 − pad4`` in ``xg``'s dtype, when the caller has it: the deviations
    ``x − m₁`` are finite at padding (``x`` is 0 there), so multiplying by it zeroes
    them exactly, and a broadcast multiply costs a fraction of a broadcast ``masked_fill``."""
    n = count.clamp_min(1).to(xg.dtype)
    m1 = xg.sum((2, 3), keepdim=True) / n
    delta = xg - m1
    if keep4 is not None:
        delta = delta * keep4
    elif pad4 is not None:
        delta = delta.masked_fill(pad4, 0)
    correction = delta.sum((2, 3), keepdim=True) / n
    var = (delta * delta).sum((2, 3), keepdim=True) / n - correction * correction
    return m1 + correction, var.clamp_min(0)


def groupwise_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   pad: Optional[Tensor], groups: int):
    r"""Masked GroupNorm of ``x (B, C, T)`` as composite torch ops (autograd
    differentiates them): statistics of each sequence's group over its real
    steps (:func:`group_moments`), then normalize.

    A finite group whose squares would overflow (``|x| ≳ 1e19`` in float32) is
    first divided by a power of two ``s ≤ max|x|`` (the scale is 1 below 1):
    ``x̂ = (x/s − μ/s)/√(σ²/s² + ε/s²)`` is the same number, and dividing by a
    power of two is exact, so ordinary inputs give the same bits as unscaled.

    Returns ``(y (B, C, T), mean (B, G), var (B, G), count (B,))``: ``count``
    the real steps of each sequence, ``var`` biased; 0 at padded steps of ``y``.
    """
    B, C, T = x.shape
    xg = x.reshape(B, groups, C // groups, T)
    pad4 = None if pad is None else pad.reshape(B, 1, 1, T)
    keep4 = None
    if pad4 is not None:
        # NaN/Inf at padding never reach a sum; no gradient to them. (A select: a broadcast
        # masked_fill costs ~2× as much on the CPU; a multiply would keep NaN·0 = NaN.)
        xg = torch.where(pad4, 0, xg)
        keep4 = torch.logical_not(pad4).to(x.dtype)
    steps = torch.full((B,), T, device=x.device) if pad is None else (~pad).sum(1)
    count = (steps * (C // groups)).reshape(B, 1, 1, 1)
    with torch.no_grad():
        scale = _power_of_two_below(xg.abs().amax((2, 3), keepdim=True)) if xg.numel() else None
    xs = xg if scale is None else xg / scale
    mean, var = group_moments(xs, pad4, count, keep4)
    rstd = torch.rsqrt(var + (eps if scale is None else eps / (scale * scale)))
    xhat = (xs - mean) * rstd
    shape = (1, groups, C // groups, 1)
    y = affine(xhat, None if weight is None else weight.reshape(shape),
               None if bias is None else bias.reshape(shape))
    if pad4 is not None:
        y = torch.where(pad4, 0, y)      # (a select, not y·keep: exactly +0, whatever β and γ hold)
    if scale is not None:
        mean, var = mean * scale, var * (scale * scale)
    return y.reshape(B, C, T), mean.reshape(B, groups).detach(), var.reshape(B, groups).detach(), steps


class TorchBackend:
    """Composite torch ops. See :mod:`seqnorm.backends` for the contract."""

    name = "torch"
    native_low_precision = ()
    reduces = True

    @staticmethod
    def rowwise_norm(x, weight, bias, eps, pad, center):
        # A zero row normalizes to 0: finite, no leak. Only a backward needs it (0·NaN at a padded
        # row would reach dx and dγ); rows are independent, so the output fill alone covers inference.
        if torch.is_grad_enabled():
            x = zero_padded_rows(x, pad)
        d = (x.shape[-1],)
        y = F.layer_norm(x, d, weight, bias, eps) if center else F.rms_norm(x, d, weight, eps)
        return zero_padded_rows(y, pad)

    @classmethod
    def add_rowwise_norm(cls, x, residual, weight, bias, eps, pad, center, need_sum=True):
        s = x + residual
        return cls.rowwise_norm(s, weight, bias, eps, pad, center), s

    @staticmethod
    def featurewise_norm(x, weight, bias, eps, pad, mean=None, var=None, reduce=None):
        return _FeaturewiseFunction.apply(x, weight, bias, eps, pad, mean, var, reduce or LOCAL)

    @staticmethod
    def power_norm(x, weight, bias, eps, pad, running_phi, running_nu, factor, reduce=None):
        return _PowerNormFunction.apply(x, weight, bias, pad, running_phi, running_nu, eps, factor,
                                        reduce or LOCAL)

    groupwise_norm = staticmethod(groupwise_norm)
    featurewise_train_on_host = staticmethod(featurewise_train_on_host)


register_backend("torch", lambda x: TorchBackend)
