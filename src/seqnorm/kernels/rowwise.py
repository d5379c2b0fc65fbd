r"""Row-wise norms: LayerNorm and RMSNorm, with or without the residual Add.

Forward, for every real row ``r`` (``s = x + res`` when fused with the Add),
in one reduction pass over shifted values (shift ``K = s_0``, the row's first
element, so that a large common offset cancels exactly before any sum):

.. math::
    δ = \frac{1}{D}\sum_j (s_j - K), \qquad
    σ^2 = \frac{1}{D}\sum_j (s_j - K)^2 - δ^2, \qquad μ = K + δ

then ``x̂ = ((s − K) − δ)·r`` with ``r = 1/√(σ² + ε)`` and ``y = x̂·w + b``.
``(s − K)`` is exact for values within a factor 2 of each other (Sterbenz), so
an offset of 1e4 costs float32 no accuracy. RMSNorm: ``K = δ = 0``,
``σ² = mean(s²)``. The kernel stores ``K`` and ``δ`` per row for the backward.

Backward, with ``x̂ = (s − μ)·r`` and ``g = w ⊙ dy``:

.. math::
    c_1 = \frac{1}{D}\sum_j g_j, \qquad c_2 = \frac{1}{D}\sum_j g_j \hat{x}_j, \qquad
    ds = r\,(g - c_1 - \hat{x}\,c_2)

(``c_1 = 0`` for RMSNorm), ``dw = Σ_r dy ⊙ x̂``, ``db = Σ_r dy``.
"""

import numba as nb
import numpy as np

from . import FASTMATH


@nb.njit(fastmath=FASTMATH, cache=True, inline="always")
def _row_forward(src, yr, w, b, k, center):  # pragma: no cover - jitted
    """Normalize one real row ``src (D,)`` into ``yr``; returns ``(K, δ, r)``."""
    D = src.shape[0]
    eps, inv_d, one, zero = k[0], k[1], k[2], k[3]
    sh = src[0] if center else zero
    s1 = zero
    s2 = zero
    for j in range(D):
        d = src[j] - sh
        s1 += d
        s2 += d * d
    m = s1 * inv_d if center else zero
    var = s2 * inv_d - m * m
    if var < zero:  # rounding can give a tiny negative; NaN fails the test and stays NaN
        var = zero
    rs = one / np.sqrt(var + eps)
    for j in range(D):
        yr[j] = ((src[j] - sh) - m) * rs * w[j] + b[j]
    return sh, m, rs


@nb.njit(fastmath=FASTMATH, cache=True, inline="always")
def _padded_row(yr, shift, delta, rstd, r, zero):  # pragma: no cover - jitted
    """A padded row: output 0 and zero statistics (never read by the backward)."""
    for j in range(yr.shape[0]):
        yr[j] = zero
    shift[r] = zero
    delta[r] = zero
    rstd[r] = zero


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def forward(x, w, b, pad, k, center, y, shift, delta, rstd):  # pragma: no cover - jitted
    """x, y: (R, D); w, b: (D,); pad: (R,) uint8; shift, delta, rstd: (R,) out. Pads: y = 0."""
    R, D = x.shape
    for r in nb.prange(R):
        if pad[r] or D == 0:
            _padded_row(y[r], shift, delta, rstd, r, k[3])
        else:
            shift[r], delta[r], rstd[r] = _row_forward(x[r], y[r], w, b, k, center)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def add_forward(x, res, w, b, pad, k, center, y, s, shift, delta, rstd):  # pragma: no cover - jitted
    """As :func:`forward` on ``s = x + res``, which is also written out (every
    row, padding included: the residual stream is not normalized)."""
    R, D = x.shape
    for r in nb.prange(R):
        sr = s[r]
        xr = x[r]
        rr = res[r]
        for j in range(D):
            sr[j] = xr[j] + rr[j]
        if pad[r] or D == 0:
            _padded_row(y[r], shift, delta, rstd, r, k[3])
        else:
            shift[r], delta[r], rstd[r] = _row_forward(sr, y[r], w, b, k, center)


@nb.njit(fastmath=FASTMATH, cache=True, inline="always")
def _row_backward(dyr, src, w, sh, m, rs, k, center, dxr, dwp, dbp):  # pragma: no cover - jitted
    D = src.shape[0]
    inv_d, zero = k[1], k[3]
    c1 = zero
    c2 = zero
    for j in range(D):
        xh = ((src[j] - sh) - m) * rs
        g = dyr[j] * w[j]
        c1 += g
        c2 += g * xh
        dwp[j] += dyr[j] * xh
        dbp[j] += dyr[j]
    c1 = c1 * inv_d if center else zero
    c2 = c2 * inv_d
    for j in range(D):
        xh = ((src[j] - sh) - m) * rs
        dxr[j] = rs * (dyr[j] * w[j] - c1 - xh * c2)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def backward(dy, src, w, pad, shift, delta, rstd, k, center, dx, dw_part, db_part):  # pragma: no cover
    """dy, src, dx: (R, D); w: (D,); shift, delta, rstd: (R,); dw_part, db_part: (NCHUNK, D) out.

    ``src`` is the normalized input (``x``, or ``s = x + res``). Each chunk of
    rows accumulates its own partials; the caller adds them in chunk order.
    """
    R, D = dy.shape
    zero = k[3]
    nchunk = dw_part.shape[0]
    size = (R + nchunk - 1) // nchunk
    for c in nb.prange(nchunk):
        dwp = dw_part[c]
        dbp = db_part[c]
        for j in range(D):
            dwp[j] = zero
            dbp[j] = zero
        for r in range(c * size, min(R, (c + 1) * size)):
            if pad[r]:
                for j in range(D):
                    dx[r, j] = zero
            else:
                _row_backward(dy[r], src[r], w, shift[r], delta[r], rstd[r], k, center, dx[r], dwp, dbp)
