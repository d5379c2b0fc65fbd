"""Running statistics: the one place they change.

Every batch-statistic norm (SeqBatchNorm, PowerNorm and their Sync variants),
on every backend, goes through these helpers:

* :func:`check_momentum` — ``None`` (cumulative average) or a float in [0, 1];
* :func:`momentum_factor` — the weight ``f`` of the new batch:
  ``momentum``, or ``1/(num_batches_tracked + 1)`` for ``momentum=None``;
* :func:`check_real_tokens` — training with exactly one real token is an error
  (its variance is undefined, as torch's "Expected more than 1 value per
  channel when training");
* :func:`update_running_stats` — the forward's update ``r ← (1 − f)·r + f·batch``;
  :func:`update_batch_norm_stats` stores BatchNorm's unbiased variance with it;
* :func:`nu_step` and :func:`update_running_nu` — PowerNorm's ν, which
  Algorithm 1 moves in the backward pass.

A batch with no real token changes nothing, and neither does a batch whose
statistics are NaN/Inf: they would poison the running statistics for good, so
it is skipped with a :class:`NonFiniteStatisticsWarning`.

**Without host synchronization.** On a GPU (any tensor not on the CPU) and
while ``torch.compile`` traces, reading a count or a finiteness flag back to
the host would stall the device (and break CUDA-graph capture), so the same
policy is a device-side select (:func:`sync_free`): the update is computed and
kept only where the batch had real tokens and finite statistics,
``num_batches_tracked`` moves by that flag, and the cumulative average's
factor is a tensor. Two things differ there, because both need the host: a
skipped batch raises no warning, and training on exactly one real token does
not raise — its variance is 0, it normalizes to the bias, and the running
statistics are left unchanged (BatchNorm's unbiased variance is undefined).
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch

__all__ = [
    "NonFiniteStatisticsWarning",
    "sync_free",
    "check_momentum",
    "momentum_factor",
    "check_real_tokens",
    "update_running_stats",
    "update_batch_norm_stats",
    "update_from_host_stats",
    "nu_step",
    "update_running_nu",
    "move_nu_from_sums",
]

Tensor = torch.Tensor


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A training batch had NaN/Inf statistics; the running statistics were kept."""


def sync_free(t) -> bool:
    """Whether the policy for ``t`` (a statistic or count) must not read data back
    to the host: ``t`` is on an accelerator, or torch.compile is tracing."""
    return torch.compiler.is_compiling() or (isinstance(t, Tensor) and not t.is_cpu)


def check_momentum(momentum) -> None:
    """``momentum`` must be None (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be None or a float in [0, 1], got {momentum!r}")


def momentum_factor(momentum: Optional[float], num_batches_tracked: Optional[Tensor]):
    """The weight of the new batch: ``momentum``, or for ``momentum=None`` the
    cumulative average's ``1/(num_batches_tracked + 1)`` (a 0-d tensor where
    :func:`sync_free`, a float elsewhere)."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if sync_free(num_batches_tracked):
        return 1.0 / (num_batches_tracked.double() + 1)
    return 1.0 / (int(num_batches_tracked) + 1)


def check_real_tokens(count, who: str) -> None:
    """Training needs more than one real token per feature (0 is allowed: the
    batch is all padding and changes nothing). Not checked where
    :func:`sync_free` (see the module docstring)."""
    if sync_free(count):
        return
    if int(count) == 1:
        raise ValueError(f"{who}: expected more than 1 real token per feature when training, got 1 "
                         f"(check padding_mask/lengths)")


def update_running_stats(pairs: List[Tuple[Tensor, Tensor]], count, momentum: Optional[float],
                         num_batches_tracked: Optional[Tensor] = None, min_count: int = 1) -> bool:
    """Move each running tensor of ``pairs`` (``(running, batch_value)``) to
    ``(1 − f)·running + f·batch`` with ``f`` = :func:`momentum_factor`.

    Nothing changes — neither the statistics nor ``num_batches_tracked`` — when
    the batch had fewer than ``min_count`` real tokens (``count``, an int or a
    0-d tensor), or when a batch statistic is NaN/Inf (with a
    :class:`NonFiniteStatisticsWarning`, shown once per call site). Returns
    whether the statistics were updated (where :func:`sync_free`, the update is
    a device-side select and this returns True).
    """
    if not pairs:
        return False
    if sync_free(count) or sync_free(pairs[0][1]):
        _select_update(pairs, count, momentum, num_batches_tracked, min_count)
        return True
    count = int(count)
    if count < min_count:
        return False
    if not all(_finite(v) for _, v in pairs):
        warnings.warn("seqnorm: a training batch has NaN/Inf statistics (NaN/Inf at real tokens); the running "
                      "statistics were left unchanged", NonFiniteStatisticsWarning, stacklevel=3)
        return False
    factor = momentum_factor(momentum, num_batches_tracked)
    with torch.no_grad():
        for running, value in pairs:
            running.lerp_(value.to(running.dtype), factor)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    return True


_INF = float("inf")


def _finite(t: Tensor) -> bool:
    """Whether every element of a CPU tensor is finite: max |t| (the ∞-norm, one op)
    is NaN or Inf exactly when some element is (it propagates NaN); ~8 µs less than
    ``isfinite().all()``, a composite of four ops, on a small tensor."""
    return t.numel() == 0 or math.isfinite(torch.linalg.vector_norm(t, _INF).item())


def update_from_host_stats(runnings: List[Tensor], values: List[Tensor], stats: Tensor,
                           momentum: Optional[float], num_batches_tracked: Optional[Tensor] = None) -> bool:
    """:func:`update_running_stats` for batch values that are already what the
    running tensors store (``values[i]`` for ``runnings[i]``, in its dtype),
    from a batch the caller knows has enough real tokens, where reading back
    costs no synchronization (not :func:`sync_free`): one finiteness check of
    ``stats``, a tensor that is finite exactly when the values are, and one
    fused ``lerp`` — the host time of a small training step (issue 16). The
    same skip and warning."""
    if not _finite(stats):
        warnings.warn("seqnorm: a training batch has NaN/Inf statistics (NaN/Inf at real tokens); the running "
                      "statistics were left unchanged", NonFiniteStatisticsWarning, stacklevel=4)
        return False
    factor = momentum_factor(momentum, num_batches_tracked)
    if True in [r.requires_grad for r in runnings]:
        with torch.no_grad():
            torch._foreach_lerp_(runnings, values, factor)
    else:
        torch._foreach_lerp_(runnings, values, factor)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return True


def _select_update(pairs, count, momentum, num_batches_tracked, min_count) -> None:
    """:func:`update_running_stats` as a device-side select (no host synchronization)."""
    with torch.no_grad():
        ok = torch.as_tensor(count, device=pairs[0][0].device) >= min_count
        for _, value in pairs:
            ok = ok & torch.isfinite(value).all()
        factor = momentum_factor(momentum, num_batches_tracked)
        for running, value in pairs:
            moved = running + (value.to(running.dtype) - running) * factor
            running.copy_(torch.where(ok, moved.to(running.dtype), running))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))


def update_batch_norm_stats(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
                            count, momentum: Optional[float],
                            num_batches_tracked: Optional[Tensor] = None) -> bool:
    """BatchNorm's update: the batch mean, and the *unbiased* variance
    ``var·n/(n − 1)`` as torch stores it (``count`` > 1, see :func:`check_real_tokens`)."""
    if sync_free(count) or sync_free(batch_var):
        n = torch.as_tensor(count, device=batch_var.device).to(batch_var.dtype)
        unbiased = batch_var * (n / (n - 1).clamp_min(1))
    else:
        count = int(count)
        unbiased = batch_var * (count / max(count - 1, 1))
    return update_running_stats([(running_mean, batch_mean), (running_var, unbiased)], count, momentum,
                                num_batches_tracked, min_count=2)


def nu_step(nu: Tensor, gamma: Tensor, lam: Tensor, factor: float) -> Tensor:
    r"""Algorithm 1's new ν (PowerNorm's running gradient statistic), in ``gamma``'s dtype:

    .. math::
        ν ← ν\,(1 − m\,Γ) + m\,Λ, \qquad Γ = \mathrm{mean}(\hat{x}^2),\quad
        Λ = \mathrm{mean}(\hat{x} ⊙ γ\,∂L/∂y)

    with the means over real tokens and ``m = factor`` (ψ²'s weight in the same
    step). Store it with :func:`update_running_nu`.
    """
    return nu.to(gamma.dtype) * (1 - factor * gamma) + factor * lam.to(gamma.dtype)


def update_running_nu(nu: Tensor, new: Tensor, has_tokens) -> None:
    """PowerNorm's ν ← ``new`` (:func:`nu_step`, or the reference's own).

    ν keeps its value when the batch had no real token (``has_tokens``: a bool,
    or a 0-d bool tensor) and when ``new`` is not finite — NaN/Inf at a real
    token, or in the gradient (a loss-scaling overflow step): ν would stay
    poisoned for good, so the update is skipped with a
    :class:`NonFiniteStatisticsWarning`, as :func:`update_running_stats` does
    for the forward's statistics.
    """
    with torch.no_grad():
        if sync_free(new) or sync_free(has_tokens):  # no data-dependent branch, no warning
            keep = torch.logical_not(torch.as_tensor(has_tokens, device=nu.device) & torch.isfinite(new).all())
            nu.copy_(torch.where(keep, nu, new.to(nu.dtype)))
            return
        if not bool(has_tokens):
            return
        if not bool(torch.isfinite(new).all()):
            warnings.warn("seqnorm: a PowerNorm backward had NaN/Inf gradient statistics (NaN/Inf at real tokens "
                          "or in the gradient); running_nu was left unchanged", NonFiniteStatisticsWarning,
                          stacklevel=2)
            return
        nu.copy_(new.to(nu.dtype))


def move_nu_from_sums(nu: Tensor, nu_before: Tensor, rstd: Tensor, batch_phi: Tensor, weight: Optional[Tensor],
                      dgamma: Tensor, count: Tensor, factor) -> None:
    """ν's step from what a PowerNorm kernel has at hand (the fused and triton
    backends): ``Γ = mean(x̂²) = r²·ψ_B²`` (``x̂ = x·r``) and
    ``Λ = mean(x̂ ⊙ w ⊙ dy) = w ⊙ dγ / n`` over the ``count`` real tokens, with
    ``dγ = Σ dy ⊙ x̂``; then :func:`nu_step` from ``nu_before`` (ν as of the
    forward) and :func:`update_running_nu`. An all-padding batch leaves ν alone."""
    with torch.no_grad():   # tensor ops only (no host read), so that tracing works
        n = count.to(dgamma.dtype)
        gamma = rstd * rstd * batch_phi
        lam = (dgamma if weight is None else weight.to(dgamma.dtype) * dgamma) / n.clamp_min(1)
        update_running_nu(nu, nu_step(nu_before, gamma, lam, factor), n > 0)
