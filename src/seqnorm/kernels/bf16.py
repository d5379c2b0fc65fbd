r"""Row-wise norms on bfloat16 tensors, read and written as bfloat16.

NumPy has no bfloat16, so a bfloat16 tensor reaches these kernels as its raw
``uint16`` bits. bfloat16 is the top half of a float32, which makes both
conversions cheap and exact to state:

* widen: ``bits32 = bits16 << 16`` — exact, every bfloat16 is a float32;
* narrow: round to nearest, ties to even —
  ``bits16 = (bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16`` — the rounding
  torch's ``.to(torch.bfloat16)`` uses (NaN becomes torch's quiet NaN ``0x7FC0``).

Each row is widened into a float32 scratch row that stays in cache, then the
float32 row kernels of :mod:`.rowwise` do the maths exactly as for a float32
input (float32 statistics and accumulation), and the result is narrowed once.
So memory sees 2 bytes per element each way, where casting the whole tensor to
float32 around the float32 kernels moved 2 + 4 + 4 + 2 (forward). With the
residual Add, the sum is formed in float32 and normalized exactly; the returned
sum is rounded, and the backward re-forms the exact sum from ``x`` and the
residual instead of reading the rounded one, so that it is the gradient of the
forward that ran.
"""

import numba as nb
import numpy as np

from . import FASTMATH, NCHUNK
from .rowwise import _row_backward, _row_forward

_NAN16 = 0x7FC0


@nb.njit(cache=True, inline="always")
def _widen(src, out):  # pragma: no cover - jitted
    """bfloat16 bits ``src (D,)`` uint16 → float32 bits ``out (D,)`` uint32."""
    for j in range(src.shape[0]):
        out[j] = np.uint32(src[j]) << np.uint32(16)


@nb.njit(cache=True, inline="always")
def _narrow(bits, out):  # pragma: no cover - jitted
    """float32 bits ``bits (D,)`` uint32 → bfloat16 bits ``out (D,)``, round to nearest even."""
    for j in range(bits.shape[0]):
        u = np.int64(bits[j])
        if (u & 0x7FFFFFFF) > 0x7F800000:
            out[j] = _NAN16
        else:
            out[j] = np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@nb.njit(cache=True, inline="always")
def _load_row(x, res, r, buf, fbuf, buf2, fbuf2, has_res):  # pragma: no cover - jitted
    """Row ``r`` of ``x`` (plus row ``r`` of ``res``), in float32, into ``fbuf``."""
    _widen(x[r], buf)
    if has_res:
        _widen(res[r], buf2)
        for j in range(fbuf.shape[0]):
            fbuf[j] += fbuf2[j]


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def forward(x, res, w, b, pad, k, center, y, s, shift, delta, rstd):  # pragma: no cover - jitted
    """x, y: (R, D) uint16 (bfloat16 bits); res, s: (R, D) with the residual Add,
    else (0, D); w, b: (D,) float32; pad: (R,) uint8; k: float32 constants;
    shift, delta, rstd: (R,) float32 out. Pads: y = 0 (s is written for every row)."""
    R, D = x.shape
    has_res = res.shape[0] > 0
    zero = k[3]
    size = (R + NCHUNK - 1) // NCHUNK
    for c in nb.prange(NCHUNK):
        buf = np.empty(D, np.uint32)
        fbuf = buf.view(np.float32)
        buf2 = np.empty(D, np.uint32)
        fbuf2 = buf2.view(np.float32)
        for r in range(c * size, min(R, (c + 1) * size)):
            _load_row(x, res, r, buf, fbuf, buf2, fbuf2, has_res)
            if has_res:
                _narrow(buf, s[r])
            if pad[r] or D == 0:
                for j in range(D):
                    y[r, j] = 0
                shift[r] = zero
                delta[r] = zero
                rstd[r] = zero
            else:
                shift[r], delta[r], rstd[r] = _row_forward(fbuf, fbuf, w, b, k, center)
                _narrow(buf, y[r])


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def backward(dy, x, res, ds, w, pad, shift, delta, rstd, k, center, dx, dw_part, db_part):  # pragma: no cover
    """dy, x, dx: (R, D) uint16; res: (R, D) uint16 or (0, D); ds: (R, D) uint16,
    the gradient of the returned sum ``s``, added to ``dx`` in float32 before the
    one rounding, or (0, D); w: (D,) float32; shift, delta, rstd: (R,) float32;
    dw_part, db_part: (NCHUNK, D) float32 out, one row of partial sums per fixed
    chunk of rows (deterministic, as in :func:`.rowwise.backward`). Padded rows:
    ``dx = ds`` (the residual stream passes through), else 0."""
    R, D = dy.shape
    has_res = res.shape[0] > 0
    has_ds = ds.shape[0] > 0
    zero = k[3]
    size = (R + NCHUNK - 1) // NCHUNK
    for c in nb.prange(NCHUNK):
        dwp = dw_part[c]
        dbp = db_part[c]
        for j in range(D):
            dwp[j] = zero
            dbp[j] = zero
        gbuf = np.empty(D, np.uint32)
        fg = gbuf.view(np.float32)
        buf = np.empty(D, np.uint32)
        fbuf = buf.view(np.float32)
        buf2 = np.empty(D, np.uint32)
        fbuf2 = buf2.view(np.float32)
        for r in range(c * size, min(R, (c + 1) * size)):
            if pad[r]:
                for j in range(D):
                    dx[r, j] = ds[r, j] if has_ds else 0
                continue
            _widen(dy[r], gbuf)
            _load_row(x, res, r, buf, fbuf, buf2, fbuf2, has_res)
            _row_backward(fg, fbuf, w, shift[r], delta[r], rstd[r], k, center, fg, dwp, dbp)
            if has_ds:
                _widen(ds[r], buf2)
                for j in range(D):
                    fg[j] += fbuf2[j]
            _narrow(gbuf, dx[r])
