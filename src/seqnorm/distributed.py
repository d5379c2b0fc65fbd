r"""SyncSeqBatchNorm: masked BatchNorm whose statistics span every process.

In training, each rank computes, per feature, the count ``n_r`` of its real
tokens, their mean ``μ_r`` and centred second moment ``M_r = Σ (x − μ_r)²``.
One collective (an all-gather into one flat tensor of the packed ``[n_r, μ_r, M_r]``)
gives every rank all of them, and every rank merges them in rank order with
Chan et al.'s formula, in float64:

.. math::
    n = n_a + n_b,\quad Δ = μ_b − μ_a,\quad μ = μ_a + Δ\,\frac{n_b}{n},\quad
    M = M_a + M_b + Δ^2\,\frac{n_a n_b}{n}

so ranks with different batch sizes, lengths or amounts of padding are
weighted by their real tokens (not averaged per device, as Flax's masked BN
does), and a rank whose batch is all padding contributes nothing. The backward
all-reduces the two sums it needs, ``Σ dy`` and ``Σ dy·x̂`` (one packed
``all_reduce``), and returns

.. math::
    dx = \frac{w}{σ}\Bigl(dy − \frac{1}{n}\sum dy − \hat{x}\,\frac{1}{n}\sum dy\,\hat{x}\Bigr)

with the sums over every real token of every rank. Weight and bias gradients
are the *local* sums, as in :class:`torch.nn.SyncBatchNorm`: DistributedDataParallel
all-reduces parameter gradients itself.

The same code runs on gloo (CPU) and nccl (CUDA). Without an initialized
process group, with one rank, or in eval mode, it is :class:`SeqBatchNorm`.

SyncPowerNorm: PowerNorm divides by its *running* ψ², so its outputs and input
gradients are local to each rank; what spans the batch are the statistics it
keeps. The forward all-reduces ``[n_r, Σ x²]`` (ψ²'s update then uses the
global quadratic mean) and the backward all-reduces ``[Σ x̂², Σ x̂ ⊙ g]`` (ν's
update then uses the global Γ and Λ of Algorithm 1), so every rank keeps the
statistics of one process that saw the concatenated batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from .masks import resolve_padding
from .modules import PowerNorm, SeqBatchNorm, _batch_padding
from .ops import TorchBackend, update_running_nu

__all__ = ["SyncSeqBatchNorm", "SyncPowerNorm", "merge_moments"]


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor):
    """Chan's parallel merge of per-rank ``(n, μ, M)`` in order.

    Args:
        counts: ``(W,)``; means, m2s: ``(W, D)`` — float64.

    Returns:
        ``(n, mean (D,), var (D,))`` with ``var = M/n`` biased (0 where n = 0).
    """
    n = torch.zeros((), dtype=torch.float64, device=means.device)
    mean = torch.zeros(means.shape[1], dtype=torch.float64, device=means.device)
    m2 = torch.zeros_like(mean)
    for r in range(counts.shape[0]):
        nb = counts[r]
        if nb == 0:
            continue
        total = n + nb
        delta = means[r] - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2s[r] + delta * delta * (n * nb / total)
        n = total
    var = m2 / n if n > 0 else m2
    return n, mean, var


def _local_moments(x: Tensor, pad: Optional[Tensor]):
    """Per-feature ``(n, μ, M)`` of the real rows of ``x (N, D)``, in float64."""
    x = x if pad is None else x.masked_fill(pad.unsqueeze(-1), 0)
    mean, var, count = TorchBackend.masked_moments(x.double(), pad)
    return count.double(), mean, var * count.double()


def _all_gather_flat(out: Tensor, inp: Tensor, group) -> None:
    """All-gather equal-sized ``inp`` from every rank into ``out`` (rank-major).

    torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single`` and
    deprecates the old name with a FutureWarning; use whichever this torch has.
    """
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


class _SyncFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pad, eps, group, world):
        ctx.set_materialize_grads(False)
        d = x.shape[1]
        n_l, mean_l, m2_l = _local_moments(x, pad)
        packed = torch.cat([n_l.reshape(1), mean_l, m2_l])                       # 2D+1
        gathered = torch.empty(world * packed.numel(), dtype=packed.dtype, device=packed.device)
        _all_gather_flat(gathered, packed, group)
        gathered = gathered.view(world, packed.numel())
        n, mean, var = merge_moments(gathered[:, 0], gathered[:, 1:1 + d], gathered[:, 1 + d:])
        rstd = torch.rsqrt(var + eps).to(x.dtype)                                 # D
        xhat = (x - mean.to(x.dtype)) * rstd                                      # N,D
        if pad is not None:
            xhat = xhat.masked_fill(pad.unsqueeze(-1), 0)
        y = xhat if weight is None else xhat * weight
        y = y if bias is None else y + bias
        if pad is not None:
            y = y.masked_fill(pad.unsqueeze(-1), 0)
        ctx.save_for_backward(xhat, rstd, weight, pad)
        ctx.n, ctx.group, ctx.has_bias = float(n), group, bias is not None
        stats = (mean.to(x.dtype), var.to(x.dtype), n)
        ctx.mark_non_differentiable(*stats)
        return (y,) + stats

    @staticmethod
    def backward(ctx, dy, *_):
        xhat, rstd, weight, pad = ctx.saved_tensors
        if dy is None:  # every rank must still join the collective below
            dy = torch.zeros_like(xhat)
        if pad is not None:
            dy = dy.masked_fill(pad.unsqueeze(-1), 0)
        dbeta = dy.sum(0)                                                         # local Σ dy
        dgamma = (dy * xhat).sum(0)                                               # local Σ dy·x̂
        sums = torch.cat([dbeta, dgamma]).double()
        dist.all_reduce(sums, group=ctx.group)
        d = dy.shape[1]
        if ctx.n > 0:
            c1 = (sums[:d] / ctx.n).to(dy.dtype)
            c2 = (sums[d:] / ctx.n).to(dy.dtype)
            g = dy - c1 - xhat * c2
        else:
            g = dy
        scale = rstd if weight is None else rstd * weight
        dx = g * scale
        if pad is not None:
            dx = dx.masked_fill(pad.unsqueeze(-1), 0)
        return (dx, dgamma if weight is not None else None, dbeta if ctx.has_bias else None,
                None, None, None, None)


def _world(process_group) -> int:
    """Ranks in ``process_group`` (1 without an initialized process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _sync_rows(module, input: Tensor, padding_mask, lengths):
    """Validate and flatten a sync module's input: ``(x, x2, pad1, cdt)`` with
    ``x`` batch-first, ``x2 (N, D)`` in the compute dtype (float32 for 16-bit
    input), ``pad1 (N,)`` or None."""
    x = module._to_batch_first(input)
    if x.dim() not in (2, 3):
        raise ValueError(f"{type(module).__name__} expects input of shape (B, T, D) or (N, D), got {x.dim()}-D "
                         f"input of shape {tuple(x.shape)}")
    padding_mask, lengths = _batch_padding(x, padding_mask, lengths)
    pad = resolve_padding(x.shape[:-1], x.device, padding_mask, lengths,
                          what="(B, T)" if x.dim() == 3 else "(N,)")
    cdt = F._compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1]).to(cdt)
    return x, x2, None if pad is None else pad.reshape(-1), cdt


def _swap(module: torch.nn.Module, source: type, target: type, make, buffers) -> torch.nn.Module:
    """``module`` with every ``source`` instance in it (itself included) replaced by
    ``make(m)``, a ``target`` sharing ``m``'s parameters and the named buffers."""
    out = module
    if isinstance(module, source) and not isinstance(module, target):
        out = make(module)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        for name in buffers:
            setattr(out, name, getattr(module, name))
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _swap(child, source, target, make, buffers))
    return out


class SyncSeqBatchNorm(SeqBatchNorm):
    r"""Padding-aware BatchNorm with statistics over every real token of every rank.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    with ``E`` and ``Var`` (biased) over the real tokens of the *global* batch:
    the concatenation of every rank's batch, whatever their sizes, lengths and
    padding. Running statistics (unbiased variance) are updated identically on
    every rank; a global batch with no real token changes nothing. Arguments,
    parameters and buffers are those of :class:`SeqBatchNorm` (and so of
    :class:`torch.nn.BatchNorm1d`) plus ``process_group``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias,
        batch_first: as :class:`SeqBatchNorm`.
        process_group: the group to synchronize over. Default: the world.

    Shape:
        - Input: ``(B, T, D)`` (or ``(T, B, D)``) or ``(N, D)``; ``padding_mask`` ``(B, T)``
        - Output: same as input; 0 at padding

    Example::

        >>> bn = SyncSeqBatchNorm(4)        # no process group: plain SeqBatchNorm
        >>> bn(torch.randn(2, 3, 4), lengths=torch.tensor([3, 1])).shape
        torch.Size([2, 3, 4])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None, device=None,
                 dtype=None, *, bias: bool = True, batch_first: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, batch_first=batch_first)
        self.process_group = process_group

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        world = _world(self.process_group)
        if not self.training or world == 1:
            return super().forward(input, padding_mask, lengths)
        x, x2, pad1, cdt = _sync_rows(self, input, padding_mask, lengths)
        y, mean, var, n = _SyncFunction.apply(x2, F._cast(self.weight, cdt), F._cast(self.bias, cdt), pad1, self.eps,
                                              self.process_group, world)
        n = int(n)
        if n == 1:  # every rank sees the same n, so every rank raises
            raise ValueError("SyncSeqBatchNorm: expected more than 1 real token per feature in the global "
                             "batch when training, got 1")
        if self.track_running_stats and n > 0:
            F.update_running_stats([(self.running_mean, mean), (self.running_var, var * (n / (n - 1)))],
                                   n, self.momentum, self.num_batches_tracked)
        return self._to_batch_first(y.to(input.dtype).reshape(x.shape))

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every :class:`SeqBatchNorm` in ``module`` by a SyncSeqBatchNorm
        sharing its parameters and buffers (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``)."""
        def make(m):
            return cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group,
                       bias=m.bias is not None, batch_first=m.batch_first)
        return _swap(module, SeqBatchNorm, cls, make, ("running_mean", "running_var", "num_batches_tracked"))


class _SyncPowerFunction(torch.autograd.Function):
    """PowerNorm's forward and Algorithm 1's backward with global statistics:
    one all_reduce of ``[n, Σ x²]`` forward, one of ``[Σ x̂², Σ x̂ ⊙ g]`` backward
    (the latter only when ν is kept); see
    :func:`seqnorm.reference.power_norm_backward` for the maths.

    ν is kept in the scale of the gradient DistributedDataParallel applies —
    the average over the ``W`` ranks of their gradients — so that it is the ν
    of one process minimizing the mean of the ranks' losses, whatever ``W``:
    ``Λ = Σ_ranks Σ x̂ ⊙ g / (W·n)``, and a rank's own (``W`` times larger)
    gradient subtracts ``W·ν ⊙ x̂``."""

    @staticmethod
    def forward(ctx, x, weight, bias, pad, running_phi, running_nu, eps, factor, group, world):
        ctx.set_materialize_grads(False)
        if pad is not None:
            x = x.masked_fill(pad.unsqueeze(-1), 0)
        count = torch.tensor([x.shape[0] if pad is None else int((~pad).sum())], dtype=torch.float64,
                             device=x.device)
        sums = torch.cat([count, x.double().square().sum(0)])                        # 1 + D
        dist.all_reduce(sums, group=group)
        n = sums[0]
        phi = sums[1:] / n.clamp_min(1)                                               # global ψ_B²
        rstd = torch.rsqrt(running_phi.to(x.dtype) + eps)                             # running ψ², as PowerNorm
        xhat = x * rstd
        if pad is not None:
            xhat = xhat.masked_fill(pad.unsqueeze(-1), 0)
        y = xhat if weight is None else xhat * weight
        y = y if bias is None else y + bias
        if pad is not None:
            y = y.masked_fill(pad.unsqueeze(-1), 0)
        ctx.save_for_backward(xhat, rstd, weight, pad)
        ctx.nu, ctx.factor, ctx.group, ctx.n, ctx.world = running_nu, factor, group, float(n), world
        ctx.has_bias = bias is not None
        phi = phi.to(x.dtype)
        ctx.mark_non_differentiable(phi, n)
        return y, phi, n

    @staticmethod
    def backward(ctx, dy, *_):
        xhat, rstd, weight, pad = ctx.saved_tensors
        nu = ctx.nu
        if dy is None:  # every rank must still join the collective below
            dy = torch.zeros_like(xhat)
        if pad is not None:
            dy = dy.masked_fill(pad.unsqueeze(-1), 0)
        g = dy if weight is None else dy * weight                                     # ∂L/∂x̂
        dweight = (dy * xhat).sum(0) if weight is not None else None                  # local: DDP reduces
        dbias = dy.sum(0) if ctx.has_bias else None
        if nu is not None:
            nu_prev = nu.to(g.dtype)                                                  # may be ν itself
            sums = torch.cat([(xhat * xhat).sum(0), (xhat * g).sum(0)]).double()
            g = g - ctx.world * nu_prev * xhat                                        # g̃, with ν before it moves
            dist.all_reduce(sums, group=ctx.group)
            if ctx.n > 0:  # a global batch of padding carries no information about ν
                d = xhat.shape[1]
                gamma, lam = sums[:d] / ctx.n, sums[d:] / (ctx.n * ctx.world)         # Γ, Λ over every rank
                update_running_nu(nu, nu_prev.double() * (1 - ctx.factor * gamma) + ctx.factor * lam, True)
        dx = g * rstd
        if pad is not None:
            dx = dx.masked_fill(pad.unsqueeze(-1), 0)
        return dx, dweight, dbias, None, None, None, None, None, None, None


class SyncPowerNorm(PowerNorm):
    r"""PowerNorm whose running statistics see every real token of every rank.

    .. math::
        y = \gamma \frac{x}{\sqrt{\psi^2 + \epsilon}} + \beta, \qquad
        \psi^2 \leftarrow (1 - m)\,\psi^2 + m\,\frac{\sum_{\text{ranks}} \sum_{\text{real}} x^2}
        {\sum_{\text{ranks}} n_r}

    PowerNorm divides by the running ψ² in training too, so each rank's output
    and input gradient need nothing from the others; the statistics do: ψ² is
    updated from the global batch's quadratic mean (one all_reduce in the
    forward) and ν, Algorithm 1's running gradient statistic, from the global
    means Γ = mean(x̂²) and Λ = mean(x̂ ⊙ γ∂L/∂y) (one all_reduce in the
    backward). Every rank then holds the buffers one process would hold after
    the concatenated batch, whatever the ranks' sizes, lengths and padding.
    Weight and bias gradients are local sums (DistributedDataParallel reduces
    them). ν, a statistic of the gradient, assumes DistributedDataParallel's
    convention — the applied gradient is the *average* of the ranks' — and is
    kept in that scale: it is the ν of one process minimizing the mean of the
    ranks' losses, so a checkpoint means the same on any number of ranks.
    Arguments, parameters and buffers are :class:`PowerNorm`'s plus
    ``process_group``; without a process group, with one rank, or in eval, it
    is :class:`PowerNorm`.

    Args:
        num_features, eps, momentum, affine, bias, batch_first: as :class:`PowerNorm`.
        process_group: the group to synchronize over. Default: the world.

    Shape:
        - Input: ``(B, T, D)`` (or ``(T, B, D)``) or ``(N, D)``; ``padding_mask`` ``(B, T)``
        - Output: same as input; 0 at padding

    Example::

        >>> pn = SyncPowerNorm(4)           # no process group: plain PowerNorm
        >>> pn(torch.randn(2, 3, 4), lengths=torch.tensor([3, 1])).shape
        torch.Size([2, 3, 4])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, process_group=None, device=None, dtype=None, *, bias: bool = True,
                 batch_first: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, bias=bias, batch_first=batch_first)
        self.process_group = process_group

    def forward(self, input: Tensor, padding_mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        world = _world(self.process_group)
        if not self.training or world == 1:
            return super().forward(input, padding_mask, lengths)
        x, x2, pad1, cdt = _sync_rows(self, input, padding_mask, lengths)
        # ν's update in the backward uses the weight ψ²'s update uses here (as power_norm)
        factor = self.momentum if self.momentum is not None else 1.0 / (int(self.num_batches_tracked) + 1)
        y, phi, n = _SyncPowerFunction.apply(x2, F._cast(self.weight, cdt), F._cast(self.bias, cdt), pad1,
                                             self.running_phi, self.running_nu, self.eps, factor,
                                             self.process_group, world)
        F.update_running_stats([(self.running_phi, phi)], int(n), self.momentum, self.num_batches_tracked)
        return self._to_batch_first(y.to(input.dtype).reshape(x.shape))

    @classmethod
    def convert_sync_powernorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every :class:`PowerNorm` in ``module`` by a SyncPowerNorm sharing
        its parameters and buffers."""
        def make(m):
            return cls(m.num_features, m.eps, m.momentum, m.affine, process_group, bias=m.bias is not None,
                       batch_first=m.batch_first)
        return _swap(module, PowerNorm, cls, make, ("running_phi", "running_nu", "num_batches_tracked"))
