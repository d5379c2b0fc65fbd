r"""Row I/O shared by the kernels, so that one kernel source serves float32,
float64 and bfloat16.

NumPy has no bfloat16, so a bfloat16 tensor reaches the kernels as its raw
``uint16`` bits. bfloat16 is the top half of a float32, which makes both
conversions cheap and exact to state:

* widen: ``bits32 = bits16 << 16`` — exact, every bfloat16 is a float32;
* narrow: round to nearest, ties to even —
  ``bits16 = (bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16`` — the rounding
  torch's ``.to(torch.bfloat16)`` uses (NaN becomes torch's quiet NaN ``0x7FC0``).

A kernel asks for a row with :func:`in_row` and gets the row itself for a float
array, or the row widened into a float32 scratch row (:func:`scratch`, one per
chunk of rows, so it stays in cache) for a ``uint16`` array. Outputs go the same
way: :func:`out_row` (or :func:`over_row`, which writes over an input row already
widened) hands out the row or a scratch row, and :func:`commit` narrows the
scratch row into the output (a no-op for floats). The choice is made
when Numba compiles the kernel for the argument types (``overload``), so the
float32/float64 code is what it was without these helpers.
"""

import numpy as np
from numba import types
from numba.extending import overload

_NAN16 = 0x7FC0


def scratch(a, n):  # pragma: no cover - replaced by the overload in jitted code
    """A float32 scratch row of ``n`` elements (as uint32 bits) for a bfloat16 array; empty otherwise."""


def in_row(a, i, buf):  # pragma: no cover
    """Row ``i`` of ``a`` as floats: the row itself, or widened into ``buf``."""


def out_row(a, i, buf):  # pragma: no cover
    """Where to write row ``i`` of ``a``: the row itself, or ``buf`` (then :func:`commit`)."""


def over_row(a, i, row):  # pragma: no cover
    """Where to write row ``i`` of ``a`` when ``row`` — a row :func:`in_row` widened
    into a scratch row, done with once this row is written — may be overwritten:
    ``row`` itself for a bfloat16 ``a`` (then :func:`commit` that scratch row), the
    row of ``a`` for a float ``a``. Handing back the very same array (not a second
    view of its scratch) lets LLVM see that each element is read before it is
    written in place, and vectorize; with two views it checks for overlap at run
    time, finds it, and takes the scalar loop (measured: ~15 % slower backward)."""


def own_row(a, row, spare):  # pragma: no cover
    """A float row the kernel may fill with something computed from ``row`` (a row
    of ``a`` from :func:`in_row`): ``row`` itself when it is a scratch row widened
    from a bfloat16 ``a`` (in place, as :func:`over_row`), else ``spare`` — a float
    ``a``'s own row is an input and is never written."""


def commit(a, i, buf):  # pragma: no cover
    """Narrow ``buf`` into row ``i`` of a bfloat16 ``a``; nothing for a float ``a``."""


def _is_bits(a) -> bool:
    return isinstance(a, types.Array) and a.dtype == types.uint16


@overload(scratch, inline="always")
def _scratch(a, n):
    if _is_bits(a):
        return lambda a, n: np.empty(n, np.uint32)
    return lambda a, n: np.empty(0, np.uint32)


@overload(in_row, inline="always")
def _in_row(a, i, buf):
    if _is_bits(a):
        def widen(a, i, buf):
            src = a[i]
            for j in range(src.shape[0]):
                buf[j] = np.uint32(src[j]) << np.uint32(16)
            return buf.view(np.float32)
        return widen
    return lambda a, i, buf: a[i]


@overload(out_row, inline="always")
def _out_row(a, i, buf):
    if _is_bits(a):
        return lambda a, i, buf: buf.view(np.float32)
    return lambda a, i, buf: a[i]


@overload(over_row, inline="always")
def _over_row(a, i, row):
    if _is_bits(a):
        return lambda a, i, row: row
    return lambda a, i, row: a[i]


@overload(own_row, inline="always")
def _own_row(a, row, spare):
    if _is_bits(a):
        return lambda a, row, spare: row
    return lambda a, row, spare: spare


@overload(commit, inline="always")
def _commit(a, i, buf):
    if _is_bits(a):
        def narrow(a, i, buf):
            dst = a[i]
            for j in range(dst.shape[0]):
                u = np.int64(buf[j])
                if (u & 0x7FFFFFFF) > 0x7F800000:
                    dst[j] = _NAN16
                else:
                    dst[j] = np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
        return narrow
    return lambda a, i, buf: None
