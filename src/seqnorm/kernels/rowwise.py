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

A finite row whose squares overflow (``[1e30, −1e30, 0, 1]`` in float32: the sum
of squares is Inf, σ² NaN) is normalized a second time, scaled by the power of
two ``a = 2^e ≤ max|s_j| < 2a``: the statistics of ``s/a`` are finite, and
``x̂`` does not depend on the scale (``x̂ = (s/a − μ/a)/√(σ²/a² + ε/a²)``).
``K``, ``δ`` and ``r`` are stored unscaled (``a·K'``, ``a·δ'``, ``r'/a``; exact,
``a`` being a power of two), so the backward is the same code; it is finite
while the row's differences are (``|s| < 2^126`` in float32). Only such a row
pays for it — a normal row's only extra work is one test of σ²; NaN and Inf in
a row still give NaN.

Backward, with ``x̂ = (s − μ)·r`` and ``g = w ⊙ dy``:

.. math::
    c_1 = \frac{1}{D}\sum_j g_j, \qquad c_2 = \frac{1}{D}\sum_j g_j \hat{x}_j, \qquad
    ds = r\,(g - c_1 - \hat{x}\,c_2)

(``c_1 = 0`` for RMSNorm), ``dw = Σ_r dy ⊙ x̂``, ``db = Σ_r dy``.
"""

import math

import numba as nb
import numpy as np

from . import FASTMATH, NCHUNK
from .rows import commit, grad_rows, in_row, out_row, over_row, own_row, scratch, zero_row, zeroed


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
    if not np.isfinite(var):  # rare: squares overflowed, or NaN/Inf in the row
        amax = zero
        for j in range(D):
            a = abs(src[j])
            if not a <= amax:  # NaN wins, so a NaN row keeps its NaN
                amax = a
        if np.isfinite(amax) and amax > zero:
            return _row_forward_rescaled(src, yr, w, b, k, center, amax)
    rs = one / np.sqrt(var + eps)
    for j in range(D):
        yr[j] = ((src[j] - sh) - m) * rs * w[j] + b[j]
    return sh, m, rs


@nb.njit(fastmath=FASTMATH, cache=True)
def _row_forward_rescaled(src, yr, w, b, k, center, amax):  # pragma: no cover - jitted
    """:func:`_row_forward` of a finite row scaled by ``a = 2^e ≥ amax`` (see the
    module docstring); the returned statistics are the unscaled ones."""
    D = src.shape[0]
    eps, inv_d, one, zero = k[0], k[1], k[2], k[3]
    e = math.frexp(amax)[1] - 1              # 2^e ≤ amax < 2^(e+1): |s/a| < 2, and a = 2^e is finite
    c = np.empty(3, k.dtype)                 # the constants in the compute dtype
    c[0], c[1], c[2] = math.ldexp(1.0, -e), math.ldexp(1.0, e), math.ldexp(eps, -2 * e)
    inv_a, a, eps_a = c[0], c[1], c[2]
    sh = src[0] * inv_a if center else zero
    s1 = zero
    s2 = zero
    for j in range(D):
        d = src[j] * inv_a - sh
        s1 += d
        s2 += d * d
    m = s1 * inv_d if center else zero
    var = s2 * inv_d - m * m
    if var < zero:
        var = zero
    rs = one / np.sqrt(var + eps_a)
    for j in range(D):
        yr[j] = ((src[j] * inv_a - sh) - m) * rs * w[j] + b[j]
    return sh * a, m * a, rs * inv_a


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def forward(x, res, w, b, pad, k, center, y, s, shift, delta, rstd):  # pragma: no cover - jitted
    """x, y: (R, D); res: (R, D) with the residual Add, else (0, D); s: (R, D) to
    write the sum out, else (0, D); w, b: (D,); pad: (R,) uint8; shift, delta,
    rstd: (R,) out. Pads: y = 0.

    With the residual, ``s = x + res`` is formed in the compute dtype, written out
    for every row when asked (padding included: the residual stream is not
    normalized), and normalized as formed — for 16-bit inputs the exact float32 sum,
    not the rounded one that is returned."""
    R, D = x.shape
    has_res, has_s = res.shape[0] > 0, s.shape[0] > 0
    zero = k[3]
    size = (R + NCHUNK - 1) // NCHUNK
    for c in nb.prange(NCHUNK):
        # Two scratch rows (16-bit inputs only; empty otherwise), each serving twice, so that
        # with the rows of x, res, y and s they stay within L1: the sum overwrites the
        # widened x in place, and y takes the widened residual's place once it is used.
        xbuf, rbuf = scratch(x, D), scratch(x, D)
        total = np.empty(D if has_res and not has_s else 0, k.dtype)   # the sum, when not written out
        for r in range(c * size, min(R, (c + 1) * size)):
            xr = in_row(x, r, xbuf)
            if has_res:
                rr = in_row(res, r, rbuf)
                sr = over_row(s, r, xr) if has_s else own_row(x, xr, total)
                for j in range(D):
                    sr[j] = xr[j] + rr[j]
                if has_s:
                    commit(s, r, xbuf)
            yr = out_row(y, r, rbuf)
            if pad[r] or D == 0:  # statistics 0: never read by the backward
                for j in range(D):
                    yr[j] = zero
                shift[r] = zero
                delta[r] = zero
                rstd[r] = zero
            elif has_res:  # two calls, not one on a reassigned row: see backward
                shift[r], delta[r], rstd[r] = _row_forward(sr, yr, w, b, k, center)
            else:
                shift[r], delta[r], rstd[r] = _row_forward(xr, yr, w, b, k, center)
            commit(y, r, rbuf)


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
def backward(dy, x, res, ds, w, pad, shift, delta, rstd, k, center, dx, dw_part, db_part):  # pragma: no cover
    """dy, x, dx: (R, D); res: (R, D) or (0, D); ds: (R, D) or (0, D); w: (D,);
    shift, delta, rstd: (R,); dw_part, db_part: (NCHUNK, D) out.

    ``x`` is what the forward normalized — or, with ``res``, one addend of it:
    the sum is re-formed here in the compute dtype (16-bit inputs keep both addends
    rather than the rounded sum). ``ds``, the gradient of the returned sum, is
    added to ``dx`` before it is stored (at padding ``dx = ds``: the residual
    stream passes through). Each chunk of rows accumulates its own partials; the
    caller adds them in chunk order.
    """
    R, D = dy.shape
    has_res, has_ds = res.shape[0] > 0, ds.shape[0] > 0
    zero = k[3]
    size = (R + NCHUNK - 1) // NCHUNK
    for c in nb.prange(NCHUNK):
        dwp, dbp = zeroed(dw_part, c, zero), zeroed(db_part, c, zero)
        # Scratch rows (16-bit inputs only) serve twice, to stay within L1: dx is written over
        # the widened dy (element by element, after it is read), ds over the residual.
        gbuf, xbuf, rbuf = scratch(dy, D), scratch(dy, D), scratch(dy, D)
        total = np.empty(D if has_res else 0, k.dtype)
        for r in range(c * size, min(R, (c + 1) * size)):
            if pad[r]:
                dxr = zero_row(dx, r, gbuf, zero)
            else:
                xr, g, dxr = grad_rows(x, dy, dx, r, xbuf, gbuf)
                # two calls rather than one on a reassigned row: LLVM then knows which
                # array each call reads (a merged pointer costs ~15 % in vectorization)
                if has_res:
                    rr = in_row(res, r, rbuf)
                    sr = own_row(x, xr, total)
                    for j in range(D):
                        sr[j] = xr[j] + rr[j]
                    _row_backward(g, sr, w, shift[r], delta[r], rstd[r], k, center, dxr, dwp, dbp)
                else:
                    _row_backward(g, xr, w, shift[r], delta[r], rstd[r], k, center, dxr, dwp, dbp)
            if has_ds:
                dsr = in_row(ds, r, rbuf)
                for j in range(D):
                    dxr[j] += dsr[j]
            commit(dx, r, gbuf)
