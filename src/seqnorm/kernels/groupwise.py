r"""Group-wise norms: masked GroupNorm (and InstanceNorm, one channel a group).

The input ``x`` is channels-first ``(B, C, T)`` seen as ``(B·C, T)`` rows —
one row per channel of a sequence — and ``pad`` is ``(B, T)``. Program
``p = b·G + g`` owns the ``C/G`` rows of sequence ``b``'s group ``g`` and its
``n = (C/G)·L_b`` real elements (``L_b`` = ``steps[b]``, the real steps).

Forward, as the row-wise kernels do it, over shifted values (``K`` = the
group's first real element, so a large common offset cancels before any sum):
each row's ``Σ(x − K)`` and ``Σ(x − K)²`` over its real steps in the compute
dtype, added across the group's rows in float64,

.. math::
    δ = \frac{1}{n}\sum (x - K), \qquad σ^2 = \frac{1}{n}\sum (x - K)^2 - δ^2,
    \qquad y = ((x - K) - δ)\,r\,w_c + b_c, \quad r = 1/\sqrt{σ^2 + ε}

A finite group whose squares overflow is summed again scaled by a power of two
``a ≤ max|x|`` (``K``, ``δ`` and ``σ²`` are then stored unscaled; see
:mod:`.rowwise`). Padded steps: ``y = 0``; an all-padding group stores 0.

Backward, with ``x̂ = ((x − K) − δ)·r`` and the per-channel sums over real steps
``β_c = Σ dy`` and ``γ_c = Σ dy·x̂`` (which are also ``db`` and ``dw``'s part
from this sequence):

.. math::
    c_1 = \frac{1}{n}\sum_c w_c β_c, \qquad c_2 = \frac{1}{n}\sum_c w_c γ_c, \qquad
    dx = r\,(w_c\,dy - c_1 - \hat{x}\,c_2)

``dw_part``/``db_part`` are ``(B, C)``: the caller adds them over ``B`` in
order, so the bits do not depend on the thread count.
"""

import math

import numba as nb
import numpy as np

from . import FASTMATH
from .rows import commit, grad_rows, in_row, out_row, scratch, zero_row


@nb.njit(fastmath=FASTMATH, cache=True, inline="always")
def _row_sums(xr, pr, sh, inv_a, zero):  # pragma: no cover - jitted
    """``Σ(x·inv_a − sh)`` and its squares over the real steps of one row."""
    s1 = zero
    s2 = zero
    for t in range(xr.shape[0]):
        d = xr[t] * inv_a - sh
        d = d if pr[t] == 0 else zero      # a select, not a multiply: NaN at a pad stays out
        s1 += d
        s2 += d * d
    return s1, s2


@nb.njit(fastmath=FASTMATH, cache=True, inline="always")
def _group_sums(x, r0, cg, pr, sh, inv_a, zero, buf):  # pragma: no cover - jitted
    """The group's two sums, each row's in the compute dtype, added in float64."""
    s1 = 0.0
    s2 = 0.0
    for c in range(cg):
        a, b = _row_sums(in_row(x, r0 + c, buf), pr, sh, inv_a, zero)
        s1 += a
        s2 += b
    return s1, s2


@nb.njit(fastmath=FASTMATH, cache=True)
def _group_amax(x, r0, cg, pr, zero, buf):  # pragma: no cover - jitted
    """Largest |x| at the group's real elements (NaN wins)."""
    amax = zero
    for c in range(cg):
        xr = in_row(x, r0 + c, buf)
        for t in range(xr.shape[0]):
            if pr[t] == 0:
                a = abs(xr[t])
                if not a <= amax:
                    amax = a
    return amax


@nb.njit(cache=True, inline="always")
def _sizes(x, pad, groups):  # pragma: no cover - jitted
    """``(T, B, C, C/G)`` of ``x (B·C, T)`` and ``pad (B, T)``."""
    R, T = x.shape
    B = pad.shape[0]
    C = R // B if B > 0 else 0
    return T, B, C, (C // groups if groups > 0 else 0)


@nb.njit(cache=True, inline="always")
def _zero_group(a, r0, cg, buf, zero):  # pragma: no cover - jitted
    """The group's rows of the output ``a`` set to 0 (an all-padding sequence)."""
    for c in range(cg):
        zero_row(a, r0 + c, buf, zero)
        commit(a, r0 + c, buf)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def forward(x, pad, w, b, groups, steps, k, y, shift, delta, rstd, mean64, var64):  # pragma: no cover
    """x, y: (B·C, T); pad: (B, T) uint8; w, b: (C,); steps: (B,) int64 real steps;
    k = [eps, 0, 1, 0]; shift, delta, rstd: (B·G,) out in the compute dtype;
    mean64, var64: (B·G,) float64 out (the biased variance)."""
    T, B, C, cg = _sizes(x, pad, groups)
    eps, one, zero = k[0], k[2], k[3]
    for p in nb.prange(B * groups):
        bi = p // groups
        r0 = bi * C + (p % groups) * cg
        buf, ybuf = scratch(x, T), scratch(x, T)
        pr = pad[bi]
        n = steps[bi] * cg
        if n == 0:
            _zero_group(y, r0, cg, ybuf, zero)
            shift[p], delta[p], rstd[p], mean64[p], var64[p] = zero, zero, zero, 0.0, 0.0
            continue
        t0 = 0
        while pr[t0] != 0:
            t0 += 1
        sh = in_row(x, r0, buf)[t0]
        s1, s2 = _group_sums(x, r0, cg, pr, sh, one, zero, buf)
        m = s1 / n
        var = max(s2 / n - m * m, 0.0)
        if not np.isfinite(var):        # rare: squares overflowed, or NaN/Inf in the group
            amax = _group_amax(x, r0, cg, pr, zero, buf)
            if np.isfinite(amax) and amax > zero:
                e = math.frexp(amax)[1] - 1
                c2 = np.empty(2, k.dtype)
                c2[0], c2[1] = math.ldexp(1.0, -e), sh * math.ldexp(1.0, -e)
                s1, s2 = _group_sums(x, r0, cg, pr, c2[1], c2[0], zero, buf)
                a = math.ldexp(1.0, e)
                m = s1 / n
                var = max(s2 / n - m * m, 0.0)
                m, var = m * a, var * a * a
        rs = 1.0 / math.sqrt(var + eps)
        shift[p], delta[p], rstd[p] = sh, m, rs
        mean64[p], var64[p] = sh + m, var
        dm, rsc = delta[p], rstd[p]      # in the compute dtype
        for c in range(cg):
            xr = in_row(x, r0 + c, buf)
            yr = out_row(y, r0 + c, ybuf)
            wc, bc = w[r0 - bi * C + c], b[r0 - bi * C + c]
            for t in range(T):
                v = ((xr[t] - sh) - dm) * rsc * wc + bc
                yr[t] = v if pr[t] == 0 else zero
            commit(y, r0 + c, ybuf)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def backward(dy, x, pad, w, groups, steps, shift, delta, rstd, k, dx, dw_part, db_part):  # pragma: no cover
    """dy, x, dx: (B·C, T); pad: (B, T) uint8; w: (C,); steps: (B,) int64;
    shift, delta, rstd: (B·G,); dw_part, db_part: (B, C) out (this sequence's
    ``Σ dy·x̂`` and ``Σ dy`` per channel). k = [0, 0, 1, 0]."""
    T, B, C, cg = _sizes(x, pad, groups)
    zero = k[3]
    for p in nb.prange(B * groups):
        bi = p // groups
        c0 = (p % groups) * cg
        r0 = bi * C + c0
        xbuf, gbuf = scratch(x, T), scratch(x, T)
        pr = pad[bi]
        n = steps[bi] * cg
        if n == 0:
            _zero_group(dx, r0, cg, gbuf, zero)
            for c in range(cg):
                dw_part[bi, c0 + c] = zero
                db_part[bi, c0 + c] = zero
            continue
        sh, dm, rs = shift[p], delta[p], rstd[p]
        c1 = 0.0
        c2 = 0.0
        for c in range(cg):
            xr = in_row(x, r0 + c, xbuf)
            gr = in_row(dy, r0 + c, gbuf)
            sb = zero
            sg = zero
            for t in range(T):
                real = pr[t] == 0
                g = gr[t]
                q = g * (((xr[t] - sh) - dm) * rs)
                sb += g if real else zero       # selects: NaN in a pad's x or dy stays out
                sg += q if real else zero
            dw_part[bi, c0 + c] = sg
            db_part[bi, c0 + c] = sb
            c1 += w[c0 + c] * sb
            c2 += w[c0 + c] * sg
        c1k = np.empty(2, k.dtype)
        c1k[0], c1k[1] = c1 / n, c2 / n
        m1, m2 = c1k[0], c1k[1]
        for c in range(cg):
            xr, gr, dxr = grad_rows(x, dy, dx, r0 + c, xbuf, gbuf)
            wc = w[c0 + c]
            for t in range(T):
                v = rs * (gr[t] * wc - m1 - (((xr[t] - sh) - dm) * rs) * m2)
                dxr[t] = v if pr[t] == 0 else zero
            commit(dx, r0 + c, gbuf)
