r"""Finalize of parameter gradients: per-program partial sums → the gradients, in one launch.

Every backward kernel writes its ``Σ dy ⊙ x̂`` and ``Σ dy`` as one row per
program of a ``(P, D)`` float32 buffer (each program writes its whole row, so
the buffer needs no zero fill). :func:`param_grads` sums the rows in order —
the same bits on every run, no atomics — and writes ``dγ`` and ``dβ`` in the
parameters' own dtype (float32 accumulation, rounded once), so no cast follows.

The device helpers every family's kernels share live here too: a program's
rows (:func:`program_rows`), its partial row (:func:`store_partials`), a block
of features (:func:`feature_block`) and the parameter-gradient stores
(:func:`store_param_grads`, :func:`store_as`).
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
def program_rows(pid, N, rows_per_program):
    """Program ``pid``'s rows ``[start, end)`` of ``N`` (int64: N·D may pass 2^31)."""
    start = pid.to(tl.int64) * rows_per_program
    return start, tl.minimum(start + rows_per_program, N)


@triton.jit
def store_partials(DW_PART, DB_PART, p, D, feats, fmask, dw, db):
    """Program ``p``'s row of the partial sums: ``DW_PART[p] ← Σ dy ⊙ x̂``, ``DB_PART[p] ← Σ dy``."""
    tl.store(DW_PART + p * D + feats, dw, mask=fmask)
    tl.store(DB_PART + p * D + feats, db, mask=fmask)


@triton.jit
def feature_block(f0, D, BLOCK_F: tl.constexpr):
    """Features ``[f0, f0 + BLOCK_F)`` and which of them are ``< D``."""
    feats = f0 + tl.arange(0, BLOCK_F)
    return feats, feats < D


@triton.jit
def store_as(PTR, feats, fmask, value):
    """``value`` (float32) written to a ``(D,)`` output in its dtype, rounded once."""
    tl.store(PTR + feats, value.to(PTR.dtype.element_ty), mask=fmask)


@triton.jit
def block_sums(DW_PART, DB_PART, P, D, BLOCK_F: tl.constexpr):
    """Program ``f``'s features (a 1-D grid over feature blocks) and their ordered
    sums ``Σ_p DW_PART[p]``, ``Σ_p DB_PART[p]``: ``(feats, fmask, dγ, dβ)``."""
    feats, fmask = feature_block(tl.program_id(0) * BLOCK_F, D, BLOCK_F)
    return feats, fmask, sum_rows(DW_PART, P, D, feats, fmask), sum_rows(DB_PART, P, D, feats, fmask)


@triton.jit
def store_grads(DW, DB, feats, fmask, dgamma, dbeta, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """``dγ``, ``dβ`` written in the parameters' dtypes (each where the parameter is)."""
    if HAS_W:
        store_as(DW, feats, fmask, dgamma)
    if HAS_B:
        store_as(DB, feats, fmask, dbeta)


@triton.jit
def store_param_grads(DW_PART, DB_PART, DW, DB, P, D, feats, fmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """``dγ``, ``dβ`` of the features ``feats``: the ordered sums of the partial rows."""
    if HAS_W:
        tl.store(DW + feats, sum_rows(DW_PART, P, D, feats, fmask).to(DW.dtype.element_ty), mask=fmask)
    if HAS_B:
        tl.store(DB + feats, sum_rows(DB_PART, P, D, feats, fmask).to(DB.dtype.element_ty), mask=fmask)


@triton.jit
def param_grads(
    DW_PART,    # (P, D) float32: Σ dy ⊙ x̂ of each program's rows (HAS_W)
    DB_PART,    # (P, D) float32: Σ dy (HAS_B)
    DW,         # (D,) out, the weight's dtype (HAS_W)
    DB,         # (D,) out, the bias's dtype (HAS_B)
    P, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats, fmask = feature_block(tl.program_id(0) * BLOCK_F, D, BLOCK_F)
    store_param_grads(DW_PART, DB_PART, DW, DB, P, D, feats, fmask, HAS_W, HAS_B)
