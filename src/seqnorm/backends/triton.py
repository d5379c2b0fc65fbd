"""The triton backend: the kernels of :mod:`.triton_kernels` as custom ops with autograd
(:mod:`.custom_ops`: ``torch.compile(fullgraph=True)`` sees ordinary ops).

It runs CUDA tensors of float32, bfloat16 and float16 (read and written as
they are, computed in float32) with up to 65,536 features per row; the chooser
hands anything else to the torch backend. With ``TRITON_INTERPRET=1`` Triton
runs the same kernels on CPU tensors (slowly): that is how the test suite
checks them without a GPU — ``seqnorm.use_backend("triton")`` on CPU tensors
is then this backend, and ``"auto"`` keeps CPU tensors on the fused kernels.

See :mod:`seqnorm.backends` for the contract. A padded row is never read;
parameter gradients and feature statistics are reduced from per-program
partials in a fixed order (the same bits on every run).

Launches per call (the budget of issue 16, checked by ``tests/test_launches.py``):
a row-wise norm is one forward kernel and a backward kernel plus the finalize
of its parameter gradients; a batch-statistics norm is partials → one
finalize kernel (Chan's merge, the running statistics' device-side select,
counters, the cumulative factor, PowerNorm's ν, coefficients) → normalize.
Parameters are read in their own dtype and their gradients written in it;
partial buffers are written whole by their programs (no zero fill).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch
import triton  # noqa: F401  (the backend needs Triton: without it this import fails and the backend is unavailable)

from ..running import nu_step, update_running_nu
from . import backend_named, register_backend
from .custom_ops import BackwardOp, ForwardOp
from .triton_kernels import featurewise, groupwise, partials, rowwise, sync
from .triton_kernels.launch import cached_kernels

# every launch goes through a handle cached per specialization (.triton_kernels.launch)
fk, gk, pk, rk, sk = (cached_kernels(m) for m in (featurewise, groupwise, partials, rowwise, sync))

__all__ = ["TritonBackend", "supports", "MAX_FEATURES"]

Tensor = torch.Tensor

#: the longest row the row-wise kernels hold in registers
MAX_FEATURES = 1 << 16
#: the dtypes the kernels read and write
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: whether Triton runs kernels on CPU tensors (read once: Triton decides at import too)
_INTERPRETING = interpreting()


def supports(x: Tensor) -> bool:
    """Whether the kernels run ``x``: rows ``(R, D)`` with ``D`` ≤ :data:`MAX_FEATURES`
    (held in registers), or a group-wise ``(B, C, T)`` of any ``T`` (read in blocks)."""
    on_device = x.is_cuda or (_INTERPRETING and x.is_cpu)
    return on_device and x.dtype in DTYPES and (x.dim() == 3 or x.shape[-1] <= MAX_FEATURES)


def _pow2(n: int) -> int:
    """The least power of 2 ≥ ``n`` (``triton.next_power_of_2`` in Python: ~2 µs less a call)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t (R, D)`` with unit feature stride (any row stride is read as it is)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _flat(t: Tensor) -> Tensor:
    """``t (*, D)`` as :func:`_rows` ``(N, D)`` (a view where it can be: inside the op, where
    autograd records none — the feature-wise ops take the input's ``(B, T, D)`` as it is)."""
    if t.dim() != 2:
        t = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return _rows(t)


def _as_rows(t: Tensor) -> Tensor:
    """``t (*, D)`` as the feature-wise kernels read it, rows ``stride(-2)`` apart with unit
    feature stride: itself when contiguous (no reshape: a view costs ~1 µs of host time,
    and its output needs another to come back), else :func:`_flat`."""
    return t if t.is_contiguous() else _flat(t)


def _nd(t: Tensor) -> Tuple[int, int]:
    """``(N, D)``: the rows and features of ``t (*, D)``."""
    d = t.shape[-1]
    return (t.numel() // d if d else math.prod(t.shape[:-1])), d


def _in_shape(t: Tensor, shape) -> Tensor:
    return t if t.shape == shape else t.view(shape)


#: (the last flat mask, its bytes): a model's norms pass the same flat mask object call
#: after call (seqnorm.masks.flat_padding), and its uint8 view is a view — always its bits
_last_bits = (None, None)


def _pad_bits(pad: Optional[Tensor], like: Tensor) -> Tensor:
    global _last_bits
    if pad is None:
        return _absent(like, torch.uint8)
    last, bits = _last_bits
    if pad is last:
        return bits
    bits = pad.contiguous().view(torch.uint8)
    if pad.is_contiguous():
        _last_bits = (pad, bits)
    return bits


def _param(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A per-feature tensor as it is, in its own dtype (the kernels read it as
    float32: no cast launched); an empty stand-in for None."""
    if t is None:
        return _absent(like)
    return t if t.is_contiguous() else t.detach().contiguous()


#: per (device, dtype): the empty tensor a kernel gets for an absent input (never read: its flag
#: is off), made once — an allocation a call costs ~1 µs of host time
_absents: dict = {}


def _absent(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    dtype = like.dtype if dtype is None else dtype
    key = (like.device, dtype)
    t = _absents.get(key)
    if t is None:
        t = _absents[key] = torch.empty(0, dtype=dtype, device=like.device)
    return t


def _grad_like(t: Optional[Tensor], d: int, like: Tensor) -> Tensor:
    """An uninitialized ``(d,)`` gradient in ``t``'s dtype (an empty stand-in for None)."""
    return like.new_empty(0) if t is None else like.new_empty(d, dtype=t.dtype)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device) -> int:
    """How many programs share the rows of a reduction (a fixed number per device,
    so that the partition — and the bits — are the same on every run)."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _block_d(d: int) -> Tuple[int, int]:
    block = _pow2(max(d, 1))
    return block, min(max(block // 256, 1), 16)


def _bwd_warps(block: int) -> int:
    """Warps of the register-resident backward (``rowwise_bwd``): the forward's, at most 8.
    At 16 warps (512 threads) a thread may hold 128 registers; the backward at
    BLOCK_D = 4,096 needs 128 with every input and ptxas spilled 8–16 B in six lighter
    specializations (a flag off) on sm_90; at 8 warps none spills."""
    return min(_block_d(block)[1], 8)


#: the widest row each row-wise kernel holds in registers: compiled for sm_80/sm_90
#: with every input (residual, the sum's gradient), the forward fits up to 16,384
#: columns and the backward up to 4,096 without a spill (at 8,192 it spills 20 B,
#: benchmarks/registers.py); wider rows take the column-blocked kernels, which read
#: the row BLOCK_C columns at a time, once per pass
MAX_BLOCK_FWD, MAX_BLOCK_BWD, BLOCK_C = 16384, 4096, 4096


def _grads_fake(dy, x, weight, bias, *_):
    """Every backward op's outputs: ``(dx like x, dγ (D,), dβ (D,))``, each parameter
    gradient in its parameter's dtype (empty without the parameter)."""
    d = x.shape[-1] if x.dim() == 2 else x.shape[1]
    return torch.empty_like(x), _grad_like(weight, d, x), _grad_like(bias, d, x)


def _param_grads(dw_part: Tensor, db_part: Tensor, dw: Tensor, db: Tensor, programs: int, d: int,
                 has_w: bool, has_b: bool) -> None:
    """The finalize of parameter gradients: ``dw``, ``db`` ← the ordered sums of the
    partial rows, in their dtypes (one launch; none without parameters)."""
    if has_w or has_b:
        block = min(1024, _pow2(max(d, 1)))
        pk.param_grads.launch((_cdiv(d, block),), dw_part, db_part, dw, db, programs, d, HAS_W=has_w, HAS_B=has_b,
                                                 BLOCK_F=block)


# ---------------------------------------------------------------------------
# Row-wise
# ---------------------------------------------------------------------------


def _token_rows(t: Optional[Tensor], d: int) -> Tuple[Optional[Tensor], int]:
    """``t (*, D)`` as rows with unit feature stride, and its row stride: a contiguous
    tensor as it is (the kernels take a pointer and a row stride: no view a call), any
    other as ``(R, D)`` (a view where it can be)."""
    if t is None:
        return t, 0
    if t.is_contiguous():
        return t, d
    if t.dim() != 2:
        t = t.reshape(math.prod(t.shape[:-1]), d)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


def _rowwise_fwd_impl(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                      pad: Optional[Tensor], eps: float, center: bool, write_sum: bool
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, s, stats)`` of the row-wise norm of ``x (*, D)`` (+ ``residual``), ``y`` and
    ``s`` in ``x``'s shape, contiguous (no view after: with autograd recording a view is a
    node), ``stats (3R,)`` float32 each row's ``m, δ, r`` (flat: a shape of one int is
    the cheapest allocation); ``s`` is None unless ``write_sum`` (the custom op returns
    an empty tensor there). ``pad``: the token mask, ``(R,)`` or in ``x``'s token shape.
    One launch."""
    return _rowwise_forward(x, residual, weight, bias, pad, eps, center, write_sum, None)


def _rowwise_fwd_plain(x, residual, weight, bias, pad, eps, center, write_sum):
    """``(y, s)`` of :func:`_rowwise_fwd_impl` where no gradient is recorded: the per-row
    statistics, which only a backward reads, go to a scratch buffer (no allocation)."""
    return _rowwise_forward(x, residual, weight, bias, pad, eps, center, write_sum,
                            _scratch(x.device, 3 * _nd(x)[0]))[:2]


#: per device, float32 buffers written and never read (a no-grad call's statistics): the newest
#: is the largest; the older ones are kept alive (a captured CUDA graph may still write to them)
_scratches: dict = {}


def _scratch(device: torch.device, numel: int, dtype: torch.dtype = torch.float32, slot: int = 0) -> Tensor:
    """A buffer of at least ``numel`` elements that no one reads after the launches of this
    call (those that write it may read it back within the call: ``slot`` tells apart two
    such buffers of one call)."""
    key = (device, dtype, slot)
    kept = _scratches.get(key)
    if kept is None or kept[-1].numel() < numel:
        kept = _scratches.setdefault(key, [])
        kept.append(torch.empty(max(numel, 1 << 12), dtype=dtype, device=device))
    return kept[-1]


@functools.lru_cache(maxsize=None)
def _rowwise_fwd_kernel(d: int, has_res: bool, write_sum: bool, has_w: bool, has_b: bool, has_pad: bool,
                        center: bool):
    """The row-wise forward kernel for rows of ``d`` with these inputs, its constexprs bound
    (a :class:`~.triton_kernels.launch.Specialization`, made once per combination)."""
    block, warps = _block_d(d)
    flags = dict(HAS_RES=has_res, WRITE_S=write_sum, HAS_W=has_w, HAS_B=has_b, HAS_PAD=has_pad, CENTER=center,
                 num_warps=warps)
    # implied (out of the launch key): y, s and the statistics, allocated for the launch (s is x without
    # WRITE_S), and the residual's slot where it is x again
    implied = (2, 3, 7) if has_res else (1, 2, 3, 7)
    if block <= MAX_BLOCK_FWD:
        return rk.rowwise_fwd.specialize(implied, **flags, BLOCK_D=block)
    return rk.rowwise_fwd_blocked.specialize(implied, **flags, BLOCK_C=BLOCK_C)


@functools.lru_cache(maxsize=None)
def _rowwise_bwd_kernel(d: int, has_res: bool, has_ds: bool, has_w: bool, has_pad: bool, center: bool):
    """The row-wise backward kernel for rows of ``d`` with these inputs, its constexprs bound."""
    block, warps = _block_d(d)
    flags = dict(HAS_RES=has_res, HAS_DS=has_ds, HAS_W=has_w, HAS_PAD=has_pad, CENTER=center)
    # implied: dx and the partial rows (allocated for the launch), the forward's statistics (allocated by
    # it), and the residual's and dS's slots where they are x again
    implied = (4, 7, 8, 9) + (() if has_res else (2,)) + (() if has_ds else (3,))
    if block <= MAX_BLOCK_BWD:
        return rk.rowwise_bwd.specialize(implied, **flags, num_warps=_bwd_warps(block), BLOCK_D=block)
    return rk.rowwise_bwd_blocked.specialize(implied, **flags, num_warps=warps, BLOCK_C=BLOCK_C)


def _rowwise_forward(x, residual, weight, bias, pad, eps, center, write_sum, stats=None):
    """:func:`_rowwise_fwd_impl` writing the statistics to ``stats``, or to a new buffer (None:
    what the eager autograd.Function runs, one call less than through the custom op's impl)."""
    shape = x.shape
    d = shape[-1]
    rows = x.numel() // d if d else math.prod(shape[:-1])
    if stats is None:   # (x.new_empty: ~0.15 µs less than torch.empty with a device)
        stats = x.new_empty(3 * rows, dtype=torch.float32)
    if x.is_contiguous():   # (the common case tested once: x as it is, rows of stride d)
        y, stride_x = torch.empty_like(x), d     # (empty_like: ~1 µs less than new_empty(shape))
    else:
        y = x.new_empty(shape)
        x, stride_x = _token_rows(x, d)
    s = torch.empty_like(y) if write_sum else None
    residual, stride_r = _token_rows(residual, d) if residual is not None else (None, 0)
    if rows and d:
        has_res = residual is not None
        _rowwise_fwd_kernel(d, has_res, write_sum, weight is not None, bias is not None, pad is not None, center)(
            (rows,), x, residual if has_res else x, y, s if write_sum else x, _param(weight, x), _param(bias, x),
            _pad_bits(pad, x), stats, stride_x, stride_r if has_res else stride_x, d, d, d, eps)
    else:
        stats.zero_(), y.zero_()
        if write_sum:
            s.copy_(x.reshape(shape) if residual is None
                    else (x.float() + residual.float()).to(x.dtype).reshape(shape))
    return y, s, stats


def _rowwise_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      residual: Optional[Tensor], ds: Optional[Tensor], pad: Optional[Tensor], stats: Tensor,
                      center: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``, ``dx`` in ``x``'s shape, the parameter gradients in
    their dtypes: the rows' kernel, then the finalize of the parameter gradients (two
    launches)."""
    shape, d = x.shape, x.shape[-1]
    rows = math.prod(shape[:-1])
    dx = torch.empty_like(x) if x.is_contiguous() else x.new_empty(shape)
    (dy, stride_dy), (x, stride_x) = _token_rows(dy, d), _token_rows(x, d)
    (residual, stride_r), (ds, stride_ds) = _token_rows(residual, d), _token_rows(ds, d)
    dw, db = _grad_like(weight, d, x), _grad_like(bias, d, x)
    if not (rows and d):
        return dx.zero_(), dw.zero_(), db.zero_()
    programs = max(1, min(rows, _programs(x.device)))
    per = _cdiv(rows, programs)
    programs = _cdiv(rows, per)
    # every program writes its whole partial row: no zero fill
    dw_part = x.new_empty((programs, d), dtype=torch.float32)
    db_part = x.new_empty((programs, d), dtype=torch.float32)
    res = residual if residual is not None else x
    dsr = ds if ds is not None else x
    _rowwise_bwd_kernel(d, residual is not None, ds is not None, weight is not None, pad is not None, center)(
        (programs,), dy, x, res, dsr, dx, _param(weight, x), _pad_bits(pad, x), stats, dw_part, db_part,
        stride_dy, stride_x, stride_r if residual is not None else stride_x, stride_ds if ds is not None else stride_x,
        d, rows, d, per)
    _param_grads(dw_part, db_part, dw, db, programs, d, weight is not None, bias is not None)
    return dx, dw, db


def _rowwise_fwd_fake(x, residual, weight, bias, pad, eps, center, write_sum):
    return (x.new_empty(x.shape), x.new_empty(x.shape) if write_sum else x.new_empty(0),
            x.new_empty((3 * math.prod(x.shape[:-1]),), dtype=torch.float32))


def _token_grads_fake(dy, x, weight, bias, *_):
    d = x.shape[-1]
    return x.new_empty(x.shape), _grad_like(weight, d, x), _grad_like(bias, d, x)


rowwise_bwd = BackwardOp("triton_rowwise_bwd", _rowwise_bwd_impl, _token_grads_fake)


def _rowwise_setup(ctx, inputs, output):
    x, residual, weight, bias, pad, eps, center, write_sum = inputs
    ctx.save_for_backward(x, residual, weight, bias, pad, output[2])
    ctx.center = center


def _rowwise_backward(ctx, dy, ds, *_):
    """The backward re-forms the float32 sum from both addends (never a rounded sum)."""
    x, residual, weight, bias, pad, stats = ctx.saved_tensors
    if dy is None:  # only the sum was used downstream
        dy = torch.zeros_like(x)
    ds = ds if residual is not None and ds is not None and ds.numel() else None
    dx, dw, db = rowwise_bwd(dy, x, weight, bias, residual, ds, pad, stats, ctx.center)
    if residual is not None:   # the residual's gradient is dx too: two views of it (as the reshaped inputs'
        dx, dr = dx.view(dx.shape), dx.view(dx.shape)   # gradients were), so that two leaves are not copied
    return (dx, dr if residual is not None else None,
            dw.reshape(weight.shape) if weight is not None else None,
            db.reshape(bias.shape) if bias is not None else None, None, None, None, None)


#: its eager calls return ``(y, s)`` (s None unless write_sum); the op, ``(y, s, stats)``
rowwise_fwd = ForwardOp("triton_rowwise_fwd", _rowwise_fwd_impl, _rowwise_fwd_fake, _rowwise_setup,
                        _rowwise_backward, 2, n_out=2, plain=_rowwise_fwd_plain, recorded=_rowwise_forward)


# ---------------------------------------------------------------------------
# Feature-wise: partials → one finalize → normalize
# ---------------------------------------------------------------------------

BLOCK_N, BLOCK_F = 32, 64
#: the block of padding bits a program scans for the first real row
BLOCK_PAD = 1024


@functools.lru_cache(maxsize=4096)
def _partial_grid(n: int, d: int, device: torch.device) -> Tuple[int, int, int]:
    """``(P, F, rows_per_program)`` of a kernel writing per-program partials: a
    fixed number of programs per device in all (so that the finalize merges few
    rows, and the partition is the same on every run)."""
    f = _cdiv(max(d, 1), BLOCK_F)
    p = max(1, min(_cdiv(max(n, 1), BLOCK_N), _programs(device) // f))
    per = _cdiv(_cdiv(max(n, 1), p), BLOCK_N) * BLOCK_N
    return _cdiv(max(n, 1), per), f, per


@functools.lru_cache(maxsize=4096)
def _tile_grid(n: int, d: int) -> Tuple[int, int, int]:
    """``(P, F, rows_per_program)`` of an elementwise pass: one ``BLOCK_N`` tile a program."""
    return _cdiv(max(n, 1), BLOCK_N), _cdiv(max(d, 1), BLOCK_F), BLOCK_N


@functools.lru_cache(maxsize=None)
def _finalize_block(d: int) -> int:
    return min(fk.FINALIZE_BLOCK, _pow2(max(d, 1)))


def _batch_moments(x: Tensor, pad: Optional[Tensor], weight: Optional[Tensor], eps: float, update=None,
                   moments: bool = True, flat: bool = False):
    """Partials, then the one-program finalize: ``(stats (3, D) [K, δ, r], a (D,),
    batch mean, biased var, count () int64)``; ``update = (running_mean,
    running_var, num_batches_tracked, momentum)`` also moves the running
    statistics on the device (:func:`seqnorm.running.update_batch_norm_stats`).
    ``moments=False``: the batch mean and variance, which nobody reads when the finalize
    moves the running statistics, go to a scratch buffer and come back as None. ``flat``:
    ``stats`` as ``(3·D,)``, for a caller that hands it to kernels alone (the eager step: a
    ``(3, D)`` shape costs ~1 µs more to allocate; the custom op returns the fake's shape), and
    without ``moments`` the count as ``(1,)`` too (no caller reads it there: only the backward's
    kernels; a 0-d shape costs ~0.4 µs more)."""
    n, d = _nd(x)
    f32, device = torch.float32, x.device
    # (dtype by keyword, not **dict: ~0.2 µs less an allocation)
    stats = x.new_empty(3 * d, dtype=f32) if flat else x.new_empty((3, d), dtype=f32)
    scale = x.new_empty(d, dtype=f32)
    if moments:
        mean, var = x.new_empty(d, dtype=f32), x.new_empty(d, dtype=f32)
    else:
        mean, var = _scratch(device, d), _scratch(device, d, slot=1)   # (the finalize reads them back)
    count = x.new_empty(1 if flat and not moments else (), dtype=torch.int64)
    p, f, per = _partial_grid(n, d, device)
    # the programs' partials: scratch the finalize reads, one allocation (split: ~1 µs less than three)
    mean_part, m2_part, count_part = x.new_empty(2 * p * d + p, dtype=f32).split_with_sizes((p * d, p * d, p))
    _moments_partial_kernel(pad is not None)(
        (p, f), x, _pad_bits(pad, x), stats, count_part, mean_part, m2_part, x.stride(-2), n, d, per)
    rmean, rvar, nbt, momentum = update if update is not None else (stats, stats, None, 0.0)
    _bn_finalize_kernel(weight is not None, update is not None, nbt is not None, momentum is None, d)(
        (1,), count_part, mean_part, m2_part, _param(weight, x), stats, scale, mean, var, count,
        rmean, rvar, nbt if nbt is not None else count, p, d, float(eps), float(momentum or 0.0))
    return (stats, scale, mean, var, count) if moments else (stats, scale, None, None, count)


# Each call site's Specialization (its constexprs bound, made once per combination): an lru_cache of the
# few flags that decide them (~0.2 µs a launch less than building and hashing the options at each call)


@functools.lru_cache(maxsize=None)
def _moments_partial_kernel(has_pad: bool):
    # implied: the statistics (allocated for the launch)
    return fk.moments_partial.specialize((2,), HAS_PAD=has_pad, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F, BLOCK_PAD=BLOCK_PAD)


@functools.lru_cache(maxsize=None)
def _bn_finalize_kernel(has_w: bool, update: bool, has_nbt: bool, cumulative: bool, d: int):
    # implied: this call's outputs
    return fk.bn_finalize.specialize((4, 5, 6, 7, 8), HAS_W=has_w, UPDATE=update, HAS_NBT=has_nbt,
                                     CUMULATIVE=cumulative, BLOCK_F=_finalize_block(d), num_warps=4)


@functools.lru_cache(maxsize=None)
def _bn_normalize_kernel(has_pad: bool, running: bool, has_w: bool, has_b: bool, implied: Tuple[int, ...]):
    return fk.bn_normalize.specialize(implied, HAS_PAD=has_pad, RUNNING=running, HAS_W=has_w, HAS_B=has_b,
                                      BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F, BLOCK_PAD=BLOCK_PAD)


def _bn_normalize(x, pad, stats, scale, bias, y=None):
    """``y = ((x − K) − δ)·a + b`` from ``stats (3, D)`` and ``a`` (one launch)."""
    n, d = _nd(x)
    given_y = y
    y = torch.empty_like(x) if y is None else y
    p, f, per = _tile_grid(n, d)
    # implied: y (allocated here when not given) and the repeats of stats in the unused slots
    _bn_normalize_kernel(pad is not None, False, False, bias is not None,
                         (3, 4, 7, 8, 9, 10, 11) if given_y is None else (3, 4, 8, 9, 10, 11))(
        (p, f), x, _pad_bits(pad, x), stats, stats, stats, scale, _param(bias, x), y, stats, stats,
        stats, stats, x.stride(-2), y.stride(-2), n, d, per, 0.0)
    return y


def _featurewise_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
                          mean: Optional[Tensor], var: Optional[Tensor], eps: float,
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          num_batches_tracked: Optional[Tensor], momentum: Optional[float], update: bool
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Masked BatchNorm: ``(y, batch_mean, batch_var, count, stats (3, D) [K, δ, r], a)``.

    Batch statistics: partials → finalize → normalize (three launches), the
    finalize moving ``running_mean``/``running_var``/``num_batches_tracked`` in
    place when ``update``. With ``mean``/``var`` given (eval) one launch
    normalizes with them and the batch statistics are returned as zeros. ``x (*, D)``,
    ``y`` in its shape."""
    shape = x.shape
    out = _featurewise_rows(_as_rows(x), weight, bias, pad, mean, var, eps, running_mean, running_var,
                            num_batches_tracked, momentum, update)
    return (_in_shape(out[0], shape),) + out[1:]


def _featurewise_rows(x, weight, bias, pad, mean, var, eps, running_mean, running_var, num_batches_tracked,
                      momentum, update):
    n, d = _nd(x)
    if not (n and d):
        f32 = dict(dtype=torch.float32, device=x.device)
        return (torch.zeros_like(x), torch.zeros(d, **f32), torch.zeros(d, **f32),
                torch.zeros((), dtype=torch.int64, device=x.device), torch.zeros(3, d, **f32), torch.zeros(d, **f32))
    if mean is None:
        stats, scale, batch_mean, batch_var, count = _batch_moments(
            x, pad, weight, eps, (running_mean, running_var, num_batches_tracked, momentum) if update else None)
        return _bn_normalize(x, pad, stats, scale, bias), batch_mean, batch_var, count, stats, scale
    f32 = dict(dtype=torch.float32)
    y, stats, scale = torch.empty_like(x), x.new_empty((3, d), **f32), x.new_empty(d, **f32)
    batch_mean, batch_var, count = x.new_empty(d, **f32), x.new_empty(d, **f32), x.new_empty((), dtype=torch.int64)
    _bn_eval(x, pad, mean, var, weight, bias, eps, y, stats, scale, batch_mean, batch_var, count)
    return y, batch_mean, batch_var, count, stats, scale


def _bn_eval(x, pad, mean, var, weight, bias, eps, y, stats, scale, batch_mean, batch_var, count):
    """Eval: ``y`` normalized with the running ``mean``, ``var`` (one launch; the program of
    the first rows stores ``stats``, ``scale`` for the backward and zero batch statistics)."""
    n, d = _nd(x)
    p, f, per = _tile_grid(n, d)
    # implied: the outputs, which every caller allocates for this launch (or takes from _scratch)
    _bn_normalize_kernel(pad is not None, True, weight is not None, bias is not None, (5, 7, 8, 9, 10, 11))(
        (p, f), x, _pad_bits(pad, x), _param(mean, x), _param(var, x), _param(weight, x), scale,
        _param(bias, x), y, stats, batch_mean, batch_var, count, x.stride(-2), y.stride(-2), n, d, per, eps)


def _featurewise_train(x, weight, bias, pad, eps, running_mean, running_var, num_batches_tracked, momentum,
                       update):
    """A training step of :func:`_featurewise_fwd_impl` in eager mode: with ``update`` the
    batch mean and variance (read by no one: the finalize moves the running statistics)
    come back as None."""
    shape = x.shape
    x = _as_rows(x)
    stats, scale, batch_mean, batch_var, count = _batch_moments(
        x, pad, weight, eps, (running_mean, running_var, num_batches_tracked, momentum) if update else None,
        not update, True)      # (stats flat: only this step's kernels and its backward's read it)
    return _in_shape(_bn_normalize(x, pad, stats, scale, bias), shape), batch_mean, batch_var, count, stats, scale


def _featurewise_eval(x, weight, bias, pad, mean, var, eps, stats=None, scale=None) -> Tensor:
    """An eager eval step's ``y`` (one launch, :func:`_bn_eval`): the zero batch statistics and
    count nobody reads go to scratch buffers, and so do ``stats`` and ``scale`` unless given
    (where autograd records, its backward reads them)."""
    shape, d = x.shape, x.shape[-1]
    y = torch.empty_like(x) if x.is_contiguous() else x.new_empty(shape)
    x = _as_rows(x)
    junk, count = _scratch(x.device, 3 * d), _scratch(x.device, 1, torch.int64)
    _bn_eval(x, pad, mean, var, weight, bias, eps, _in_shape(y, x.shape), junk if stats is None else stats,
             junk if scale is None else scale, junk, junk, count)
    return y


def _featurewise_fwd_recorded(x, weight, bias, pad, mean, var, eps, running_mean, running_var,
                              num_batches_tracked, momentum, update):
    """:func:`_featurewise_fwd_impl` where autograd records: in eval (``mean`` given) the
    zero batch statistics and count, which neither the caller nor the eval backward reads,
    go to scratch buffers and come back as None (three allocations and outputs fewer); in
    training with ``update`` (the finalize moves the running statistics) the batch mean and
    variance do."""
    if not x.numel():
        return _featurewise_fwd_impl(x, weight, bias, pad, mean, var, eps, running_mean, running_var,
                                     num_batches_tracked, momentum, update)
    if mean is None:
        return _featurewise_train(x, weight, bias, pad, eps, running_mean, running_var, num_batches_tracked,
                                  momentum, update)
    d = x.shape[-1]
    # (stats flat: only the eval kernel and the backward's kernels read it)
    stats, scale = x.new_empty(3 * d, dtype=torch.float32), x.new_empty(d, dtype=torch.float32)
    return _featurewise_eval(x, weight, bias, pad, mean, var, eps, stats, scale), None, None, None, stats, scale


def _featurewise_fwd_plain(x, weight, bias, pad, mean, var, eps, running_mean, running_var, num_batches_tracked,
                           momentum, update):
    """:func:`_featurewise_fwd_impl`'s first four outputs where no gradient is recorded: in
    eval (``mean`` given) what only a backward reads, and the zero batch statistics nobody
    reads there, go to scratch buffers — ``(y, None, None, None)``; in training, as
    :func:`_featurewise_fwd_recorded`."""
    if not x.numel():
        return _featurewise_fwd_impl(x, weight, bias, pad, mean, var, eps, running_mean, running_var,
                                     num_batches_tracked, momentum, update)[:4]
    if mean is None:
        return _featurewise_train(x, weight, bias, pad, eps, running_mean, running_var, num_batches_tracked,
                                  momentum, update)[:4]
    return _featurewise_eval(x, weight, bias, pad, mean, var, eps), None, None, None


def _featurewise_fwd_fake(x, weight, bias, pad, mean, var, eps, running_mean, running_var, num_batches_tracked,
                          momentum, update):
    d = x.shape[-1]
    f32 = [x.new_empty(d, dtype=torch.float32) for _ in range(3)]
    return (torch.empty_like(x), f32[0], f32[1], x.new_empty((), dtype=torch.int64),
            x.new_empty((3, d), dtype=torch.float32), f32[2])


def _grad_partials(dy, x, pad, stats, scale, dx=None):
    """``(DG_PART, DB_PART, P)``: per-program ``Σ dy ⊙ x̂``, ``Σ dy`` over the real
    rows; with ``dx`` also ``dx = a·dy`` (eval) in the same pass."""
    n, d = _nd(x)
    p, f, per = _partial_grid(n, d, x.device)
    dg_part = x.new_empty((p, d), dtype=torch.float32)
    db_part = x.new_empty((p, d), dtype=torch.float32)
    out = dx if dx is not None else x
    fk.grad_partial.launch((p, f), dy, x, _pad_bits(pad, x), stats, scale, out, dg_part, db_part, dy.stride(-2), x.stride(-2),
                            out.stride(-2), n, d, per, HAS_PAD=pad is not None, WRITE_DX=dx is not None,
                            BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    return dg_part, db_part, p


def _bn_input_grad(dy, x, pad, stats, scale, coef):
    """``dx = a·dy − c₁ − x̂·c₂`` at real rows, 0 at padding (one launch)."""
    n, d = _nd(x)
    dx = torch.empty_like(x)
    p, f, per = _tile_grid(n, d)
    fk.bn_input_grad.launch((p, f), dy, x, _pad_bits(pad, x), stats, scale, coef, dx, dy.stride(-2), x.stride(-2),
                             dx.stride(-2), n, d, per, HAS_PAD=pad is not None, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    return dx


def _featurewise_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          pad: Optional[Tensor], stats: Tensor, scale: Tensor, count: Tensor, use_batch: bool
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dγ, dβ)`` of masked BatchNorm, dγ and dβ in the parameters' dtypes.
    Batch statistics: partials → finalize (dγ, dβ, c₁, c₂) → dx (three launches);
    eval: dx fused with the partials, then the finalize of dγ, dβ (two). ``dx`` in ``x``'s shape."""
    shape = x.shape
    dx, dw, db = _featurewise_bwd_rows(_as_rows(dy), _as_rows(x), weight, bias, pad, stats, scale, count, use_batch)
    return _in_shape(dx, shape), dw, db


def _featurewise_bwd_rows(dy, x, weight, bias, pad, stats, scale, count, use_batch):
    n, d = _nd(x)
    dw, db = _grad_like(weight, d, x), _grad_like(bias, d, x)
    if not (n and d):
        return torch.zeros_like(x), dw.zero_(), db.zero_()
    has_w, has_b = weight is not None, bias is not None
    if not use_batch:
        dx = torch.empty_like(x)
        dg_part, db_part, p = _grad_partials(dy, x, pad, stats, scale, dx)
        _param_grads(dg_part, db_part, dw, db, p, d, has_w, has_b)
        return dx, dw, db
    dg_part, db_part, p = _grad_partials(dy, x, pad, stats, scale)
    coef = x.new_empty((2, d), dtype=torch.float32)
    block = _finalize_block(d)
    fk.bn_grad_finalize.launch((_cdiv(d, block),), dg_part, db_part, scale, count, dw if has_w else coef,
                                                  db if has_b else coef, coef, p, d, HAS_W=has_w, HAS_B=has_b,
                                                  BLOCK_F=block)
    return _bn_input_grad(dy, x, pad, stats, scale, coef), dw, db


featurewise_bwd = BackwardOp("triton_featurewise_bwd", _featurewise_bwd_impl, _token_grads_fake)


def _featurewise_setup(ctx, inputs, output):
    x, weight, bias, pad, mean, var = inputs[:6]
    _, _, _, count, stats, scale = output
    ctx.save_for_backward(x, weight, bias, pad, stats, scale, count)
    ctx.use_batch = mean is None


def _featurewise_backward(ctx, dy, *_):
    x, weight, bias, pad, stats, scale, count = ctx.saved_tensors
    if dy is None:
        return (None,) * 12
    dx, dgamma, dbeta = featurewise_bwd(dy, x, weight, bias, pad, stats, scale, count, ctx.use_batch)
    return (dx, dgamma if weight is not None else None, dbeta if bias is not None else None) + (None,) * 9


featurewise_fwd = ForwardOp("triton_featurewise_fwd", _featurewise_fwd_impl, _featurewise_fwd_fake,
                            _featurewise_setup, _featurewise_backward, 1, n_out=4, plain=_featurewise_fwd_plain,
                            recorded=_featurewise_fwd_recorded)


# --- PowerNorm ---


@functools.lru_cache(maxsize=None)
def _power_normalize_kernel(has_pad: bool, has_w: bool, has_b: bool, sumsq: bool):
    # implied: y, rstd and the partials, allocated for the launch
    return fk.power_normalize.specialize((5, 6, 7, 8), HAS_PAD=has_pad, HAS_W=has_w, HAS_B=has_b, SUMSQ=sumsq,
                                         BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)


@functools.lru_cache(maxsize=None)
def _power_finalize_kernel(has_nu: bool, update: bool, has_nbt: bool, has_factor: bool, cumulative: bool, d: int):
    # implied: the partials and this call's outputs, allocated for the launch
    return fk.power_finalize.specialize((0, 1, 2, 3, 4, 6), HAS_NU=has_nu, UPDATE=update, HAS_NBT=has_nbt,
                                        HAS_FACTOR=has_factor, CUMULATIVE=cumulative, BLOCK_F=_finalize_block(d),
                                        num_warps=4)


def _power_normalize(x, pad, running_phi, weight, bias, eps, sumsq):
    """``(y, rstd (D,), SUMSQ_PART, COUNT_PART, P)``: ``y = x·w·r + b`` with ``r`` of the
    running ψ²; with ``sumsq`` also each program's ``Σ x²`` and real rows (one launch)."""
    n, d = _nd(x)
    p, f, per = _partial_grid(n, d, x.device) if sumsq else _tile_grid(n, d)
    y, rstd = torch.empty_like(x), x.new_empty(d, dtype=torch.float32)
    sumsq_part = x.new_empty((p if sumsq else 0, d), dtype=torch.float32)
    count_part = x.new_empty(p if sumsq else 0, dtype=torch.float32)
    _power_normalize_kernel(pad is not None, weight is not None, bias is not None, sumsq)(
        (p, f), x, _pad_bits(pad, x), _param(running_phi, x), _param(weight, x), _param(bias, x), y,
        rstd, sumsq_part, count_part, x.stride(-2), y.stride(-2), n, d, per, float(eps))
    return y, rstd, sumsq_part, count_part, p


def _power_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
                    running_phi: Tensor, running_nu: Optional[Tensor], eps: float, training: bool,
                    momentum: Optional[float], num_batches_tracked: Optional[Tensor], factor: Optional[Tensor],
                    update: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """PowerNorm: ``(y, batch_phi, count, rstd, nu_before, factor)``, dividing by the
    running ψ². Training: normalize (with each program's ``Σ x²``), then one
    finalize: ψ_B², n, the step's weight ``f`` (``momentum``, the cumulative
    average's from ``num_batches_tracked``, or ``factor`` when given) and
    ``nu_before``, a copy of ν (empty without one) which the backward reads
    while it moves ν in place (Algorithm 1) — a saved output, so that
    torch.compile's backward graph reads the same value; with ``update`` the
    finalize also moves ψ² and ``num_batches_tracked`` (two launches). Eval:
    the normalize alone (one launch; ``batch_phi``, ``count``, ``factor`` are
    not computed). ``x (*, D)``, ``y`` in its shape."""
    shape = x.shape
    out = _power_rows(_as_rows(x), weight, bias, pad, running_phi, running_nu, eps, training, momentum,
                      num_batches_tracked, factor, update)
    return (_in_shape(out[0], shape),) + out[1:]


def _power_rows(x, weight, bias, pad, running_phi, running_nu, eps, training, momentum, num_batches_tracked, factor,
                update):
    n, d = _nd(x)
    f32 = torch.float32
    nu_before = x.new_empty(0) if running_nu is None else torch.empty_like(running_nu)
    batch_phi, count, factor_out = x.new_empty(d, dtype=f32), x.new_empty((), dtype=torch.int64), \
        x.new_empty((), dtype=f32)
    if not (n and d):
        y, rstd = torch.zeros_like(x), torch.rsqrt(running_phi.detach().float() + eps)
        if running_nu is not None:
            nu_before.copy_(running_nu)
        return y, batch_phi.zero_(), count.zero_(), rstd, nu_before, factor_out.zero_()
    y, rstd, sumsq_part, count_part, p = _power_normalize(x, pad, running_phi, weight, None if bias is None else bias,
                                                          eps, training)
    if training:
        nbt = num_batches_tracked
        _power_finalize_kernel(running_nu is not None, update, nbt is not None, factor is not None,
                               factor is None and momentum is None, d)(
            (1,), sumsq_part, count_part, batch_phi, count, factor_out, _param(running_nu, x), nu_before,
            running_phi if update else batch_phi, nbt if nbt is not None else count,
            factor if factor is not None else count, p, d, float(momentum or 0.0))
    return y, batch_phi, count, rstd, nu_before, factor_out


def _power_fwd_fake(x, weight, bias, pad, running_phi, running_nu, eps, training, momentum, num_batches_tracked,
                    factor, update):
    d = x.shape[-1]
    return (torch.empty_like(x), x.new_empty(d, dtype=torch.float32), x.new_empty((), dtype=torch.int64),
            x.new_empty(d, dtype=torch.float32), x.new_empty(0) if running_nu is None else torch.empty_like(running_nu),
            x.new_empty((), dtype=torch.float32))


def _power_partials(dy, x, weight, pad, rstd, nu, nu_scale=1.0):
    """``(dx, DG_PART, DB_PART, P)``: ``dx = (w·dy − s·ν·x̂)·r`` with the partial sums
    of ``dy·x̂`` and ``dy`` (one launch)."""
    n, d = _nd(x)
    p, f, per = _partial_grid(n, d, x.device)
    dx = torch.empty_like(x)
    dg_part = x.new_empty((p, d), dtype=torch.float32)
    db_part = x.new_empty((p, d), dtype=torch.float32)
    fk.power_input_grad.launch((p, f), dy, x, _pad_bits(pad, x), _param(weight, x), rstd, _param(nu, x), dx, dg_part,
                                db_part, dy.stride(-2), x.stride(-2), dx.stride(-2), n, d, per, float(nu_scale),
                                HAS_PAD=pad is not None, HAS_W=weight is not None, HAS_NU=nu is not None,
                                BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    return dx, dg_part, db_part, p


def _power_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
                    rstd: Tensor, nu_before: Optional[Tensor], batch_phi: Tensor, count: Tensor, factor: Tensor,
                    nu: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dγ, dβ)``: ``dx = (w·dy − ν·x̂)·r`` with ν before this step's update (0
    without one), then one finalize: dγ, dβ in the parameters' dtypes and — given
    the buffer ``nu`` — ν moved in place by Algorithm 1 (two launches). ``dx`` in ``x``'s shape."""
    shape = x.shape
    dx, dw, db = _power_bwd_rows(_as_rows(dy), _as_rows(x), weight, bias, pad, rstd, nu_before, batch_phi, count,
                                 factor, nu)
    return _in_shape(dx, shape), dw, db


def _power_bwd_rows(dy, x, weight, bias, pad, rstd, nu_before, batch_phi, count, factor, nu):
    n, d = _nd(x)
    dw, db = _grad_like(weight, d, x), _grad_like(bias, d, x)
    if not (n and d):
        return torch.zeros_like(x), dw.zero_(), db.zero_()
    dx, dg_part, db_part, p = _power_partials(dy, x, weight, pad, rstd, nu_before)
    has_w, has_b, move = weight is not None, bias is not None, nu is not None
    if has_w or has_b or move:
        block = _finalize_block(d)
        scratch = x.new_empty(d if move else 0, dtype=torch.float32)
        fk.power_grad_finalize.launch((1 if move else _cdiv(d, block),), 
            dg_part, db_part, _param(weight, x), dw if has_w else rstd, db if has_b else rstd, rstd, batch_phi,
            count, factor, nu_before if move else rstd, nu if move else rstd, scratch, p, d,
            HAS_W=has_w, HAS_B=has_b, MOVE_NU=move, BLOCK_F=block)
    return dx, dw, db


power_bwd = BackwardOp("triton_power_bwd", _power_bwd_impl, _token_grads_fake)


def _power_setup(ctx, inputs, output):
    x, weight, bias, pad, running_phi, running_nu, eps, training = inputs[:8]
    _, batch_phi, count, rstd, nu_before, factor = output
    ctx.save_for_backward(x, weight, bias, pad, rstd, batch_phi, count, nu_before, factor)
    ctx.nu = running_nu if training else None   # ν: the buffer the backward moves


def _power_backward(ctx, dy, *_):
    x, weight, bias, pad, rstd, batch_phi, count, nu_before, factor = ctx.saved_tensors
    if dy is None:
        return (None,) * 12
    nu = ctx.nu
    dx, dgamma, dbeta = power_bwd(dy, x, weight, bias, pad, rstd, nu_before if nu is not None else None, batch_phi,
                                  count, factor, nu)
    return (dx, dgamma if weight is not None else None, dbeta if bias is not None else None) + (None,) * 9


power_fwd = ForwardOp("triton_power_fwd", _power_fwd_impl, _power_fwd_fake, _power_setup, _power_backward, 1,
                      n_out=3)


# ---------------------------------------------------------------------------
# Feature-wise with a StatsReduce hook (the local part of the Sync modules):
# the same kernels, split where the hook's collectives go in between.
# ---------------------------------------------------------------------------


def _sums(dg_part: Tensor, db_part: Tensor) -> Tuple[Tensor, Tensor]:
    return dg_part.sum(0), db_part.sum(0)


class _ReducedFeaturewise(torch.autograd.Function):
    """Masked BatchNorm whose statistics pass through ``reduce`` (training):
    local moments → ``reduce.moments`` → normalize; the backward's two sums pass
    through ``reduce.sums``. Parameter gradients stay local (DDP reduces them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, pad, reduce):
        ctx.set_materialize_grads(False)
        x = _rows(x)
        d = x.shape[1]
        stats, _, local_mean, local_var, count = _batch_moments(x, pad, None, eps)
        shift = stats[0]
        n, mean, var = reduce.moments(count.float(), local_mean, local_var)
        # the global mean as this rank's K plus a small δ, formed in float64 (as the CPU kernels keep it)
        delta = (mean.double() - shift.double()).float()
        rstd = torch.rsqrt(var.float() + eps)
        a = (rstd * weight.float() if weight is not None else rstd).contiguous()
        stats = torch.stack([shift, delta, rstd])
        y = _bn_normalize(x, pad, stats, a, bias) if x.shape[0] and d else torch.zeros_like(x)
        ctx.save_for_backward(x, pad, stats, a, n)
        ctx.reduce, ctx.has_weight, ctx.has_bias = reduce, weight is not None, bias is not None
        mean, var = mean.float(), var.float()
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, *_):
        x, pad, stats, a, n = ctx.saved_tensors
        if dy is None:  # every process must still join the collective
            dy = torch.zeros_like(x)
        dy = _rows(dy)
        rows, d = x.shape
        if rows and d:
            dgamma, dbeta = _sums(*_grad_partials(dy, x, pad, stats, a)[:2])
        else:
            dgamma, dbeta = (x.new_zeros(d, dtype=torch.float32) for _ in range(2))
        sums = ctx.reduce.sums(torch.cat([dbeta, dgamma]))
        inv_n = 1.0 / n.float().clamp_min(1)
        coef = torch.stack([a * sums[:d].float() * inv_n, a * sums[d:].float() * inv_n])
        dx = _bn_input_grad(dy, x, pad, stats, a, coef) if rows and d else torch.zeros_like(x)
        return dx, dgamma if ctx.has_weight else None, dbeta if ctx.has_bias else None, None, None, None


class _ReducedPower(torch.autograd.Function):
    """PowerNorm whose ψ_B² and ν statistics pass through ``reduce``: the forward
    sums ``[n, Σ x²]``, the backward ``[Σ x̂², Σ x̂ ⊙ g]``; ν is kept in the scale of
    the gradient DDP applies (the average over ``W = reduce.world`` processes), so a
    process's own gradient subtracts ``W·ν ⊙ x̂`` (as the torch backend)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pad, running_phi, running_nu, eps, factor, reduce):
        ctx.set_materialize_grads(False)
        x = _rows(x)
        rows, d = x.shape
        if rows and d:
            y, rstd, sumsq_part, count_part, _ = _power_normalize(x, pad, running_phi, weight, bias, eps, True)
            sumsq, count = sumsq_part.sum(0), count_part.sum()
        else:
            y, rstd = torch.zeros_like(x), torch.rsqrt(running_phi.detach().float() + eps)
            sumsq, count = x.new_zeros(d, dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
        sums = reduce.sums(torch.cat([count.reshape(1), sumsq]))
        n = sums[0]
        phi = (sums[1:] / n.clamp_min(1)).float()
        nu_before = None if running_nu is None else running_nu.detach().clone()
        ctx.save_for_backward(x, weight, pad, rstd, sumsq, n, nu_before)
        ctx.nu, ctx.factor, ctx.reduce, ctx.has_bias = running_nu, factor, reduce, bias is not None
        ctx.mark_non_differentiable(phi, n)
        return y, phi, n

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, pad, rstd, sumsq, n, nu_before = ctx.saved_tensors
        nu, reduce = ctx.nu, ctx.reduce
        if dy is None:  # every process must still join the collective
            dy = torch.zeros_like(x)
        rows, d = x.shape
        if rows and d:
            dx, dg_part, db_part, _ = _power_partials(_rows(dy), x, weight, pad, rstd, nu_before,
                                                      reduce.world if nu is not None else 1.0)
            dgamma, dbeta = _sums(dg_part, db_part)
        else:
            dx = torch.zeros_like(x)
            dgamma, dbeta = (x.new_zeros(d, dtype=torch.float32) for _ in range(2))
        if nu is not None:
            w = weight.float() if weight is not None else torch.ones_like(rstd)
            sums = reduce.sums(torch.cat([rstd * rstd * sumsq, w * dgamma]))     # Σ x̂², Σ x̂ ⊙ g
            with torch.no_grad():
                m = n.to(sums.dtype).clamp_min(1)
                gamma, lam = sums[:d] / m, sums[d:] / (m * reduce.world)
                update_running_nu(nu, nu_step(nu_before, gamma, lam, ctx.factor), n > 0)
        return (dx, dgamma.to(weight.dtype) if weight is not None else None, dbeta if ctx.has_bias else None,
                None, None, None, None, None, None)


# ---------------------------------------------------------------------------
# The Sync modules with a gathering hook (seqnorm.distributed.Collectives): the
# single-process budget plus one collective each way. Forward: partials → the
# collective → one finalize (ranks merged in rank order, the running statistics'
# policy, the coefficients) → normalize; backward: partials → sums (local
# parameter gradients, the float64 sums) → all_reduce → input gradient (BN) or
# ν's finalize (PowerNorm).
# ---------------------------------------------------------------------------


def _sync_grid(n: int, d: int, device: torch.device) -> Tuple[int, int, int]:
    """``(P, F, rows_per_program)`` with ``P`` fixed by the device and the width only:
    every rank's partial buffer then has the same size (programs past the last row
    write empty partials), so one collective exchanges it whole. Ranks are assumed
    to run the same device model (as an NCCL job's do)."""
    f = _cdiv(max(d, 1), BLOCK_F)
    p = max(1, _programs(device) // f)
    per = _cdiv(_cdiv(max(n, 1), p), BLOCK_N) * BLOCK_N
    return p, f, per


class _GatheredFeaturewise(torch.autograd.Function):
    """SyncSeqBatchNorm on the kernels: 3 local launches + 1 all_gather forward,
    3 local launches + 1 all_reduce backward. ``running = (running_mean,
    running_var, num_batches_tracked, momentum)`` moves them in the finalize."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, pad, reduce, running):
        ctx.set_materialize_grads(False)
        x = _rows(x)
        n, d = x.shape
        f32 = dict(dtype=torch.float32)
        p, f, per = _sync_grid(n, d, x.device)
        length = d + p + 2 * p * d
        local = x.new_empty(length, **f32)              # [K | n_p | μ_p − K | M_p], written whole
        fk.moments_partial.launch((p, f), x, _pad_bits(pad, x), local, local[d:d + p], local[d + p:d + p + p * d],
                                   local[d + p + p * d:], x.stride(0), n, d, per, HAS_PAD=pad is not None,
                                   BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F, BLOCK_PAD=BLOCK_PAD)
        gathered = reduce.gather(local)                 # (R, length), rank-major
        stats, scale = x.new_empty((3, d), **f32), x.new_empty(d, **f32)
        mean, var, count = x.new_empty(d, **f32), x.new_empty(d, **f32), x.new_empty((), dtype=torch.int64)
        rmean, rvar, nbt, momentum = running if running is not None else (stats, stats, None, 0.0)
        sk.sync_bn_finalize.launch((1,), gathered, _param(weight, x), stats, scale, mean, var, count, rmean, rvar,
                                  nbt if nbt is not None else count, gathered.shape[0], length, reduce.rank, p, d,
                                  float(eps), float(momentum or 0.0), HAS_W=weight is not None,
                                  UPDATE=running is not None, HAS_NBT=nbt is not None, CUMULATIVE=momentum is None,
                                  BLOCK_F=_finalize_block(d), num_warps=4)
        y = _bn_normalize(x, pad, stats, scale, bias)
        ctx.save_for_backward(x, weight, bias, pad, stats, scale, count)
        ctx.reduce = reduce
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, bias, pad, stats, scale, count = ctx.saved_tensors
        if dy is None:  # every process must still join the collective
            dy = torch.zeros_like(x)
        dy = _rows(dy)
        n, d = x.shape
        has_w, has_b = weight is not None, bias is not None
        dw, db = _grad_like(weight, d, x), _grad_like(bias, d, x)
        dg_part, db_part, p = _grad_partials(dy, x, pad, stats, scale)
        sums = x.new_empty(2 * d, dtype=torch.float64)
        block = _finalize_block(d)
        sk.sync_bn_grad_sums.launch((_cdiv(d, block),), dg_part, db_part, dw if has_w else sums, db if has_b else sums,
                                                      sums, p, d, HAS_W=has_w, HAS_B=has_b, BLOCK_F=block)
        sums = ctx.reduce.sums(sums)
        dx = torch.empty_like(x)
        tp, tf, tper = _tile_grid(n, d)
        sk.sync_bn_input_grad.launch((tp, tf), dy, x, _pad_bits(pad, x), stats, scale, sums, count, dx, dy.stride(0),
                                        x.stride(0), dx.stride(0), n, d, tper, HAS_PAD=pad is not None,
                                        BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
        return dx, dw if has_w else None, db if has_b else None, None, None, None, None


class _GatheredPower(torch.autograd.Function):
    """SyncPowerNorm on the kernels: normalize (with the partial ``Σ x²``) → all_gather
    → one finalize (ψ_B², n, f, ν's copy; ψ² moved given ``running = (momentum,
    num_batches_tracked)``); backward: input gradient with partials → sums → (with ν)
    all_reduce → ν's finalize."""

    @staticmethod
    def forward(ctx, x, weight, bias, pad, running_phi, running_nu, eps, factor, reduce, running):
        ctx.set_materialize_grads(False)
        x = _rows(x)
        n, d = x.shape
        f32 = dict(dtype=torch.float32)
        p, f, per = _sync_grid(n, d, x.device)
        length = p + p * d
        local = x.new_empty(length, **f32)               # [n_p | Σ_p x²], written whole
        y, rstd = torch.empty_like(x), x.new_empty(d, **f32)
        fk.power_normalize.launch((p, f), x, _pad_bits(pad, x), _param(running_phi, x), _param(weight, x), _param(bias, x),
                                   y, rstd, local[p:], local[:p], x.stride(0), y.stride(0), n, d, per, float(eps),
                                   HAS_PAD=pad is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                                   SUMSQ=True, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
        gathered = reduce.gather(local)
        phi_b, count, factor_out = x.new_empty(d, **f32), x.new_empty((), dtype=torch.int64), x.new_empty((), **f32)
        nu_before = x.new_empty(0) if running_nu is None else torch.empty_like(running_nu)
        momentum, nbt = running if running is not None else (0.0, None)
        given = factor if running is None else None
        sk.sync_power_finalize.launch((1,), 
            gathered, phi_b, count, factor_out, _param(running_nu, x), nu_before,
            running_phi if running is not None else phi_b, nbt if nbt is not None else count,
            given if given is not None else count, gathered.shape[0], length, p, d, float(momentum or 0.0),
            HAS_NU=running_nu is not None, UPDATE=running is not None, HAS_NBT=nbt is not None,
            HAS_FACTOR=given is not None, CUMULATIVE=given is None and momentum is None,
            BLOCK_F=_finalize_block(d), num_warps=4)
        ctx.save_for_backward(x, weight, bias, pad, rstd, phi_b, count, factor_out, nu_before)
        ctx.nu, ctx.reduce = running_nu, reduce
        ctx.mark_non_differentiable(phi_b, count)
        return y, phi_b, count

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, bias, pad, rstd, phi_b, count, factor, nu_before = ctx.saved_tensors
        nu, reduce = ctx.nu, ctx.reduce
        if dy is None:  # every process must still join the collective
            dy = torch.zeros_like(x)
        n, d = x.shape
        has_w, has_b, move = weight is not None, bias is not None, nu is not None
        dx, dg_part, db_part, p = _power_partials(_rows(dy), x, weight, pad, rstd, nu_before if move else None,
                                                  reduce.world if move else 1.0)
        dw, db = _grad_like(weight, d, x), _grad_like(bias, d, x)
        sums = x.new_empty(d if move else 0, dtype=torch.float64)
        block = _finalize_block(d)
        if has_w or has_b or move:
            sk.sync_power_grad_sums.launch((_cdiv(d, block),), 
                dg_part, db_part, _param(weight, x), dw if has_w else sums, db if has_b else sums, sums, p, d,
                HAS_W=has_w, HAS_B=has_b, MOVE_NU=move, BLOCK_F=block)
        if move:
            sums = reduce.sums(sums)
            scratch = x.new_empty(d, dtype=torch.float32)
            sk.sync_nu_finalize.launch((1,), sums, rstd, phi_b, count, factor, nu_before, nu, scratch, d,
                                      float(reduce.world), BLOCK_F=block)
        return (dx, dw if has_w else None, db if has_b else None) + (None,) * 7


def _gathers(reduce, x: Tensor) -> bool:
    """Whether the kernels' sync path takes ``reduce`` (a hook that all-gathers; features: every
    rank has the same, and a rank without rows still joins the same collectives)."""
    return hasattr(reduce, "gather") and x.shape[-1] > 0


# ---------------------------------------------------------------------------
# Group-wise: masked GroupNorm / InstanceNorm
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _block_t(t: int) -> int:
    return min(_pow2(max(t, 1)), 1024)


def _group_warps(block_t: int) -> int:
    """Warps of the group-wise kernels: 8 for full 1024-step blocks (with 4, ptxas
    spills the bfloat16 backward for sm_90: 4 bytes, benchmarks/registers.py)."""
    return 8 if block_t >= 1024 else 4


def _groupwise_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], pad: Optional[Tensor],
                        eps: float, groups: int, statistics: bool = True
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x (B, C, T)`` → ``(y, mean (B, G), var (B, G), steps (B,), rstd (B·G,))``,
    the statistics float32 (one launch). ``statistics``: whether the caller reads ``var``
    (the custom op returns it whatever; see :func:`_groupwise_fwd_recorded`)."""
    return _groupwise_forward(x, weight, bias, pad, eps, groups, None)


@functools.lru_cache(maxsize=4096)
def _groupwise_fwd_kernel(has_w: bool, has_b: bool, has_pad: bool, t: int):
    block = _block_t(t)
    # implied: the outputs, allocated for the launch
    return gk.groupwise_fwd.specialize((1, 5, 6, 7, 8), HAS_W=has_w, HAS_B=has_b, HAS_PAD=has_pad, BLOCK_T=block,
                                       num_warps=_group_warps(block))


def _groupwise_forward(x, weight, bias, pad, eps, groups, scratch: Optional[str]):
    """:func:`_groupwise_fwd_impl`; ``scratch``: ``"var"`` — the variance, which the caller
    does not read and the backward does not need, goes to a scratch buffer and comes back
    as None; ``"all"`` — so do the mean, steps and ``rstd`` (no backward: ``(y, None, None,
    None, None)``)."""
    x = x.contiguous()
    b, c, t = x.shape
    y = torch.empty_like(x)
    f32 = torch.float32
    n = b * groups
    if scratch == "all":
        mean, var, rstd = _scratch(x.device, n), _scratch(x.device, n, slot=1), _scratch(x.device, n, slot=2)
        steps = _scratch(x.device, b, torch.int64)
    else:
        rstd, steps = x.new_empty(n, dtype=f32), x.new_empty(b, dtype=torch.int64)
        if scratch == "var":   # the caller reads no statistics: the mean, for the backward alone, stays flat
            mean, var = x.new_empty(n, dtype=f32), _scratch(x.device, n)
        else:
            mean, var = x.new_empty((b, groups), dtype=f32), x.new_empty((b, groups), dtype=f32)
    if b and c:
        _groupwise_fwd_kernel(weight is not None, bias is not None, pad is not None, t)(
            (n,), x, y, _param(weight, x), _param(bias, x), _pad_bits(pad, x), mean, rstd, var, steps, c, t,
            c // groups, groups, eps)
    elif scratch != "all":
        steps.copy_(t - pad.sum(1, dtype=torch.int64) if pad is not None else torch.full_like(steps, t))
    if scratch == "all":
        return y, None, None, None, None
    return y, mean, (None if scratch == "var" else var), steps, rstd


def _groupwise_fwd_recorded(x, weight, bias, pad, eps, groups, statistics=True):
    """:func:`_groupwise_fwd_impl` where autograd records: a variance the caller does not
    read goes to scratch (one allocation and output fewer)."""
    return _groupwise_forward(x, weight, bias, pad, eps, groups, None if statistics else "var")


def _groupwise_fwd_plain(x, weight, bias, pad, eps, groups, statistics=True):
    """:func:`_groupwise_fwd_impl`'s first four outputs where no gradient is recorded:
    without ``statistics`` only ``y`` (four allocations fewer)."""
    return _groupwise_forward(x, weight, bias, pad, eps, groups, None if statistics else "all")[:4]


def _groupwise_fwd_fake(x, weight, bias, pad, eps, groups, statistics=True):
    b = x.shape[0]
    return (torch.empty_like(x), x.new_empty(b, groups, dtype=torch.float32),
            x.new_empty(b, groups, dtype=torch.float32), x.new_empty(b, dtype=torch.int64),
            x.new_empty(b * groups, dtype=torch.float32))


def _groupwise_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        pad: Optional[Tensor], steps: Tensor, mean: Tensor, rstd: Tensor, groups: int
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``, the parameter gradients in their dtypes: the groups'
    kernel, then the finalize summing them over the batch (two launches)."""
    dy, x = dy.contiguous(), x.contiguous()
    b, c, t = x.shape
    dx = torch.empty_like(x)
    dw, db = _grad_like(weight, c, x), _grad_like(bias, c, x)
    if not (b and c):
        return dx, dw.zero_(), db.zero_()
    # program (b, g) writes its channels of row b: every element, no zero fill
    dw_part = x.new_empty((b, c), dtype=torch.float32)
    db_part = x.new_empty((b, c), dtype=torch.float32)
    gk.groupwise_bwd.launch((b * groups,), 
        dy, x, dx, _param(weight, x), _pad_bits(pad, x), steps, mean if mean.dim() == 1 else mean.reshape(-1),
        rstd, dw_part, db_part, c, t,
        c // groups, groups, HAS_W=weight is not None, HAS_PAD=pad is not None, BLOCK_T=_block_t(t),
        num_warps=_group_warps(_block_t(t)))
    _param_grads(dw_part, db_part, dw, db, b, c, weight is not None, bias is not None)
    return dx, dw, db


groupwise_bwd = BackwardOp("triton_groupwise_bwd", _groupwise_bwd_impl, _grads_fake)


def _groupwise_setup(ctx, inputs, output):
    x, weight, bias, pad, eps, groups, _ = inputs
    _, mean, _, steps, rstd = output
    ctx.save_for_backward(x, weight, bias, pad, steps, mean, rstd)
    ctx.groups = groups


def _groupwise_backward(ctx, dy, *_):
    x, weight, bias, pad, steps, mean, rstd = ctx.saved_tensors
    if dy is None:
        return (None,) * 7
    dx, dw, db = groupwise_bwd(dy, x, weight, bias, pad, steps, mean, rstd, ctx.groups)
    return dx, (dw if weight is not None else None), (db if bias is not None else None), None, None, None, None


groupwise_fwd = ForwardOp("triton_groupwise_fwd", _groupwise_fwd_impl, _groupwise_fwd_fake, _groupwise_setup,
                          _groupwise_backward, 1, n_out=4, plain=_groupwise_fwd_plain,
                          recorded=_groupwise_fwd_recorded)


class TritonBackend:
    """Triton kernels. See :mod:`seqnorm.backends` for the contract."""

    name = "triton"
    native_low_precision = (torch.bfloat16, torch.float16)
    reduces = True
    #: the row-wise and feature-wise operations take ``x (*, D)`` as it is and return ``y`` in its shape
    takes_tokens = True
    #: parameters and running statistics are read in their own dtype (no cast launched)
    native_params = True
    #: groupwise_norm takes ``statistics=False``: the caller reads ``y`` alone
    optional_group_statistics = True
    #: featurewise_norm / power_norm take ``running=``: the running statistics move
    #: inside the finalize kernel (the device-side policy of :mod:`seqnorm.running`)
    fuses_running_update = True

    @staticmethod
    def fuses_reduced_update(reduce, x):
        """Whether the Sync modules' ``reduce`` hook takes ``running=`` too (a gathering
        hook: the finalize after the collective moves the running statistics)."""
        return _gathers(reduce, x)

    @staticmethod
    def rowwise_norm(x, weight, bias, eps, pad, center):
        return rowwise_fwd.y(x, None, weight, bias, pad, float(eps), center, False)

    @staticmethod
    def add_rowwise_norm(x, residual, weight, bias, eps, pad, center, need_sum=True):
        if not need_sum:   # (y alone from the autograd.Function: see ForwardOp.y)
            return rowwise_fwd.y(x, residual, weight, bias, pad, float(eps), center, False), None
        return rowwise_fwd(x, residual, weight, bias, pad, float(eps), center, True)[:2]

    @staticmethod
    def featurewise_norm(x, weight, bias, eps, pad, mean=None, var=None, reduce=None, running=None):
        """``running = (running_mean, running_var, num_batches_tracked, momentum)``:
        update them in the finalize kernel (training, the sync-free policy); then ``y`` alone
        comes back (the batch statistics and count as None: an autograd.Function's output
        costs ~0.4 µs of host time, and the caller reads none of them there)."""
        if reduce is not None and mean is None:
            if _gathers(reduce, x):
                return _GatheredFeaturewise.apply(x, weight, bias, float(eps), pad, reduce, running)
            return _ReducedFeaturewise.apply(x, weight, bias, float(eps), pad, reduce)
        if mean is not None and running is None:   # eval: the caller reads y alone (no batch statistics)
            return featurewise_fwd.y(x, weight, bias, pad, mean, var, float(eps), None, None, None, 0.0,
                                     False), None, None, None
        if running is not None:   # the finalize moves the running statistics: the caller reads y alone
            rmean, rvar, nbt, momentum = running
            return featurewise_fwd.y(x, weight, bias, pad, mean, var, float(eps), rmean, rvar, nbt,
                                     None if momentum is None else float(momentum), True), None, None, None
        return featurewise_fwd(x, weight, bias, pad, mean, var, float(eps), None, None, None, 0.0, False)[:4]

    @staticmethod
    def power_norm(x, weight, bias, eps, pad, running_phi, running_nu, factor, reduce=None, running=None,
                   training=True):
        """``running = (momentum, num_batches_tracked)``: the finalize kernel forms the
        step's weight and moves ψ² and the counter (training, the sync-free policy);
        without it ``factor`` (a float or a 0-d tensor) weighs ν's step. ``training=False``
        (eval) skips the batch statistic: the caller does not read it."""
        if reduce is not None:
            # factor as a 0-d tensor: the cumulative average's is one where the host is not asked
            if _gathers(reduce, x):
                given = None if running is not None else (
                    factor.float().reshape(()) if isinstance(factor, Tensor) else torch.full((), float(factor),
                                                                                          device=x.device))
                return _GatheredPower.apply(x, weight, bias, pad, running_phi, running_nu, float(eps), given,
                                            reduce, running)
            factor = factor if isinstance(factor, Tensor) else torch.full((), factor, device=x.device)
            return _ReducedPower.apply(x, weight, bias, pad, running_phi, running_nu, float(eps), factor, reduce)
        if running is not None:   # the finalize moves ψ² and the counter: the caller reads y alone
            momentum, nbt = running
            return power_fwd.y(x, weight, bias, pad, running_phi, running_nu, float(eps), True,
                               None if momentum is None else float(momentum), nbt, None, True), None, None
        given = factor.float().reshape(()) if isinstance(factor, Tensor) else None
        return power_fwd(x, weight, bias, pad, running_phi, running_nu, float(eps), bool(training),
                         None if given is not None else float(factor), None, given, False)[:3]

    @staticmethod
    def instance_running_update(mean, var, steps, running_mean, running_var, num_batches_tracked, momentum):
        """InstanceNorm's running statistics moved from the instances' ``mean``, ``var``
        ``(B, C)`` and ``steps (B,)`` in one kernel (the sync-free policy)."""
        b, c = mean.shape
        nbt = num_batches_tracked
        fk.instance_finalize.launch((1,), mean.float().contiguous(), var.float().contiguous(), steps.contiguous(),
                                   running_mean, running_var, nbt if nbt is not None else steps, b, c,
                                   float(momentum or 0.0), HAS_NBT=nbt is not None, CUMULATIVE=momentum is None,
                                   BLOCK_F=_finalize_block(c), num_warps=4)

    @staticmethod
    def groupwise_norm(x, weight, bias, eps, pad, groups, statistics=True):
        """``statistics=False``: the caller reads ``y`` alone (the other outputs are None)."""
        if not statistics:
            return groupwise_fwd.y(x, weight, bias, pad, float(eps), int(groups), False), None, None, None
        return groupwise_fwd(x, weight, bias, pad, float(eps), int(groups), True)[:4]


register_backend("triton", lambda x: TritonBackend if supports(x) else backend_named("torch", x))
