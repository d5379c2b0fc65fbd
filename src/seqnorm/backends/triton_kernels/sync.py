r"""Finalize kernels of the Sync modules (:mod:`seqnorm.distributed`) on the triton backend.

A rank's partial kernels are the single-process ones (:mod:`.featurewise`),
launched on a grid of ``P`` row programs fixed per device and width (programs
past the last row write empty partials), so every rank's buffer has the same
size and one collective exchanges it whole:

- SyncSeqBatchNorm forward: each rank's ``[K | n_p | μ_p − K | M_p]`` (float32,
  ``D + P + 2PD``) is all-gathered; :func:`sync_bn_finalize` merges each rank's
  programs (float32, in order, as :func:`.featurewise.bn_finalize`), then the
  ranks in rank order with Chan's formula in float64 — every rank the same
  bits — and applies the running-statistics policy and the coefficients.
- its backward: :func:`sync_bn_grad_sums` writes the local ``dγ``, ``dβ`` (DDP
  reduces them) and the float64 ``[Σ dy | Σ dy·x̂]`` that one ``all_reduce``
  sums; :func:`sync_bn_input_grad` forms ``c₁ = a·Σdy/n``, ``c₂ = a·Σdy·x̂/n``
  in its programs (no coefficient pass).
- SyncPowerNorm forward: each rank's ``[n_p | Σ_p x²]`` is all-gathered;
  :func:`sync_power_finalize` sums them (ranks in order, float64) into ψ_B², n,
  and moves ψ² as :func:`.featurewise.power_finalize` does.
- its backward: :func:`sync_power_grad_sums` writes the local ``dγ``, ``dβ``
  and the float64 ``Σ w·dγ`` that one ``all_reduce`` sums; :func:`sync_nu_finalize`
  moves ν with the global ``Γ = r²·ψ_B²`` and ``Λ = Σ w·dγ / (n·W)`` (ν in the
  scale of the gradient DDP applies, the ranks' average).
"""

import triton
import triton.language as tl

from .featurewise import (bn_dx_rows, bn_stats, features, finish_power, merge_programs, nu_candidate,
                          rstd_scale, select_nu, stats_finite, step_factor, store_bn_stats, store_power_stats,
                          unbiased_var, update_bn_running, vec)
from .partials import block_sums, feature_block, store_as, store_grads, sum_rows


@triton.jit
def sync_bn_finalize(
    GATHERED,   # (R, L) float32: each rank's [K (D) | n_p (P) | μ_p − K (P, D) | M_p (P, D)]
    W,          # (D,) weight, its dtype (HAS_W)
    STATS,      # (3, D) float32 out: this rank's K, δ = μ − K, r
    SCALE,      # (D,) float32 out: a = w·r
    MEAN,       # (D,) float32 out: the global mean
    VAR,        # (D,) float32 out: the global biased variance
    COUNT,      # () int64 out: the global n
    RMEAN, RVAR, NBT,   # running statistics and counter, moved in place (UPDATE, HAS_NBT)
    R, L, RANK, P, D, eps, momentum,
    HAS_W: tl.constexpr, UPDATE: tl.constexpr, HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    finite = 1
    n_all = tl.zeros([BLOCK_F], dtype=tl.float64)
    for f0 in range(0, D, BLOCK_F):
        feats, fmask = feature_block(f0, D, BLOCK_F)
        n_all = tl.zeros([BLOCK_F], dtype=tl.float64)
        mu = tl.zeros([BLOCK_F], dtype=tl.float64)
        m2 = tl.zeros([BLOCK_F], dtype=tl.float64)
        for r in range(0, R):
            base = GATHERED + r * L
            # this rank's programs, as bn_finalize ...
            n_r, mean, m2_r = merge_programs(base + D, base + D + P, base + D + P + P * D, P, D, feats, fmask,
                                              BLOCK_F)
            # ... then the ranks, in rank order, in float64 (absolute means: each rank has its own K):
            # _chan's formula written out, in this order — through _chan, ptxas (sm_90, BLOCK_F=1024)
            # allocates 168 registers and spills 16 B where this form fits in 182 without a spill
            n_r = n_r.to(tl.float64)
            tot = n_all + n_r
            w_r = tl.where(tot > 0, n_r / tl.maximum(tot, 1.0), 0.0)
            diff64 = (vec(base, feats, fmask, 0.0).to(tl.float64) + mean.to(tl.float64)) - mu
            mu += diff64 * w_r
            m2 += m2_r.to(tl.float64) + diff64 * diff64 * n_all * w_r
            n_all = tot
        var = (m2 / tl.maximum(n_all, 1.0)).to(tl.float32)
        rstd, a = rstd_scale(var, eps, W, feats, fmask, HAS_W)
        k = vec(GATHERED + RANK * L, feats, fmask, 0.0)
        batch_mean = mu.to(tl.float32)
        tl.store(STATS + feats, k, mask=fmask)
        store_bn_stats(STATS, SCALE, MEAN, VAR, D, feats, fmask, (mu - k.to(tl.float64)).to(tl.float32), rstd, a,
                        batch_mean, var)
        if UPDATE:
            finite = stats_finite(finite, batch_mean, unbiased_var(var, n_all.to(tl.float32)), fmask)
    total = tl.max(n_all, axis=0)
    tl.store(COUNT, total.to(tl.int64))
    if UPDATE:
        update_bn_running(MEAN, VAR, RMEAN, RVAR, NBT, total.to(tl.float32), finite, D, momentum, HAS_NBT,
                           CUMULATIVE, BLOCK_F)


@triton.jit
def sync_bn_grad_sums(
    DG_PART,    # (P, D) float32: Σ dy·x̂ of each program
    DB_PART,    # (P, D) float32: Σ dy
    DW, DB,     # (D,) out: this rank's dγ, dβ in the parameters' dtypes (HAS_W, HAS_B)
    SUMS,       # (2D,) float64 out: [Σ dy | Σ dy·x̂] of this rank, to all-reduce
    P, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats, fmask, dgamma, dbeta = block_sums(DG_PART, DB_PART, P, D, BLOCK_F)
    tl.store(SUMS + feats, dbeta.to(tl.float64), mask=fmask)
    tl.store(SUMS + D + feats, dgamma.to(tl.float64), mask=fmask)
    store_grads(DW, DB, feats, fmask, dgamma, dbeta, HAS_W, HAS_B)


@triton.jit
def sync_bn_input_grad(
    DY, X, PAD,  # (N, D), (N, D), (N,) uint8 (HAS_PAD)
    STATS,      # (3, D) float32: K, δ, r
    SCALE,      # (D,) float32: a
    SUMS,       # (2D,) float64: the global [Σ dy | Σ dy·x̂]
    COUNT,      # () int64: the global n
    DX,
    stride_dy, stride_x, stride_dx, N, D, rows_per_program,
    HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """``dx = a·dy − c₁ − x̂·c₂`` as :func:`.featurewise.bn_input_grad`, the coefficients formed here."""
    feats, fmask = features(BLOCK_F, D)
    k, delta, rstd = bn_stats(STATS, D, feats, fmask)
    a = vec(SCALE, feats, fmask, 0.0)
    inv_n = 1.0 / tl.maximum(tl.load(COUNT).to(tl.float32), 1.0)
    c1 = a * vec(SUMS, feats, fmask, 0.0) * inv_n
    c2 = a * vec(SUMS + D, feats, fmask, 0.0) * inv_n
    bn_dx_rows(DY, X, PAD, DX, k, delta, rstd, a, c1, c2, stride_dy, stride_x, stride_dx, N, rows_per_program,
                feats, fmask, HAS_PAD, BLOCK_N)


@triton.jit
def sync_power_finalize(
    GATHERED,   # (R, L) float32: each rank's [n_p (P) | Σ_p x² (P, D)]
    PHI_B,      # (D,) float32 out: the global ψ_B² = Σ x²/n
    COUNT,      # () int64 out: the global n
    FACTOR,     # () float32 out: the step's weight f
    NU, NU_BEFORE,  # (D,) ν and its copy as of this forward (HAS_NU)
    PHI,        # (D,) the running ψ², moved in place (UPDATE)
    NBT,        # () int64 (HAS_NBT)
    GIVEN,      # () the step's weight, given (HAS_FACTOR)
    R, L, P, D, momentum,
    HAS_NU: tl.constexpr, UPDATE: tl.constexpr, HAS_NBT: tl.constexpr, HAS_FACTOR: tl.constexpr,
    CUMULATIVE: tl.constexpr, BLOCK_F: tl.constexpr,
):
    n = 0.0
    for r in range(0, R):
        for p in range(0, P):
            n += tl.load(GATHERED + r * L + p)
    inv_n = 1.0 / tl.maximum(n.to(tl.float64), 1.0)
    factor = step_factor(GIVEN, NBT, momentum, HAS_FACTOR, CUMULATIVE)
    finite = 1
    for f0 in range(0, D, BLOCK_F):
        feats, fmask = feature_block(f0, D, BLOCK_F)
        total = tl.zeros([BLOCK_F], dtype=tl.float64)
        for r in range(0, R):                                       # ranks in order
            total += sum_rows(GATHERED + r * L + P, P, D, feats, fmask).to(tl.float64)
        phi = (total * inv_n).to(tl.float32)
        finite = store_power_stats(PHI_B, NU, NU_BEFORE, feats, fmask, phi, finite, HAS_NU, UPDATE)
    finish_power(COUNT, FACTOR, PHI_B, PHI, NBT, n, finite, factor, D, UPDATE, HAS_NBT, BLOCK_F)


@triton.jit
def sync_power_grad_sums(
    DG_PART, DB_PART,   # (P, D) float32: Σ dy·x̂, Σ dy of each program
    W,          # (D,) weight (HAS_W)
    DW, DB,     # (D,) out: this rank's dγ, dβ in the parameters' dtypes (HAS_W, HAS_B)
    SUMS,       # (D,) float64 out: this rank's Σ x̂ ⊙ g = w·dγ, to all-reduce (MOVE_NU)
    P, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, MOVE_NU: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats, fmask = feature_block(tl.program_id(0) * BLOCK_F, D, BLOCK_F)
    dgamma = sum_rows(DG_PART, P, D, feats, fmask)
    if HAS_W:
        store_as(DW, feats, fmask, dgamma)
    if HAS_B:
        tl.store(DB + feats, sum_rows(DB_PART, P, D, feats, fmask).to(DB.dtype.element_ty), mask=fmask)
    if MOVE_NU:
        lam = dgamma
        if HAS_W:
            lam = vec(W, feats, fmask, 0.0) * dgamma
        tl.store(SUMS + feats, lam.to(tl.float64), mask=fmask)


@triton.jit
def sync_nu_finalize(
    SUMS,       # (D,) float64: the global Σ x̂ ⊙ g
    RSTD,       # (D,) float32: r
    PHI_B,      # (D,) float32: the global ψ_B²
    COUNT,      # () int64: the global n
    FACTOR,     # () float32: f
    NU_BEFORE,  # (D,) ν as of the forward
    NU,         # (D,) ν, moved in place
    NU_NEW,     # (D,) float32 scratch
    D, world,
    BLOCK_F: tl.constexpr,
):
    """One program: ν ← ν(1 − f·Γ) + f·Λ, ``Γ = r²·ψ_B²``, ``Λ = Σ x̂⊙g / (n·W)``,
    where ``n > 0`` and every new ν is finite."""
    n = tl.load(COUNT).to(tl.float32)
    inv = 1.0 / (tl.maximum(n, 1.0) * world)
    factor = tl.load(FACTOR)
    finite = 1
    for f0 in range(0, D, BLOCK_F):
        feats, fmask = feature_block(f0, D, BLOCK_F)
        lam = vec(SUMS, feats, fmask, 0.0) * inv
        finite = nu_candidate(NU_BEFORE, NU_NEW, RSTD, PHI_B, feats, fmask, lam, factor, finite)
    select_nu(NU, NU_NEW, n, finite, D, BLOCK_F)
