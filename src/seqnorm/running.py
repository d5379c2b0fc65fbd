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
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch

__all__ = [
    "NonFiniteStatisticsWarning",
    "check_momentum",
    "momentum_factor",
    "check_real_tokens",
    "update_running_stats",
    "update_batch_norm_stats",
    "nu_step",
    "update_running_nu",
]

Tensor = torch.Tensor


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A training batch had NaN/Inf statistics; the running statistics were kept."""


def check_momentum(momentum) -> None:
    """``momentum`` must be None (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be None or a float in [0, 1], got {momentum!r}")


def momentum_factor(momentum: Optional[float], num_batches_tracked: Optional[Tensor]) -> float:
    """The weight of the new batch: ``momentum``, or for ``momentum=None`` the
    cumulative average's ``1/(num_batches_tracked + 1)``."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return 1.0 / (int(num_batches_tracked) + 1)


def check_real_tokens(count: int, who: str) -> None:
    """Training needs more than one real token per feature (0 is allowed: the
    batch is all padding and changes nothing)."""
    if count == 1:
        raise ValueError(f"{who}: expected more than 1 real token per feature when training, got 1 "
                         f"(check padding_mask/lengths)")


def update_running_stats(pairs: List[Tuple[Tensor, Tensor]], count: int, momentum: Optional[float],
                         num_batches_tracked: Optional[Tensor] = None) -> bool:
    """Move each running tensor of ``pairs`` (``(running, batch_value)``) to
    ``(1 − f)·running + f·batch`` with ``f`` = :func:`momentum_factor`.

    Nothing changes — neither the statistics nor ``num_batches_tracked`` — when
    the batch had no real token, or when a batch statistic is NaN/Inf (with a
    :class:`NonFiniteStatisticsWarning`, shown once per call site). Returns
    whether the statistics were updated.
    """
    if count <= 0 or not pairs:
        return False
    if not all(bool(torch.isfinite(v).all()) for _, v in pairs):
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


def update_batch_norm_stats(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
                            count: int, momentum: Optional[float],
                            num_batches_tracked: Optional[Tensor] = None) -> bool:
    """BatchNorm's update: the batch mean, and the *unbiased* variance
    ``var·n/(n − 1)`` as torch stores it (``count`` > 1, see :func:`check_real_tokens`)."""
    if count <= 1:
        return False
    return update_running_stats([(running_mean, batch_mean), (running_var, batch_var * (count / (count - 1)))],
                                count, momentum, num_batches_tracked)


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
        if torch.compiler.is_compiling():  # traced: no data-dependent branch, no warning
            keep = torch.logical_not(torch.as_tensor(has_tokens) & torch.isfinite(new).all())
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
