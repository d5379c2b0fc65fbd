r"""SyncSeqBatchNorm and SyncPowerNorm: the batch-statistic norms with statistics
over every process. This module holds their collectives only: the statistics,
the normalization and both backwards are the torch backend's one feature-wise
path (:mod:`seqnorm.backends.torch`), which calls the :class:`Collectives` hook
between statistics and normalization.

SyncSeqBatchNorm: in training, each rank computes, per feature, the count
``n_r`` of its real tokens, their mean ``μ_r`` and centred second moment
``M_r = Σ (x − μ_r)²``. One collective (an all-gather into one flat tensor of the packed ``[n_r, μ_r, M_r]``)
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

On the triton backend the hook's :meth:`Collectives.gather` exchanges each
rank's partial buffers whole (:mod:`seqnorm.backends.triton_kernels.sync`):
the partials kernel runs on a grid fixed by the device and the width, so the
buffers have the same size on every rank (ranks run the same device model),
and one finalize kernel merges the ranks in rank order (float64), applies the
running-statistics policy and forms the coefficients. A module call is then
the single-process budget plus one collective each way (issue 16):
SyncSeqBatchNorm 3 launches + all_gather forward, 3 + all_reduce backward;
SyncPowerNorm 2 + all_gather, 3 + all_reduce (``tests/test_launches_sync.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .backends.torch import StatsReduce, merge_moments
from .modules import FeaturewiseNorm, PowerNorm, SeqBatchNorm

__all__ = ["SyncSeqBatchNorm", "SyncPowerNorm", "Collectives", "merge_moments"]


def _all_gather_flat(out: Tensor, inp: Tensor, group) -> None:
    """All-gather equal-sized ``inp`` from every rank into ``out`` (rank-major).

    torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single`` and
    deprecates the old name with a FutureWarning; use whichever this torch has.
    """
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


class Collectives(StatsReduce):
    """The :class:`~seqnorm.backends.torch.StatsReduce` hook over a process group.

    ``moments``: one all-gather of every rank's packed ``[n, μ, M]`` (float64),
    merged in rank order with Chan's formula, so every rank gets the same bits.
    ``sums``: one all_reduce (float64). ``gather``: one all-gather of a flat
    buffer, rank-major (the triton backend's partials). ``world``: the group's
    size; ``rank``: this process's rank in it.
    """

    def __init__(self, group, world: int):
        self.group, self.world = group, world
        self.rank = dist.get_rank(group) if group is not None else dist.get_rank()

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` (the same size on each), rank-major ``(world, t.numel())``:
        the triton backend's sync path exchanges its partial buffers whole with it."""
        out = t.new_empty((self.world, t.numel()))
        _all_gather_flat(out.view(-1), t.reshape(-1), self.group)
        return out

    def moments(self, count, mean, var):
        d = mean.shape[0]
        n = count.to(torch.float64).reshape(1)
        packed = torch.cat([n, mean.double(), var.double() * n])                     # 2D+1
        gathered = torch.empty(self.world * packed.numel(), dtype=torch.float64, device=packed.device)
        _all_gather_flat(gathered, packed, self.group)
        gathered = gathered.view(self.world, packed.numel())
        return merge_moments(gathered[:, 0], gathered[:, 1:1 + d], gathered[:, 1 + d:])

    def sums(self, t):
        t = t.double()
        dist.all_reduce(t, group=self.group)
        return t


def _world(process_group) -> int:
    """Ranks in ``process_group`` (1 without an initialized process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _sync_reduce(module: FeaturewiseNorm) -> Optional[Collectives]:
    """The module's collectives while training in a group of several ranks, else None."""
    world = _world(module.process_group)
    return Collectives(module.process_group, world) if module.training and world > 1 else None


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
        batch_first, channels_first: as :class:`SeqBatchNorm`.
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
                 dtype=None, *, bias: bool = True, batch_first: bool = True, channels_first: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, batch_first=batch_first, channels_first=channels_first)
        self.process_group = process_group

    def stats_reduce(self):
        return _sync_reduce(self)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every :class:`SeqBatchNorm` in ``module`` by a SyncSeqBatchNorm
        sharing its parameters and buffers (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``)."""
        def make(m):
            return cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, process_group,
                       bias=m.bias is not None, batch_first=m.batch_first, channels_first=m.channels_first)
        return _swap(module, SeqBatchNorm, cls, make, ("running_mean", "running_var", "num_batches_tracked"))


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
        num_features, eps, momentum, affine, bias, batch_first, channels_first: as :class:`PowerNorm`.
        process_group: the group to synchronize over. Default: the world.

    Shape:
        As :class:`PowerNorm`'s: input ``(B, T, D)`` (or ``(T, B, D)``) or ``(N, D)``, ``padding_mask``
        ``(B, T)``; output the shape of the input, 0 at padding.

    Example::

        >>> pn = SyncPowerNorm(4)           # no process group: plain PowerNorm
        >>> y = pn(torch.randn(2, 3, 4), lengths=torch.tensor([3, 1]))
        >>> y.shape, int(pn.num_batches_tracked)     # ψ² moved once, from the 4 real tokens
        (torch.Size([2, 3, 4]), 1)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, process_group=None, device=None, dtype=None, *, bias: bool = True,
                 batch_first: bool = True, channels_first: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, bias=bias, batch_first=batch_first,
                         channels_first=channels_first)
        self.process_group = process_group

    def stats_reduce(self):
        return _sync_reduce(self)

    @classmethod
    def convert_sync_powernorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every :class:`PowerNorm` in ``module`` by a SyncPowerNorm sharing
        its parameters and buffers."""
        def make(m):
            return cls(m.num_features, m.eps, m.momentum, m.affine, process_group, bias=m.bias is not None,
                       batch_first=m.batch_first, channels_first=m.channels_first)
        return _swap(module, PowerNorm, cls, make, ("running_phi", "running_nu", "num_batches_tracked"))
