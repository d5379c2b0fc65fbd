r"""Float64 NumPy reference for every normalization in seqnorm.

This module is the oracle: plain, slow, written to be read. Every other
implementation (the torch backend, the fused kernels) is tested against it.
It imports nothing but NumPy and knows nothing of torch or of the rest of the
package.

Conventions
-----------
* ``x`` has shape ``(..., D)``: the last axis holds the ``D`` features of one
  token. Row-wise norms (LayerNorm, RMSNorm) reduce over that axis;
  feature-wise norms (SeqBatchNorm, PowerNorm) reduce over every other axis.
* ``padding_mask`` has shape ``x.shape[:-1]`` and is ``True`` at padding
  (torch.nn.Transformer's ``src_key_padding_mask`` convention). A padded token
  never enters a statistic, its output is exactly 0 and its gradient is exactly
  0, whatever it contains (NaN included).
* Variances are biased (divide by the count ``n``), as in the note and torch.
* GroupNorm/InstanceNorm are the exception to "features last": they take
  torch's channels-first ``(B, C, T)`` with ``padding_mask`` ``(B, T)``.
* Every norm is the same two steps (as in Flax): :func:`statistics` (over
  which axes, which tokens) and :func:`normalize` (apply them). A norm is a
  choice of axes and of ``center``; its backward is :func:`normalize_backward`.

Every ``*_forward`` returns ``(y, cache)``; every ``*_backward(dy, cache)``
returns the gradients, in the style of llm.c's ``doc/layernorm``.

The backward of a normalization whose statistics are computed from the input
(``x̂ = (x − μ)·r``, ``r = 1/√(σ² + ε)``), with ``g = ∂L/∂x̂ = w ⊙ ∂L/∂y`` and
means taken over the ``n`` real elements of the reduced axes, is

.. math::
    \frac{\partial L}{\partial x} = r\,\bigl(g - c_1 - \hat{x}\,c_2\bigr),
    \qquad c_1 = \overline{g}, \quad c_2 = \overline{g \odot \hat{x}}

where ``c_1`` is dropped when the norm is not centred (RMSNorm) and both are
dropped when the statistics are constants (running statistics in eval mode).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "statistics",
    "normalize",
    "normalize_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "add_norm_forward",
    "add_norm_backward",
    "seq_batch_norm_forward",
    "seq_batch_norm_backward",
    "power_norm_forward",
    "power_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "running_update",
]


# ---------------------------------------------------------------------------
# The two shared steps
# ---------------------------------------------------------------------------


def real_tokens(x, padding_mask):
    """Float64 0/1 array of shape ``x.shape[:-1] + (1,)``: 1 at real tokens."""
    if padding_mask is None:
        return np.ones(x.shape[:-1] + (1,))
    return (~np.asarray(padding_mask, dtype=bool))[..., None].astype(np.float64)


def statistics(x, valid, axes, center=True):
    """Mean and biased variance of ``x`` over ``axes``, counting real tokens only.

    Two passes (mean first, then the mean of squared deviations) so that a large
    common offset does not cancel catastrophically as in E[x²] − E[x]².

    Args:
        x: ``(..., D)`` float64 array. Padded entries may hold anything.
        valid: 0/1 array broadcastable to ``x``; 1 marks a real token.
        axes: the reduced axes (``-1`` for row-wise, all but the last for
            feature-wise).
        center: if False, the mean is taken as 0 and the "variance" is the
            quadratic mean ``mean(x²)`` (RMSNorm, PowerNorm).

    Returns:
        ``(n, mean, var)``, each keeping the reduced axes with size 1. ``n`` is
        the number of real elements; where it is 0, mean and var are 0.
    """
    real = np.broadcast_to(valid, x.shape) > 0
    n = real.sum(axis=axes, keepdims=True).astype(np.float64)  # count of real entries
    safe_n = np.maximum(n, 1.0)  # an all-padding group has mean 0, var 0: no 0/0
    x = np.where(real, x, 0.0)  # padding never reaches a sum, even if NaN
    if center:
        mean = x.sum(axis=axes, keepdims=True) / safe_n
    else:
        mean = np.zeros_like(n)
    d = np.where(real, x - mean, 0.0)
    var = (d * d).sum(axis=axes, keepdims=True) / safe_n
    return n, mean, var


def normalize(x, mean, var, eps, valid):
    """``x̂ = (x − mean)/√(var + eps)``, exactly 0 at padding. Returns ``(x̂, r)``."""
    # An all-padding group has var 0; with eps = 0 its rstd is inf, but np.where
    # discards it. A *real* group with var + eps = 0 keeps its inf/NaN: that is the maths.
    with np.errstate(divide="ignore", invalid="ignore"):
        rstd = 1.0 / np.sqrt(var + eps)
        xhat = np.where(np.broadcast_to(valid, x.shape) > 0, (x - mean) * rstd, 0.0)
    return xhat, rstd


def affine(xhat, weight, bias, valid):
    """``y = w ⊙ x̂ + b`` at real tokens, 0 at padding (the bias is not added there)."""
    y = xhat.copy()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return np.where(np.broadcast_to(valid, y.shape) > 0, y, 0.0)


def normalize_backward(g, xhat, rstd, n, axes, valid, center=True, stats_from_input=True):
    """``∂L/∂x`` given ``g = ∂L/∂x̂`` (see the module docstring for the formula)."""
    real = np.broadcast_to(valid, g.shape) > 0
    g = np.where(real, g, 0.0)
    if stats_from_input:
        safe_n = np.maximum(n, 1.0)
        c2 = (g * xhat).sum(axis=axes, keepdims=True) / safe_n
        c1 = g.sum(axis=axes, keepdims=True) / safe_n if center else 0.0
        dx = rstd * (g - c1 - xhat * c2)
    else:
        dx = rstd * g
    return np.where(real, dx, 0.0)


def affine_backward(dy, xhat, weight, bias, valid, reduce_axes):
    """Returns ``(g, dweight, dbias)`` with ``g = w ⊙ dy`` the gradient at ``x̂``."""
    real = np.broadcast_to(valid, dy.shape) > 0
    dy = np.where(real, dy, 0.0)
    g = dy * weight if weight is not None else dy
    dweight = (dy * xhat).sum(axis=reduce_axes) if weight is not None else None
    dbias = dy.sum(axis=reduce_axes) if bias is not None else None
    return g, dweight, dbias


def _as64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _leading_axes(x):
    return tuple(range(x.ndim - 1))


# ---------------------------------------------------------------------------
# Row-wise: LayerNorm and RMSNorm (statistics of each token over its features)
# ---------------------------------------------------------------------------


def _rowwise_forward(x, weight, bias, eps, padding_mask, center):
    x, weight, bias = _as64(x), _as64(weight), _as64(bias)
    valid = real_tokens(x, padding_mask)                            # ...,1
    n, mean, var = statistics(x, valid, axes=-1, center=center)     # ...,1
    xhat, rstd = normalize(x, mean, var, eps, valid)                # ...,D / ...,1
    y = affine(xhat, weight, bias, valid)                           # ...,D
    cache = dict(xhat=xhat, rstd=rstd, n=n, valid=valid, weight=weight, bias=bias,
                 mean=mean, var=var, center=center)
    return y, cache


def _rowwise_backward(dy, cache):
    dy = _as64(dy)
    c = cache
    g, dweight, dbias = affine_backward(dy, c["xhat"], c["weight"], c["bias"], c["valid"],
                                        reduce_axes=_leading_axes(dy))
    dx = normalize_backward(g, c["xhat"], c["rstd"], c["n"], -1, c["valid"], center=c["center"])
    return dx, dweight, dbias


def layer_norm_forward(x, weight=None, bias=None, eps=1e-5, padding_mask=None):
    r"""LayerNorm of every token over its ``D`` features.

    ``y = (x − μ)/√(σ² + ε) ⊙ w + b`` with ``μ, σ²`` the mean and biased
    variance of the token's own features. The note: ``[[1,2],[3,4]]`` has row
    statistics μ = 1.5, 3.5 and σ² = 0.25, 0.25 and normalizes to
    ``[[-1, 1], [-1, 1]]``.
    """
    return _rowwise_forward(x, weight, bias, eps, padding_mask, center=True)


def layer_norm_backward(dy, cache):
    """Returns ``(dx, dweight, dbias)`` (``None`` for an absent parameter)."""
    return _rowwise_backward(dy, cache)


def rms_norm_forward(x, weight=None, eps=1e-6, padding_mask=None, offset=0.0):
    r"""RMSNorm: ``y = x/√(mean(x²) + ε) ⊙ (offset + w)``, the quadratic mean of each token.

    ``offset = 1`` is a zero-centred weight (Gemma's ``1 + w``): ``dw = Σ dy ⊙ x̂`` does not
    see it, the gradient at ``x̂`` is ``dy ⊙ (offset + w)``."""
    return _rowwise_forward(x, _offset(weight, offset), None, eps, padding_mask, center=False)


def _offset(weight, offset):
    return weight if weight is None or not offset else _as64(weight) + offset


def rms_norm_backward(dy, cache):
    """Returns ``(dx, dweight)``."""
    dx, dweight, _ = _rowwise_backward(dy, cache)
    return dx, dweight


def add_norm_forward(x, residual, weight=None, bias=None, eps=1e-5, padding_mask=None,
                     center=True, offset=0.0):
    """The note's "Add & Norm": ``s = x + residual``, ``y = norm(s)``. Returns ``(y, s, cache)``.
    ``offset``: RMSNorm's zero-centred weight (see :func:`rms_norm_forward`)."""
    s = _as64(x) + _as64(residual)
    y, cache = _rowwise_forward(s, _offset(weight, offset), bias, eps, padding_mask, center=center)
    return y, s, cache


def add_norm_backward(dy, cache, ds=None):
    """Returns ``(dx, dresidual, dweight, dbias)``.

    ``ds`` is the gradient flowing into the returned sum ``s`` (prenorm form);
    both inputs of the sum receive the same gradient.
    """
    dsum, dweight, dbias = _rowwise_backward(dy, cache)
    if ds is not None:
        dsum = dsum + _as64(ds)
    return dsum, dsum.copy(), dweight, dbias


# ---------------------------------------------------------------------------
# Feature-wise: SeqBatchNorm (statistics of each feature over all real tokens)
# ---------------------------------------------------------------------------


def seq_batch_norm_forward(x, weight=None, bias=None, eps=1e-5, padding_mask=None,
                           running_mean=None, running_var=None, use_batch_stats=True):
    r"""Masked BatchNorm of a ``(B, T, D)`` (or ``(N, D)``) batch of token vectors.

    Each feature ``d`` is normalized with the mean and biased variance of that
    feature over every *real* token in the batch (all sentences pooled, padding
    excluded): ``y = (x − μ_d)/√(σ_d² + ε) ⊙ w + b``. The note's batch
    ``[[[1,2],[3,4]], [[2,3],[1,4]]]`` pools four tokens for feature 0:
    μ = 1.75, σ² = 0.6875, σ = 0.8292.

    With ``use_batch_stats=False`` the given running statistics are used instead
    (eval mode) and the statistics are constants in the backward.

    The cache holds ``batch_mean``, ``batch_var`` (biased) and ``count`` (real
    tokens) of shape ``(D,)``, from which :func:`running_update` updates the
    running statistics.
    """
    x, weight, bias = _as64(x), _as64(weight), _as64(bias)
    axes = _leading_axes(x)
    valid = real_tokens(x, padding_mask)                                 # B,T,1
    n, mean, var = statistics(x, valid, axes=axes, center=True)          # 1,1,D
    if use_batch_stats:
        use_mean, use_var = mean, var
    else:
        use_mean, use_var = _as64(running_mean), _as64(running_var)      # D
    xhat, rstd = normalize(x, use_mean, use_var, eps, valid)             # B,T,D
    y = affine(xhat, weight, bias, valid)
    count = np.asarray(valid.sum(), dtype=np.float64)
    cache = dict(xhat=xhat, rstd=rstd, n=n, valid=valid, weight=weight, bias=bias,
                 use_batch_stats=use_batch_stats, count=count,
                 batch_mean=mean.reshape(-1), batch_var=var.reshape(-1))
    return y, cache


def seq_batch_norm_backward(dy, cache):
    """Returns ``(dx, dweight, dbias)``."""
    dy = _as64(dy)
    c = cache
    axes = _leading_axes(dy)
    g, dweight, dbias = affine_backward(dy, c["xhat"], c["weight"], c["bias"], c["valid"], axes)
    dx = normalize_backward(g, c["xhat"], c["rstd"], c["n"], axes, c["valid"], center=True,
                            stats_from_input=c["use_batch_stats"])
    return dx, dweight, dbias


def running_update(running, batch_value, factor):
    """Exponential moving average ``(1 − f)·running + f·batch`` (torch's momentum)."""
    return (1.0 - factor) * _as64(running) + factor * _as64(batch_value)


def unbiased(var, count):
    """Bessel-corrected variance ``var·n/(n − 1)``, as torch stores in ``running_var``."""
    return _as64(var) * count / (count - 1.0)


# ---------------------------------------------------------------------------
# PowerNorm (Shen et al., ICML 2020, Algorithm 1), exactly masked
# ---------------------------------------------------------------------------


def power_norm_forward(x, running_phi, weight=None, bias=None, eps=1e-5, padding_mask=None):
    r"""PowerNorm forward (the same in training and in eval).

    PowerNorm drops the mean and normalizes each feature by the *running*
    quadratic mean ``ψ²`` from the previous iteration, not by the batch's own
    statistic:

    .. math::
        ψ_B^2 = \frac{1}{n}\sum_{i\ \text{real}} x_i^2, \qquad
        \hat{X} = X / \sqrt{ψ_{t-1}^2 + ε}, \qquad Y = γ ⊙ \hat{X} + β

    and, in training, ``ψ_t² = α ψ_{t−1}² + (1 − α) ψ_B²`` afterwards (see
    :func:`running_update`, with ``factor = 1 − α``).

    The cache holds ``batch_phi`` (ψ_B², shape ``(D,)``) and ``count``.
    """
    x, weight, bias = _as64(x), _as64(weight), _as64(bias)
    axes = _leading_axes(x)
    valid = real_tokens(x, padding_mask)                                 # B,T,1
    n, _, batch_phi = statistics(x, valid, axes=axes, center=False)      # 1,1,D
    xhat, rstd = normalize(x, 0.0, _as64(running_phi), eps, valid)       # B,T,D / D
    y = affine(xhat, weight, bias, valid)
    count = np.asarray(valid.sum(), dtype=np.float64)
    cache = dict(xhat=xhat, rstd=rstd, n=n, valid=valid, weight=weight, bias=bias,
                 count=count, batch_phi=batch_phi.reshape(-1))
    return y, cache


def power_norm_backward(dy, cache, running_nu=None, factor=0.1):
    r"""PowerNorm's approximate backward (Algorithm 1), with the mask applied.

    .. math::
        g = γ ⊙ ∂L/∂Y, \quad \tilde{g} = g − ν_{t-1} ⊙ \hat{X}, \quad
        ∂L/∂X = \tilde{g} / \sqrt{ψ_{t-1}^2 + ε}

    .. math::
        Γ = \overline{\hat{x} ⊙ \hat{x}}, \quad Λ = \overline{\hat{x} ⊙ g}, \quad
        ν_t = ν_{t-1}\,(1 − (1 − α)Γ) + (1 − α)Λ

    with the means over real tokens only and ``1 − α = factor``. ``ν`` carries
    the part of the gradient that flows through the running statistic; with
    ``running_nu=None`` it is taken as 0 and the result is the exact gradient
    of the forward with ψ held constant.

    Returns ``(dx, dweight, dbias, new_nu)`` (``new_nu`` is None when
    ``running_nu`` is None, or when the batch has no real token, in which case
    ν is left unchanged by the caller).
    """
    dy = _as64(dy)
    c = cache
    axes = _leading_axes(dy)
    real = np.broadcast_to(c["valid"], dy.shape) > 0
    g, dweight, dbias = affine_backward(dy, c["xhat"], c["weight"], c["bias"], c["valid"], axes)
    xhat = c["xhat"]
    new_nu = None
    if running_nu is not None:
        nu = _as64(running_nu)                                           # D
        g_tilde = g - nu * xhat
        if c["count"] > 0:
            gamma = (xhat * xhat).sum(axis=axes) / c["count"]            # D
            lam = (xhat * g).sum(axis=axes) / c["count"]                 # D
            new_nu = nu * (1.0 - factor * gamma) + factor * lam
    else:
        g_tilde = g
    dx = np.where(real, g_tilde * c["rstd"], 0.0)
    return dx, dweight, dbias, new_nu


# ---------------------------------------------------------------------------
# GroupNorm / InstanceNorm (statistics of each sequence over its real time
# steps × the channels of a group), channels-first as torch's
# ---------------------------------------------------------------------------


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, padding_mask=None):
    r"""Masked GroupNorm of a channels-first ``(B, C, T)`` batch.

    The ``C`` channels fall into ``G = num_groups`` groups of ``C/G``
    consecutive channels; sequence ``b``'s group ``g`` is normalized with the
    mean and biased variance of its ``n_b = (C/G)·L_b`` real elements (``L_b``
    real time steps), never its padding:

    .. math::
        y_{bct} = \frac{x_{bct} - μ_{bg}}{\sqrt{σ^2_{bg} + ε}}\, w_c + b_c

    InstanceNorm is ``G = C``. Without padding this is ``torch.nn.GroupNorm``.
    The cache holds ``mean`` and ``var`` of shape ``(B, G)`` and ``count``,
    the real time steps of each sequence ``(B,)``.
    """
    x, weight, bias = _as64(x), _as64(weight), _as64(bias)
    B, C, T = x.shape
    G = int(num_groups)
    xg = x.reshape(B, G, C // G, T)                                      # B,G,Cg,T
    if padding_mask is None:
        valid = np.ones((B, 1, 1, T))
    else:
        valid = (~np.asarray(padding_mask, dtype=bool)).astype(np.float64).reshape(B, 1, 1, T)
    n, mean, var = statistics(xg, valid, axes=(2, 3), center=True)      # B,G,1,1
    xhat, rstd = normalize(xg, mean, var, eps, valid)                    # B,G,Cg,T
    w4 = None if weight is None else weight.reshape(1, G, C // G, 1)
    b4 = None if bias is None else bias.reshape(1, G, C // G, 1)
    y = affine(xhat, w4, b4, valid)
    cache = dict(xhat=xhat, rstd=rstd, n=n, valid=valid, weight=w4, bias=b4,
                 mean=mean.reshape(B, G), var=var.reshape(B, G), count=valid.reshape(B, T).sum(1))
    return y.reshape(B, C, T), cache


def group_norm_backward(dy, cache):
    """Returns ``(dx, dweight, dbias)``: the module docstring's formula with the
    means over each (sequence, group)'s real elements."""
    c = cache
    B, G, Cg, T = c["xhat"].shape
    dy = _as64(dy).reshape(B, G, Cg, T)
    g, dweight, dbias = affine_backward(dy, c["xhat"], c["weight"], c["bias"], c["valid"],
                                        reduce_axes=(0, 3))
    dx = normalize_backward(g, c["xhat"], c["rstd"], c["n"], (2, 3), c["valid"], center=True)
    flat = lambda a: None if a is None else a.reshape(G * Cg)  # noqa: E731
    return dx.reshape(B, G * Cg, T), flat(dweight), flat(dbias)
