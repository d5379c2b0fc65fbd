r"""Row I/O shared by the kernels, so that one kernel source serves float32,
float64, bfloat16 and float16.

The two 16-bit types reach the kernels as their raw bits, told apart by the
integer type (Numba computes in neither):

* **bfloat16 as ``uint16``** (NumPy has no bfloat16). bfloat16 is the top half
  of a float32, which makes both conversions cheap and exact to state:
  widen ``bits32 = bits16 << 16`` (exact, every bfloat16 is a float32); narrow
  with round to nearest, ties to even,
  ``bits16 = (bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16`` — the rounding
  torch's ``.to(torch.bfloat16)`` uses (NaN becomes torch's quiet NaN ``0x7FC0``).
* **float16 as ``int16``** (Numba has no CPU float16). The conversions are
  LLVM's own ``fpext half → float`` (exact) and ``fptrunc float → half`` (round
  to nearest, ties to even, overflow to ±Inf, subnormals kept): what NumPy's and
  torch's ``.half()`` give, bit for bit. They become the F16C instructions
  ``vcvtph2ps`` / ``vcvtps2ph`` (8 values per instruction); without F16C, LLVM
  would call runtime helpers that Numba's JIT need not find, so
  :data:`HALF_NATIVE` says whether this machine may use them, and the fused
  backend takes float16 only then (else functional casts it to float32).

A kernel asks for a row with :func:`in_row` and gets the row itself for a float
array, or the row widened into a float32 scratch row (:func:`scratch`, one per
chunk of rows, so it stays in cache) for a 16-bit array. Outputs go the same
way: :func:`out_row` (or :func:`over_row`, which writes over an input row already
widened) hands out the row or a scratch row, and :func:`commit` narrows the
scratch row into the output (a no-op for floats). The choice is made
when Numba compiles the kernel for the argument types (``overload``), so the
float32/float64 code is what it was without these helpers.
"""

import platform

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_NAN16 = 0x7FC0


def _half_native() -> bool:
    """Whether the code Numba generates here converts float16 in hardware:
    always on 64-bit Arm (FCVT); on x86-64 with F16C in the target CPU."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":  # e.g. a portable "generic" cache
        return "+f16c" in (numba.config.CPU_FEATURES or "")
    return bool(llvm.get_host_cpu_features().get("f16c", False))


#: True where the fused kernels read and write float16 themselves.
HALF_NATIVE = _half_native()


@intrinsic
def _half_to_float(typingctx, bits):
    """float16 bits (int16) → float32, exactly (``fpext``)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _float_to_half(typingctx, value):
    """float32 → float16 bits (int16), rounded to nearest, ties to even (``fptrunc``)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.int16(value), codegen


def scratch(a, n):  # pragma: no cover - replaced by the overload in jitted code
    """A float32 scratch row of ``n`` elements (as uint32 bits) for a 16-bit array; empty otherwise."""


def in_row(a, i, buf):  # pragma: no cover
    """Row ``i`` of ``a`` as floats: the row itself, or widened into ``buf``."""


def out_row(a, i, buf):  # pragma: no cover
    """Where to write row ``i`` of ``a``: the row itself, or ``buf`` (then :func:`commit`)."""


def over_row(a, i, row):  # pragma: no cover
    """Where to write row ``i`` of ``a`` when ``row`` — a row :func:`in_row` widened
    into a scratch row, done with once this row is written — may be overwritten:
    ``row`` itself for a 16-bit ``a`` (then :func:`commit` that scratch row), the
    row of ``a`` for a float ``a``. Handing back the very same array (not a second
    view of its scratch) lets LLVM see that each element is read before it is
    written in place, and vectorize; with two views it checks for overlap at run
    time, finds it, and takes the scalar loop (measured: ~15 % slower backward)."""


def own_row(a, row, spare):  # pragma: no cover
    """A float row the kernel may fill with something computed from ``row`` (a row
    of ``a`` from :func:`in_row`): ``row`` itself when it is a scratch row widened
    from a 16-bit ``a`` (in place, as :func:`over_row`), else ``spare`` — a float
    ``a``'s own row is an input and is never written."""


def commit(a, i, buf):  # pragma: no cover
    """Narrow ``buf`` into row ``i`` of a 16-bit ``a``; nothing for a float ``a``."""


def _is_bf16(a) -> bool:
    return isinstance(a, types.Array) and a.dtype == types.uint16


def _is_half(a) -> bool:
    return isinstance(a, types.Array) and a.dtype == types.int16


def _is_bits(a) -> bool:
    """A 16-bit array, read and written through a float32 scratch row."""
    return _is_bf16(a) or _is_half(a)


@overload(scratch, inline="always")
def _scratch(a, n):
    if _is_bits(a):
        return lambda a, n: np.empty(n, np.uint32)
    return lambda a, n: np.empty(0, np.uint32)


@overload(in_row, inline="always")
def _in_row(a, i, buf):
    if _is_half(a):
        def widen_half(a, i, buf):
            src, row = a[i], buf.view(np.float32)
            for j in range(src.shape[0]):
                row[j] = _half_to_float(src[j])
            return row
        return widen_half
    if _is_bf16(a):
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
    if _is_half(a):
        def narrow_half(a, i, buf):
            dst, row = a[i], buf.view(np.float32)
            for j in range(dst.shape[0]):
                dst[j] = _float_to_half(row[j])
        return narrow_half
    if _is_bf16(a):
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


@numba.njit(inline="always")
def zero_row(a, i, buf, zero):  # pragma: no cover - jitted
    """Row ``i`` of the output ``a`` set to ``zero`` (a padded row), through
    ``buf`` for a 16-bit ``a`` (then :func:`commit`); returns the row written."""
    row = out_row(a, i, buf)
    for j in range(row.shape[0]):  # element by element: a slice fill of the float32 view of a 16-bit
        row[j] = zero              # scratch row was lost (LLVM took the view and the bits as unrelated)
    return row


@numba.njit(inline="always")
def grad_rows(x, dy, dx, i, xbuf, gbuf):  # pragma: no cover - jitted
    """A backward kernel's row ``i``: ``x`` and ``dy`` as floats (:func:`in_row`),
    and where ``dx`` goes — over the widened ``dy`` (:func:`over_row`)."""
    xi = in_row(x, i, xbuf)
    di = in_row(dy, i, gbuf)
    return xi, di, over_row(dx, i, di)


@numba.njit(inline="always")
def zeroed(part, c, zero):  # pragma: no cover - jitted
    """Chunk ``c``'s row of a per-chunk partial-sums array, set to ``zero``."""
    row = part[c]
    for j in range(row.shape[0]):
        row[j] = zero
    return row
