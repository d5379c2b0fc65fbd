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

from .featurewise import _all_finite, _factor, _moved, _vec
from .partials import sum_rows


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
        feats = f0 + tl.arange(0, BLOCK_F)
        fmask = feats < D
        n_all = tl.zeros([BLOCK_F], dtype=tl.float64)
        mu = tl.zeros([BLOCK_F], dtype=tl.float64)
        m2 = tl.zeros([BLOCK_F], dtype=tl.float64)
        for r in range(0, R):
            base = GATHERED + r * L
            n_a = 0.0
            mean = tl.zeros([BLOCK_F], dtype=tl.float32)
            m2_r = tl.zeros([BLOCK_F], dtype=tl.float32)
            for p in range(0, P):                                   # this rank's programs, as bn_finalize
                n_b = tl.load(base + D + p)
                n = n_a + n_b
                w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
                diff = tl.load(base + D + P + p * D + feats, mask=fmask, other=0.0) - mean
                mean += diff * w_b
                m2_r += tl.load(base + D + P + P * D + p * D + feats, mask=fmask, other=0.0) + diff * diff * n_a * w_b
                n_a = n
            # the ranks, in rank order, in float64 (absolute means: each rank has its own K)
            n_r = n_a.to(tl.float64)
            tot = n_all + n_r
            w_r = tl.where(tot > 0, n_r / tl.maximum(tot, 1.0), 0.0)
            diff64 = (_vec(base, feats, fmask, 0.0).to(tl.float64) + mean.to(tl.float64)) - mu
            mu += diff64 * w_r
            m2 += m2_r.to(tl.float64) + diff64 * diff64 * n_all * w_r
            n_all = tot
        var = (m2 / tl.maximum(n_all, 1.0)).to(tl.float32)
        rstd = 1.0 / tl.sqrt(var + eps)
        a = rstd
        if HAS_W:
            a = rstd * _vec(W, feats, fmask, 0.0)
        k = _vec(GATHERED + RANK * L, feats, fmask, 0.0)
        batch_mean = mu.to(tl.float32)
        tl.store(STATS + feats, k, mask=fmask)
        tl.store(STATS + D + feats, (mu - k.to(tl.float64)).to(tl.float32), mask=fmask)
        tl.store(STATS + 2 * D + feats, rstd, mask=fmask)
        tl.store(SCALE + feats, a, mask=fmask)
        tl.store(MEAN + feats, batch_mean, mask=fmask)
        tl.store(VAR + feats, var, mask=fmask)
        if UPDATE:
            n32 = n_all.to(tl.float32)
            unbiased = var * (n32 / tl.maximum(n32 - 1.0, 1.0))
            finite = tl.minimum(finite, tl.minimum(_all_finite(batch_mean, fmask), _all_finite(unbiased, fmask)))
    total = tl.max(n_all, axis=0)
    tl.store(COUNT, total.to(tl.int64))
    if UPDATE:
        n32 = total.to(tl.float32)
        ok = (n32 >= 2.0) & (finite == 1)
        factor = _factor(NBT, momentum, CUMULATIVE)
        tl.debug_barrier()                                          # MEAN, VAR as written above
        for f0 in range(0, D, BLOCK_F):
            feats = f0 + tl.arange(0, BLOCK_F)
            fmask = feats < D
            var = tl.load(VAR + feats, mask=fmask, other=0.0)
            unbiased = var * (n32 / tl.maximum(n32 - 1.0, 1.0))
            _moved(RMEAN, feats, fmask, tl.load(MEAN + feats, mask=fmask, other=0.0), factor, ok)
            _moved(RVAR, feats, fmask, unbiased, factor, ok)
        if HAS_NBT:
            tl.store(NBT, tl.load(NBT) + ok.to(tl.int64))


@triton.jit
def sync_bn_grad_sums(
    DG_PART,    # (P, D) float32: Σ dy·x̂ of each program
    DB_PART,    # (P, D) float32: Σ dy
    DW, DB,     # (D,) out: this rank's dγ, dβ in the parameters' dtypes (HAS_W, HAS_B)
    SUMS,       # (2D,) float64 out: [Σ dy | Σ dy·x̂] of this rank, to all-reduce
    P, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = feats < D
    dgamma = sum_rows(DG_PART, P, D, feats, fmask)
    dbeta = sum_rows(DB_PART, P, D, feats, fmask)
    tl.store(SUMS + feats, dbeta.to(tl.float64), mask=fmask)
    tl.store(SUMS + D + feats, dgamma.to(tl.float64), mask=fmask)
    if HAS_W:
        tl.store(DW + feats, dgamma.to(DW.dtype.element_ty), mask=fmask)
    if HAS_B:
        tl.store(DB + feats, dbeta.to(DB.dtype.element_ty), mask=fmask)


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
    feats = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = feats < D
    k = _vec(STATS, feats, fmask, 0.0)
    delta = _vec(STATS + D, feats, fmask, 0.0)
    rstd = _vec(STATS + 2 * D, feats, fmask, 0.0)
    a = _vec(SCALE, feats, fmask, 0.0)
    inv_n = 1.0 / tl.maximum(tl.load(COUNT).to(tl.float32), 1.0)
    c1 = a * _vec(SUMS, feats, fmask, 0.0) * inv_n
    c2 = a * _vec(SUMS + D, feats, fmask, 0.0) * inv_n
    start = tl.program_id(0).to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, N)
    for r0 in range(start, end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        real = rows < end
        if HAS_PAD:
            real = real & (tl.load(PAD + rows, mask=real, other=1) == 0)
        tile = real[:, None] & fmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + feats[None, :], mask=tile, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + feats[None, :], mask=tile, other=0.0).to(tl.float32)
        xhat = ((x - k[None, :]) - delta[None, :]) * rstd[None, :]
        dx = tl.where(tile, a[None, :] * dy - c1[None, :] - xhat * c2[None, :], 0.0)
        out = (rows < end)[:, None] & fmask[None, :]
        tl.store(DX + rows[:, None] * stride_dx + feats[None, :], dx.to(DX.dtype.element_ty), mask=out)


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
    if HAS_FACTOR:
        factor = tl.load(GIVEN).to(tl.float32)
    else:
        factor = _factor(NBT, momentum, CUMULATIVE)
    finite = 1
    for f0 in range(0, D, BLOCK_F):
        feats = f0 + tl.arange(0, BLOCK_F)
        fmask = feats < D
        total = tl.zeros([BLOCK_F], dtype=tl.float64)
        for r in range(0, R):                                       # ranks in order
            total += sum_rows(GATHERED + r * L + P, P, D, feats, fmask).to(tl.float64)
        phi = (total * inv_n).to(tl.float32)
        tl.store(PHI_B + feats, phi, mask=fmask)
        if HAS_NU:
            tl.store(NU_BEFORE + feats, tl.load(NU + feats, mask=fmask, other=0.0), mask=fmask)
        if UPDATE:
            finite = tl.minimum(finite, _all_finite(phi, fmask))
    tl.store(COUNT, n.to(tl.int64))
    tl.store(FACTOR, factor)
    if UPDATE:
        ok = (n >= 1.0) & (finite == 1)
        tl.debug_barrier()                                          # PHI_B as written above
        for f0 in range(0, D, BLOCK_F):
            feats = f0 + tl.arange(0, BLOCK_F)
            fmask = feats < D
            _moved(PHI, feats, fmask, tl.load(PHI_B + feats, mask=fmask, other=0.0), factor, ok)
        if HAS_NBT:
            tl.store(NBT, tl.load(NBT) + ok.to(tl.int64))


@triton.jit
def sync_power_grad_sums(
    DG_PART, DB_PART,   # (P, D) float32: Σ dy·x̂, Σ dy of each program
    W,          # (D,) weight (HAS_W)
    DW, DB,     # (D,) out: this rank's dγ, dβ in the parameters' dtypes (HAS_W, HAS_B)
    SUMS,       # (D,) float64 out: this rank's Σ x̂ ⊙ g = w·dγ, to all-reduce (MOVE_NU)
    P, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, MOVE_NU: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = feats < D
    dgamma = sum_rows(DG_PART, P, D, feats, fmask)
    if HAS_W:
        tl.store(DW + feats, dgamma.to(DW.dtype.element_ty), mask=fmask)
    if HAS_B:
        tl.store(DB + feats, sum_rows(DB_PART, P, D, feats, fmask).to(DB.dtype.element_ty), mask=fmask)
    if MOVE_NU:
        lam = dgamma
        if HAS_W:
            lam = _vec(W, feats, fmask, 0.0) * dgamma
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
        feats = f0 + tl.arange(0, BLOCK_F)
        fmask = feats < D
        lam = _vec(SUMS, feats, fmask, 0.0) * inv
        rstd = tl.load(RSTD + feats, mask=fmask, other=0.0)
        gamma = rstd * rstd * tl.load(PHI_B + feats, mask=fmask, other=0.0)
        new = _vec(NU_BEFORE, feats, fmask, 0.0) * (1.0 - factor * gamma) + factor * lam
        tl.store(NU_NEW + feats, new, mask=fmask)
        finite = tl.minimum(finite, _all_finite(new, fmask))
    ok = (n > 0.0) & (finite == 1)
    tl.debug_barrier()                                              # NU_NEW as written above
    for f0 in range(0, D, BLOCK_F):
        feats = f0 + tl.arange(0, BLOCK_F)
        fmask = feats < D
        nu = tl.load(NU + feats, mask=fmask, other=0.0)
        new = tl.load(NU_NEW + feats, mask=fmask, other=0.0).to(NU.dtype.element_ty)
        tl.store(NU + feats, tl.where(ok, new, nu), mask=fmask)
