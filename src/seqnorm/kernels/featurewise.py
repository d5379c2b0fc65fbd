r"""Feature-wise norms over the token axis: masked BatchNorm and PowerNorm.

``x`` is ``(N, D)`` (every token of a batch, flattened), ``pad`` is ``(N,)``.

Statistics (:func:`moments`). Rows are split into a fixed set of chunks; each
chunk sums shifted values over its real rows, with one shift ``K`` for every
chunk (the first real row), so that a large common offset cancels exactly:

.. math::
    n_c,\quad s_c = \sum_{i\in c} (x_i - K),\quad q_c = \sum_{i\in c} (x_i - K)^2
    \;\Rightarrow\; δ_c = s_c/n_c,\quad M_c = q_c - s_c^2/n_c

and the chunks are merged in order with Chan et al.'s parallel formula (in
float64): ``n = n_a + n_b``, ``Δ = δ_b − δ_a``, ``δ = δ_a + Δ n_b/n``,
``M = M_a + M_b + Δ² n_a n_b / n``. Then ``μ = K + δ`` and ``σ² = M/n``. A
finite feature whose squares overflow the compute dtype (float32 values near
1e20 and beyond) gets σ² Inf from the chunk sums; only such a feature is summed
again, in float64 and scaled by a power of two (``_column_moments_rescaled``).

Normalization (:func:`normalize`): ``y = ((x − K) − δ)·a + b`` with
``a = w/√(σ² + ε)``; 0 at padding.

Backward of BatchNorm in training (:func:`grad_sums`, :func:`bn_input_grad`),
with ``x̂ = ((x − K) − δ)·r`` and sums over real rows:

.. math::
    dβ = \sum dy,\quad dγ = \sum dy\,\hat{x},\quad
    dx = r\,w \Bigl(dy - \frac{dβ}{n} - \hat{x}\,\frac{dγ}{n}\Bigr)

and with running statistics (eval) ``dx = r·w·dy``.

PowerNorm (:func:`power_forward`, :func:`power_backward`): the forward is
``y = x·r·w + b`` with ``r = 1/√(ψ² + ε)`` for the running ψ², fused with the
per-chunk sums of ``x²`` that give the batch's ψ_B²; the backward is
``dx = (w·dy − ν·x̂)·r`` fused with the sums for ``dγ`` and ``dβ``.
"""

import math

import numba as nb
import numpy as np

from . import FASTMATH, NCHUNK
from .rows import commit, grad_rows, in_row, out_row, scratch, zero_row, zeroed


@nb.njit(cache=True)
def first_real_row(pad):  # pragma: no cover - jitted
    for i in range(pad.shape[0]):
        if not pad[i]:
            return i
    return -1


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _chunk_sums(x, pad, shift, k, n_part, s_part, q_part):  # pragma: no cover - jitted
    N, D = x.shape
    zero = k[3]
    nchunk = s_part.shape[0]
    size = (N + nchunk - 1) // nchunk
    for c in nb.prange(nchunk):
        sp, qp = zeroed(s_part, c, zero), zeroed(q_part, c, zero)
        n = 0
        xbuf = scratch(x, D)
        for i in range(c * size, min(N, (c + 1) * size)):
            if pad[i]:
                continue
            n += 1
            xi = in_row(x, i, xbuf)
            for j in range(D):
                d = xi[j] - shift[j]
                sp[j] += d
                qp[j] += d * d
        n_part[c] = n


@nb.njit(cache=True)
def _chan_merge(n_part, s_part, q_part, delta, var):  # pragma: no cover - jitted
    """Merge chunk (n, δ, M) in chunk order, in float64; writes δ and σ² = M/n."""
    nchunk, D = s_part.shape
    for j in range(D):
        n_a = 0.0
        d_a = 0.0
        m_a = 0.0
        for c in range(nchunk):
            n_b = float(n_part[c])
            if n_b == 0.0:
                continue
            s = float(s_part[c, j])
            d_b = s / n_b
            m_b = float(q_part[c, j]) - s * d_b
            n = n_a + n_b
            diff = d_b - d_a
            d_a = d_a + diff * n_b / n
            m_a = m_a + m_b + diff * diff * n_a * n_b / n
            n_a = n
        delta[j] = d_a
        var[j] = max(m_a / n_a, 0.0) if n_a > 0 else 0.0


@nb.njit(cache=True)
def moments(x, pad, k, nchunk, shift, delta, var):  # pragma: no cover - jitted
    """Per-feature statistics of the real rows: writes ``shift`` (K), ``delta``
    (δ, so μ = K + δ) and ``var`` (biased σ²); returns the count of real rows."""
    N, D = x.shape
    first = first_real_row(pad)
    if first >= 0:
        row = in_row(x, first, scratch(x, D))
        for j in range(D):
            shift[j] = row[j]
    else:
        for j in range(D):
            shift[j] = k[3]
    n_part = np.zeros(nchunk, np.int64)
    s_part = np.empty((nchunk, D), k.dtype)
    q_part = np.empty((nchunk, D), k.dtype)
    _chunk_sums(x, pad, shift, k, n_part, s_part, q_part)
    _chan_merge(n_part, s_part, q_part, delta, var)
    for j in range(D):
        if not np.isfinite(var[j]):  # rare: squares overflowed the compute dtype, or NaN/Inf
            _column_moments_rescaled(x, pad, shift, j, delta, var)
    return n_part.sum()


@nb.njit(cache=True)
def _column_moments_rescaled(x, pad, shift, j, delta, var):  # pragma: no cover - jitted
    """δ and σ² of feature ``j`` again, in float64 and scaled by a power of two
    ``a ≤ max|x − K| < 2a``, for a finite column whose squares overflowed
    (``[1e30, −1e30, …]`` in float32). A column holding NaN/Inf keeps its NaN."""
    N, D = x.shape
    xbuf = scratch(x, D)
    amax = 0.0
    for i in range(N):
        if not pad[i]:
            d = abs(float(in_row(x, i, xbuf)[j]) - float(shift[j]))
            if not d <= amax:
                amax = d
    if not np.isfinite(amax) or amax == 0.0:
        return
    inv_a = math.ldexp(1.0, 1 - math.frexp(amax)[1])
    n = 0
    s1 = 0.0
    for i in range(N):
        if not pad[i]:
            n += 1
            s1 += (float(in_row(x, i, xbuf)[j]) - float(shift[j])) * inv_a
    m = s1 / n
    s2 = 0.0
    for i in range(N):
        if not pad[i]:
            d = (float(in_row(x, i, xbuf)[j]) - float(shift[j])) * inv_a - m
            s2 += d * d
    delta[j] = m / inv_a
    var[j] = (s2 / n) / inv_a / inv_a


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def normalize(x, pad, shift, delta, scale, b, k, y):  # pragma: no cover - jitted
    """``y = ((x − K) − δ)·scale + b`` at real rows, 0 at padding."""
    N, D = x.shape
    zero = k[3]
    size = (N + NCHUNK - 1) // NCHUNK
    for c in nb.prange(NCHUNK):
        xbuf, ybuf = scratch(x, D), scratch(y, D)
        for i in range(c * size, min(N, (c + 1) * size)):
            if pad[i]:
                zero_row(y, i, ybuf, zero)
            else:
                yi = out_row(y, i, ybuf)
                xi = in_row(x, i, xbuf)
                for j in range(D):
                    yi[j] = ((xi[j] - shift[j]) - delta[j]) * scale[j] + b[j]
            commit(y, i, ybuf)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def grad_sums(dy, x, pad, shift, delta, rstd, k, dg_part, db_part):  # pragma: no cover - jitted
    """Per-chunk ``Σ dy·x̂`` and ``Σ dy`` over real rows (summed by the caller in order)."""
    N, D = x.shape
    zero = k[3]
    nchunk = dg_part.shape[0]
    size = (N + nchunk - 1) // nchunk
    for c in nb.prange(nchunk):
        gp, bp = zeroed(dg_part, c, zero), zeroed(db_part, c, zero)
        xbuf, gbuf = scratch(x, D), scratch(dy, D)
        for i in range(c * size, min(N, (c + 1) * size)):
            if pad[i]:
                continue
            xi = in_row(x, i, xbuf)
            di = in_row(dy, i, gbuf)
            for j in range(D):
                gp[j] += di[j] * (((xi[j] - shift[j]) - delta[j]) * rstd[j])
                bp[j] += di[j]


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def bn_input_grad(dy, x, pad, shift, delta, rstd, a, c1, c2, k, dx):  # pragma: no cover - jitted
    """``dx = a·dy − c1 − x̂·c2`` (a = r·w, c1 = a·dβ/n, c2 = a·dγ/n), 0 at padding."""
    N, D = x.shape
    zero = k[3]
    size = (N + NCHUNK - 1) // NCHUNK
    for c in nb.prange(NCHUNK):
        xbuf, gbuf = scratch(x, D), scratch(dy, D)   # dx is written over the widened dy
        for i in range(c * size, min(N, (c + 1) * size)):
            if pad[i]:
                zero_row(dx, i, gbuf, zero)
            else:
                xi, di, dxi = grad_rows(x, dy, dx, i, xbuf, gbuf)
                for j in range(D):
                    xh = ((xi[j] - shift[j]) - delta[j]) * rstd[j]
                    dxi[j] = a[j] * di[j] - c1[j] - xh * c2[j]
            commit(dx, i, gbuf)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def power_forward(x, pad, scale, b, k, y, n_part, q_part):  # pragma: no cover - jitted
    """``y = x·scale + b`` (scale = r·w) at real rows, 0 at padding; per-chunk
    count and ``Σ x²`` of the real rows (for ψ_B²)."""
    N, D = x.shape
    zero = k[3]
    nchunk = q_part.shape[0]
    size = (N + nchunk - 1) // nchunk
    for c in nb.prange(nchunk):
        qp = zeroed(q_part, c, zero)
        n = 0
        xbuf, ybuf = scratch(x, D), scratch(y, D)
        for i in range(c * size, min(N, (c + 1) * size)):
            if pad[i]:
                zero_row(y, i, ybuf, zero)
            else:
                n += 1
                yi = out_row(y, i, ybuf)
                xi = in_row(x, i, xbuf)
                for j in range(D):
                    v = xi[j]
                    qp[j] += v * v
                    yi[j] = v * scale[j] + b[j]
            commit(y, i, ybuf)
        n_part[c] = n


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def power_backward(dy, x, pad, w, rstd, nu, k, dx, dg_part, db_part):  # pragma: no cover - jitted
    """``dx = (w·dy − ν·x̂)·r`` with ``x̂ = x·r``; per-chunk ``Σ dy·x̂`` and ``Σ dy``."""
    N, D = x.shape
    zero = k[3]
    nchunk = dg_part.shape[0]
    size = (N + nchunk - 1) // nchunk
    for c in nb.prange(nchunk):
        gp, bp = zeroed(dg_part, c, zero), zeroed(db_part, c, zero)
        xbuf, gbuf = scratch(x, D), scratch(dy, D)   # dx is written over the widened dy
        for i in range(c * size, min(N, (c + 1) * size)):
            if pad[i]:
                zero_row(dx, i, gbuf, zero)
            else:
                xi, di, dxi = grad_rows(x, dy, dx, i, xbuf, gbuf)
                for j in range(D):
                    xh = xi[j] * rstd[j]
                    gp[j] += di[j] * xh
                    bp[j] += di[j]
                    dxi[j] = (w[j] * di[j] - nu[j] * xh) * rstd[j]
            commit(dx, i, gbuf)
