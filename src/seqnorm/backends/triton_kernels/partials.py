r"""Finalize of parameter gradients: per-program partial sums → the gradients, in one launch.

Every backward kernel writes its ``Σ dy ⊙ x̂`` and ``Σ dy`` as one row per
program of a ``(P, D)`` float32 buffer (each program writes its whole row, so
the buffer needs no zero fill). :func:`param_grads` sums the rows in order —
the same bits on every run, no atomics — and writes ``dγ`` and ``dβ`` in the
parameters' own dtype (float32 accumulation, rounded once), so no cast follows.
"""

import triton
import triton.language as tl


@triton.jit
def sum_rows(PART, P, D, feats, fmask):
    """``Σ_p PART[p, feats]`` in float32, ``p`` in order."""
    acc = tl.zeros(feats.shape, dtype=tl.float32)
    for p in range(0, P):
        acc += tl.load(PART + p * D + feats, mask=fmask, other=0.0)
    return acc


@triton.jit
def param_grads(
    DW_PART,    # (P, D) float32: Σ dy ⊙ x̂ of each program's rows (HAS_W)
    DB_PART,    # (P, D) float32: Σ dy (HAS_B)
    DW,         # (D,) out, the weight's dtype (HAS_W)
    DB,         # (D,) out, the bias's dtype (HAS_B)
    P, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = feats < D
    if HAS_W:
        tl.store(DW + feats, sum_rows(DW_PART, P, D, feats, fmask).to(DW.dtype.element_ty), mask=fmask)
    if HAS_B:
        tl.store(DB + feats, sum_rows(DB_PART, P, D, feats, fmask).to(DB.dtype.element_ty), mask=fmask)
