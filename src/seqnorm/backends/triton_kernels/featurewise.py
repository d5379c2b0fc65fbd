r"""Feature-wise norms in Triton: masked BatchNorm and PowerNorm over the token axis.

``x`` is ``(N, D)`` (every token of a batch), ``PAD`` is ``(N,)``. A program
``(p, f)`` owns feature block ``f`` (``BLOCK_F`` features) of the rows
``[p·rows_per_program, (p + 1)·rows_per_program)``, read as tiles of ``BLOCK_N``
rows; a padded row's loads are masked off. The number of row programs ``P`` is
fixed per device and width (a few per SM in all), so the per-program partials
that a finalize kernel merges stay small, and the partition — hence the bits —
is the same on every run.

A call is three launches at most: *partials* → one *finalize* → *normalize*
(forward), *partials* → *finalize* → *input gradient* (backward), the
finalize applying the running-statistics policy of :mod:`seqnorm.running`
(its specification) on the device.

Statistics (:func:`moments_partial`, :func:`bn_finalize`), of ``x − K`` with
``K`` the first real row (each program finds it: so that a large common
offset cancels exactly, as in the CPU kernels). Each ``BLOCK_N`` tile gives,
per feature, its count of real rows, mean and centred second moment
(corrected two-pass in registers); tiles, then programs (in order), merge with
Chan et al.'s formula into ``δ = μ − K`` and ``σ²``,

.. math::
    n = n_a + n_b,\quad Δ = μ_b − μ_a,\quad μ = μ_a + Δ\,\frac{n_b}{n},\quad
    M = M_a + M_b + Δ^2\,\frac{n_a n_b}{n},\qquad σ^2 = M/n

— deterministic, no atomics. Normalization (:func:`bn_normalize`):
``y = ((x − K) − δ)·a + b`` with ``a = w·r``, ``r = 1/√(σ² + ε)``, 0 at padding.

Running statistics (:func:`bn_finalize`, the device-side select of
:func:`seqnorm.running.update_batch_norm_stats`): with ``f`` the momentum, or
``1/(num_batches_tracked + 1)``, ``running ← running + (batch − running)·f``
for the mean and the unbiased ``σ²·n/(n − 1)``, kept only where ``n ≥ 2`` and
every statistic is finite; ``num_batches_tracked`` moves by that flag.

Backward of BatchNorm (:func:`grad_partial`, :func:`bn_grad_finalize`, then
:func:`bn_input_grad`), with ``x̂ = ((x − K) − δ)·r`` and sums over real rows:

.. math::
    dβ = \sum dy,\quad dγ = \sum dy\,\hat{x},\quad
    dx = a\,dy - c_1 - \hat{x}\,c_2,\quad c_1 = a\,\frac{dβ}{n},\quad c_2 = a\,\frac{dγ}{n}

(with running statistics, eval: ``dx = a·dy``, fused with the sums in
:func:`grad_partial`).

PowerNorm (:func:`power_normalize`, :func:`power_finalize`;
:func:`power_input_grad`, :func:`power_grad_finalize`): ``y = x·a + b`` with
``r = 1/√(ψ² + ε)`` of the running ψ², the batch's ``ψ_B² = Σ x²/n`` merged
by the finalize, which moves ψ² as above (kept where ``n ≥ 1`` and finite).
Backward ``dx = (w·dy − ν·x̂)·r`` with ``x̂ = x·r`` and ν as of the forward;
its finalize moves ν by Algorithm 1 (:func:`seqnorm.running.nu_step`):
``ν ← ν(1 − f·Γ) + f·Λ``, ``Γ = r²·ψ_B²``, ``Λ = w·dγ/n``, kept where
``n > 0`` and every new ν is finite.
"""

import triton
import triton.language as tl

from .partials import (block_sums, feature_block, program_rows, store_as, store_grads, store_param_grads,
                       store_partials, sum_rows)

#: how many features one program of a single-program finalize holds at a time
FINALIZE_BLOCK = 1024


# ---------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------


@triton.jit
def features(BLOCK_F: tl.constexpr, D):
    feats = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    return feats, feats < D


@triton.jit
def _tile(PAD, r0, end, fmask, HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's rows (int64), its real rows (BLOCK_N,) and its mask (BLOCK_N, BLOCK_F)."""
    rows = r0 + tl.arange(0, BLOCK_N)
    real = rows < end
    if HAS_PAD:
        real = real & (tl.load(PAD + rows, mask=real, other=1) == 0)
    return rows, real, real[:, None] & fmask[None, :]


@triton.jit
def _load(PTR, rows, feats, tile, stride):
    """The tile of a ``(N, D)`` tensor as float32; 0 outside ``tile`` (padded rows are not read)."""
    return tl.load(PTR + rows[:, None] * stride + feats[None, :], mask=tile, other=0.0).to(tl.float32)


@triton.jit
def _tile_pair(X, DY, PAD, r0, end, feats, fmask, stride_x, stride_dy,
               HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """A backward tile: its rows, its mask, and ``x``, ``dy`` as float32 (0 outside the mask)."""
    rows, real, tile = _tile(PAD, r0, end, fmask, HAS_PAD, BLOCK_N)
    return rows, tile, _load(X, rows, feats, tile, stride_x), _load(DY, rows, feats, tile, stride_dy)


@triton.jit
def _store(PTR, rows, feats, end, fmask, stride, value):
    """Write a tile of an ``(N, D)`` output in its dtype (padded rows get the 0 in ``value``)."""
    out = (rows < end)[:, None] & fmask[None, :]
    tl.store(PTR + rows[:, None] * stride + feats[None, :], value.to(PTR.dtype.element_ty), mask=out)


@triton.jit
def vec(PTR, feats, fmask, other):
    """A ``(D,)`` vector's block as float32 (any dtype in memory)."""
    return tl.load(PTR + feats, mask=fmask, other=other).to(tl.float32)


@triton.jit
def _finite(v):
    return (v == v) & (tl.abs(v) < float("inf"))


@triton.jit
def _all_finite(v, fmask):
    """1 where every lane of ``v`` inside ``fmask`` is finite, else 0 (int32)."""
    return tl.min(tl.where(fmask & ~_finite(v), 0, 1), axis=0)


@triton.jit
def _factor(NBT, momentum, CUMULATIVE: tl.constexpr):
    """The new batch's weight, as :func:`seqnorm.running.momentum_factor`: ``momentum``,
    or ``1/(num_batches_tracked + 1)`` formed in float64 and rounded once to the
    float32 that multiplies the statistics."""
    if CUMULATIVE:
        f = (1.0 / (tl.load(NBT).to(tl.float64) + 1.0)).to(tl.float32)
    else:
        f = momentum
    return f


@triton.jit
def _moved(RUN, feats, fmask, value, factor, ok):
    """``running + (value − running)·f`` where ``ok``, each op rounded to the buffer's
    dtype as torch's ops round it (:func:`seqnorm.running._select_update`)."""
    dt = RUN.dtype.element_ty
    run = tl.load(RUN + feats, mask=fmask, other=0.0)
    r = run.to(tl.float32)
    diff = (value.to(dt).to(tl.float32) - r).to(dt).to(tl.float32)
    moved = (r + (diff * factor).to(dt).to(tl.float32)).to(dt)
    tl.store(RUN + feats, tl.where(ok, moved, run), mask=fmask)


@triton.jit
def unbiased_var(var, n):
    """``σ²·n/(n − 1)`` (``σ²·n`` for ``n < 2``, a value no update takes: it needs ``n ≥ 2``)."""
    return var * (n / tl.maximum(n - 1.0, 1.0))


@triton.jit
def _count_batch(NBT, ok, HAS_NBT: tl.constexpr):
    """``num_batches_tracked`` moves by the update's flag ``ok``."""
    if HAS_NBT:
        tl.store(NBT, tl.load(NBT) + ok.to(tl.int64))


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of ``(n_b, μ_b, M_b)`` into ``(n_a, μ_a, M_a)`` (float32 or
    float64, scalars or blocks): ``n = n_a + n_b``, ``Δ = μ_b − μ_a``,
    ``μ = μ_a + Δ·n_b/n``, ``M = M_a + (M_b + Δ²·n_a·n_b/n)``; ``(n_a, μ_a, M_a)`` where ``n = 0``."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    diff = mean_b - mean_a
    return n, mean_a + diff * w_b, m2_a + (m2_b + diff * diff * n_a * w_b)


@triton.jit
def merge_programs(COUNT_PART, MEAN_PART, M2_PART, P, D, feats, fmask, BLOCK_F: tl.constexpr):
    """The programs' partials ``(n_p, μ_p − K, M_p)`` of the features ``feats``, merged
    in program order (float32, the same bits every run): ``(n, δ, M)``."""
    n = 0.0
    mean = tl.zeros([BLOCK_F], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_F], dtype=tl.float32)
    for p in range(0, P):
        n_b = tl.load(COUNT_PART + p)
        mean_b = tl.load(MEAN_PART + p * D + feats, mask=fmask, other=0.0)
        m2_b = tl.load(M2_PART + p * D + feats, mask=fmask, other=0.0)
        n, mean, m2 = _chan(n, mean, m2, n_b, mean_b, m2_b)
    return n, mean, m2


@triton.jit
def rstd_scale(var, eps, W, feats, fmask, HAS_W: tl.constexpr):
    """``r = 1/√(σ² + ε)`` and ``a = w·r`` (``r`` without a weight)."""
    rstd = 1.0 / tl.sqrt(var + eps)
    a = rstd
    if HAS_W:
        a = rstd * vec(W, feats, fmask, 0.0)
    return rstd, a


@triton.jit
def store_bn_stats(STATS, SCALE, MEAN, VAR, D, feats, fmask, delta, rstd, a, batch_mean, var):
    """A BatchNorm finalize's outputs for ``feats``: δ, r (rows 1, 2 of STATS), a, μ, σ²."""
    tl.store(STATS + D + feats, delta, mask=fmask)
    tl.store(STATS + 2 * D + feats, rstd, mask=fmask)
    tl.store(SCALE + feats, a, mask=fmask)
    tl.store(MEAN + feats, batch_mean, mask=fmask)
    tl.store(VAR + feats, var, mask=fmask)


@triton.jit
def stats_finite(finite, batch_mean, unbiased, fmask):
    """``finite``, 0 unless the block's μ and unbiased σ² are finite."""
    return tl.minimum(finite, tl.minimum(_all_finite(batch_mean, fmask), _all_finite(unbiased, fmask)))


@triton.jit
def update_bn_running(MEAN, VAR, RMEAN, RVAR, NBT, n, finite, D, momentum,
                       HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_F: tl.constexpr):
    """The device-side select of :func:`seqnorm.running.update_batch_norm_stats`: the
    running mean and variance move towards ``MEAN`` and the unbiased ``VAR`` where
    ``n ≥ 2`` and ``finite`` (every feature's), ``num_batches_tracked`` by that flag."""
    ok = (n >= 2.0) & (finite == 1)
    factor = _factor(NBT, momentum, CUMULATIVE)
    tl.debug_barrier()                                          # MEAN, VAR as written by this program
    for f0 in range(0, D, BLOCK_F):
        feats, fmask = feature_block(f0, D, BLOCK_F)
        unbiased = unbiased_var(tl.load(VAR + feats, mask=fmask, other=0.0), n)
        _moved(RMEAN, feats, fmask, tl.load(MEAN + feats, mask=fmask, other=0.0), factor, ok)
        _moved(RVAR, feats, fmask, unbiased, factor, ok)
    _count_batch(NBT, ok, HAS_NBT)


@triton.jit
def step_factor(GIVEN, NBT, momentum, HAS_FACTOR: tl.constexpr, CUMULATIVE: tl.constexpr):
    """PowerNorm's step weight ``f``: given (the module's), or :func:`_factor`'s."""
    if HAS_FACTOR:
        factor = tl.load(GIVEN).to(tl.float32)
    else:
        factor = _factor(NBT, momentum, CUMULATIVE)
    return factor


@triton.jit
def store_power_stats(PHI_B, NU, NU_BEFORE, feats, fmask, phi, finite, HAS_NU: tl.constexpr,
                       UPDATE: tl.constexpr):
    """ψ_B² of ``feats`` and ν's copy as of this forward; with UPDATE ``finite`` ← 0
    unless ψ_B² is finite."""
    tl.store(PHI_B + feats, phi, mask=fmask)
    if HAS_NU:
        tl.store(NU_BEFORE + feats, tl.load(NU + feats, mask=fmask, other=0.0), mask=fmask)
    if UPDATE:
        finite = tl.minimum(finite, _all_finite(phi, fmask))
    return finite


@triton.jit
def finish_power(COUNT, FACTOR, PHI_B, PHI, NBT, n, finite, factor, D, UPDATE: tl.constexpr,
                  HAS_NBT: tl.constexpr, BLOCK_F: tl.constexpr):
    """A PowerNorm finalize's n and f; with UPDATE the device-side select of
    :func:`seqnorm.running.update_running_stats` (``min_count`` 1): ψ² moves towards
    ``PHI_B`` where ``n ≥ 1`` and ``finite`` (every feature's)."""
    tl.store(COUNT, n.to(tl.int64))
    tl.store(FACTOR, factor)
    if UPDATE:
        ok = (n >= 1.0) & (finite == 1)
        tl.debug_barrier()                                      # PHI_B as written by this program
        for f0 in range(0, D, BLOCK_F):
            feats, fmask = feature_block(f0, D, BLOCK_F)
            _moved(PHI, feats, fmask, tl.load(PHI_B + feats, mask=fmask, other=0.0), factor, ok)
        _count_batch(NBT, ok, HAS_NBT)


@triton.jit
def nu_candidate(NU_BEFORE, NU_NEW, RSTD, PHI_B, feats, fmask, lam, factor, finite):
    """Algorithm 1's new ν of ``feats`` (:func:`seqnorm.running.nu_step`),
    ``ν(1 − f·Γ) + f·Λ`` with ``Γ = r²·ψ_B²``, into NU_NEW; ``finite`` ← 0 unless it is finite."""
    rstd = tl.load(RSTD + feats, mask=fmask, other=0.0)
    gamma = rstd * rstd * tl.load(PHI_B + feats, mask=fmask, other=0.0)
    new = vec(NU_BEFORE, feats, fmask, 0.0) * (1.0 - factor * gamma) + factor * lam
    tl.store(NU_NEW + feats, new, mask=fmask)
    return tl.minimum(finite, _all_finite(new, fmask))


@triton.jit
def select_nu(NU, NU_NEW, n, finite, D, BLOCK_F: tl.constexpr):
    """ν ← NU_NEW (in ν's dtype) where ``n > 0`` and every new ν is ``finite``
    (:func:`seqnorm.running.move_nu_from_sums`)."""
    ok = (n > 0.0) & (finite == 1)
    tl.debug_barrier()                                          # NU_NEW as written by this program
    for f0 in range(0, D, BLOCK_F):
        feats, fmask = feature_block(f0, D, BLOCK_F)
        nu = tl.load(NU + feats, mask=fmask, other=0.0)
        new = tl.load(NU_NEW + feats, mask=fmask, other=0.0).to(NU.dtype.element_ty)
        tl.store(NU + feats, tl.where(ok, new, nu), mask=fmask)


@triton.jit
def bn_stats(STATS, D, feats, fmask):
    """``K``, ``δ``, ``r`` of ``feats`` (the rows of STATS)."""
    return vec(STATS, feats, fmask, 0.0), vec(STATS + D, feats, fmask, 0.0), vec(STATS + 2 * D, feats, fmask, 0.0)


@triton.jit
def bn_dx_rows(DY, X, PAD, DX, k, delta, rstd, a, c1, c2, stride_dy, stride_x, stride_dx, N, rows_per_program,
               feats, fmask, HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dx = a·dy − c₁ − x̂·c₂``, ``x̂ = ((x − K) − δ)·r``, over this program's rows (0 at padding)."""
    start, end = program_rows(tl.program_id(0), N, rows_per_program)
    for r0 in range(start, end, BLOCK_N):
        rows, tile, x, dy = _tile_pair(X, DY, PAD, r0, end, feats, fmask, stride_x, stride_dy, HAS_PAD, BLOCK_N)
        xhat = ((x - k[None, :]) - delta[None, :]) * rstd[None, :]
        dx = tl.where(tile, a[None, :] * dy - c1[None, :] - xhat * c2[None, :], 0.0)
        _store(DX, rows, feats, end, fmask, stride_dx, dx)


@triton.jit
def _first_real_row(PAD, N, HAS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """The index of the first real row (``N`` without one): the padding bits are
    scanned a block at a time until a real row turns up (one block, as a rule)."""
    if HAS_PAD:
        first = N
        start = 0
        while (first == N) & (start < N):
            offs = start + tl.arange(0, BLOCK)
            real = (offs < N) & (tl.load(PAD + offs, mask=offs < N, other=1) == 0)
            first = tl.min(tl.where(real, offs, N), axis=0)
            start += BLOCK
    else:
        first = N * 0                       # row 0, as a tensor like the scan's
    return first


@triton.jit
def _count_real(PAD, N, HAS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """The number of real rows, as float32."""
    if HAS_PAD:
        n = 0.0
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            n += tl.sum(((offs < N) & (tl.load(PAD + offs, mask=offs < N, other=1) == 0)).to(tl.float32), axis=0)
    else:
        n = N.to(tl.float32)
    return n


# ---------------------------------------------------------------------------
# BatchNorm forward
# ---------------------------------------------------------------------------


@triton.jit
def moments_partial(
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8, 1 at padding (HAS_PAD)
    STATS,      # (3, D) float32 out: row 0 ← K, the first real row (0 without one)
    COUNT_PART,  # (P,) float32 out: real rows of each program
    MEAN_PART,  # (P, D) float32 out: μ_p − K
    M2_PART,    # (P, D) float32 out: M_p
    stride_x, N, D, rows_per_program,
    HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_PAD: tl.constexpr,
):
    feats, fmask = features(BLOCK_F, D)
    first = _first_real_row(PAD, N, HAS_PAD, BLOCK_PAD)
    k = tl.load(X + first.to(tl.int64) * stride_x + feats, mask=tl.where(first < N, fmask, False),
                other=0.0).to(tl.float32)
    p = tl.program_id(0)
    if p == 0:
        tl.store(STATS + feats, k, mask=fmask)
    start, end = program_rows(tl.program_id(0), N, rows_per_program)
    n_a = 0.0
    mean = tl.zeros([BLOCK_F], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_F], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows, real, tile = _tile(PAD, r0, end, fmask, HAS_PAD, BLOCK_N)
        x = tl.where(tile, _load(X, rows, feats, tile, stride_x) - k[None, :], 0.0)
        n_b = tl.sum(real.to(tl.float32), axis=0)
        inv_n = 1.0 / tl.maximum(n_b, 1.0)
        m = tl.sum(x, axis=0) * inv_n                               # BLOCK_F
        d = tl.where(tile, x - m[None, :], 0.0)
        corr = tl.sum(d, axis=0) * inv_n
        m2_b = tl.maximum(tl.sum(d * d, axis=0) - n_b * corr * corr, 0.0)
        n_a, mean, m2 = _chan(n_a, mean, m2, n_b, m + corr, m2_b)  # merge the tile
    store_partials(MEAN_PART, M2_PART, p, D, feats, fmask, mean, m2)
    if tl.program_id(1) == 0:
        tl.store(COUNT_PART + p, n_a)


@triton.jit
def bn_finalize(
    COUNT_PART,  # (P,) float32
    MEAN_PART,  # (P, D) float32: μ_p − K
    M2_PART,    # (P, D) float32
    W,          # (D,) weight, its dtype (HAS_W)
    STATS,      # (3, D) float32: K (in); δ = μ − K, r (out)
    SCALE,      # (D,) float32 out: a = w·r
    MEAN,       # (D,) float32 out: the batch mean μ
    VAR,        # (D,) float32 out: the biased σ² (0 without a real row)
    COUNT,      # () int64 out: n
    RMEAN,      # (D,) running mean, its dtype, moved in place (UPDATE)
    RVAR,       # (D,) running (unbiased) variance (UPDATE)
    NBT,        # () int64 num_batches_tracked, moved in place (HAS_NBT)
    P, D, eps, momentum,
    HAS_W: tl.constexpr, UPDATE: tl.constexpr, HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One program: merge every feature block (in order), then — with UPDATE —
    the running statistics, once all features are known finite."""
    finite = 1
    n_a = 0.0
    for f0 in range(0, D, BLOCK_F):
        feats, fmask = feature_block(f0, D, BLOCK_F)
        n_a, mean, m2 = merge_programs(COUNT_PART, MEAN_PART, M2_PART, P, D, feats, fmask, BLOCK_F)
        var = m2 / tl.maximum(n_a, 1.0)
        rstd, a = rstd_scale(var, eps, W, feats, fmask, HAS_W)
        batch_mean = tl.load(STATS + feats, mask=fmask, other=0.0) + mean
        store_bn_stats(STATS, SCALE, MEAN, VAR, D, feats, fmask, mean, rstd, a, batch_mean, var)
        if UPDATE:
            finite = stats_finite(finite, batch_mean, unbiased_var(var, n_a), fmask)
    tl.store(COUNT, n_a.to(tl.int64))
    if UPDATE:
        update_bn_running(MEAN, VAR, RMEAN, RVAR, NBT, n_a, finite, D, momentum, HAS_NBT, CUMULATIVE, BLOCK_F)


@triton.jit
def bn_normalize(
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8 (HAS_PAD)
    STATS,      # (3, D) float32: K, δ, r — or, RUNNING, the running mean and variance (their dtype)
    RVAR,       # (D,) running variance, its dtype (RUNNING)
    W,          # (D,) weight, its dtype (RUNNING and HAS_W)
    SCALE,      # (D,) float32: a = w·r (in; out with RUNNING)
    B,          # (D,) bias, its dtype (HAS_B)
    Y,          # (N, D) out, row stride stride_y
    STATS_OUT,  # (3, D) float32 out: K = running mean, δ = 0, r (RUNNING)
    MEAN,       # (D,) float32 out: 0 (RUNNING: no batch statistic)
    VAR,        # (D,) float32 out: 0 (RUNNING)
    COUNT,      # () int64 out: real rows (RUNNING)
    stride_x, stride_y, N, D, rows_per_program, eps,
    HAS_PAD: tl.constexpr, RUNNING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_PAD: tl.constexpr,
):
    """``y = ((x − K) − δ)·a + b``; with RUNNING (eval) ``K``, ``r`` and ``a`` come
    from the running statistics, and programs ``(0, f)`` store them for the backward."""
    feats, fmask = features(BLOCK_F, D)
    if RUNNING:
        k = vec(STATS, feats, fmask, 0.0)
        delta = tl.zeros([BLOCK_F], dtype=tl.float32)
        rstd, a = rstd_scale(vec(RVAR, feats, fmask, 0.0), eps, W, feats, fmask, HAS_W)
        if tl.program_id(0) == 0:
            tl.store(STATS_OUT + feats, k, mask=fmask)
            tl.store(STATS_OUT + D + feats, delta, mask=fmask)
            tl.store(STATS_OUT + 2 * D + feats, rstd, mask=fmask)
            tl.store(SCALE + feats, a, mask=fmask)
            tl.store(MEAN + feats, delta, mask=fmask)
            tl.store(VAR + feats, delta, mask=fmask)
            if tl.program_id(1) == 0:
                tl.store(COUNT, _count_real(PAD, N, HAS_PAD, BLOCK_PAD).to(tl.int64))
    else:
        k = vec(STATS, feats, fmask, 0.0)
        delta = vec(STATS + D, feats, fmask, 0.0)
        a = vec(SCALE, feats, fmask, 0.0)
    if HAS_B:
        bias = vec(B, feats, fmask, 0.0)
    start, end = program_rows(tl.program_id(0), N, rows_per_program)
    for r0 in range(start, end, BLOCK_N):
        rows, real, tile = _tile(PAD, r0, end, fmask, HAS_PAD, BLOCK_N)
        y = ((_load(X, rows, feats, tile, stride_x) - k[None, :]) - delta[None, :]) * a[None, :]
        if HAS_B:
            y = y + bias[None, :]
        _store(Y, rows, feats, end, fmask, stride_y, tl.where(tile, y, 0.0))


# ---------------------------------------------------------------------------
# BatchNorm backward
# ---------------------------------------------------------------------------


@triton.jit
def grad_partial(
    DY,         # (N, D), row stride stride_dy
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8 (HAS_PAD)
    STATS,      # (3, D) float32: K, δ (μ = K + δ), r
    SCALE,      # (D,) float32: a = w·r (WRITE_DX)
    DX,         # (N, D) out: a·dy, the eval gradient (WRITE_DX), row stride stride_dx
    DG_PART,    # (P, D) float32 out: Σ dy·x̂ of the program's real rows
    DB_PART,    # (P, D) float32 out: Σ dy
    stride_dy, stride_x, stride_dx, N, D, rows_per_program,
    HAS_PAD: tl.constexpr, WRITE_DX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats, fmask = features(BLOCK_F, D)
    k, delta, rstd = bn_stats(STATS, D, feats, fmask)
    if WRITE_DX:
        a = vec(SCALE, feats, fmask, 0.0)
    dg = tl.zeros([BLOCK_F], dtype=tl.float32)
    db = tl.zeros([BLOCK_F], dtype=tl.float32)
    start, end = program_rows(tl.program_id(0), N, rows_per_program)
    for r0 in range(start, end, BLOCK_N):
        rows, tile, x, dy = _tile_pair(X, DY, PAD, r0, end, feats, fmask, stride_x, stride_dy, HAS_PAD, BLOCK_N)
        xhat = tl.where(tile, ((x - k[None, :]) - delta[None, :]) * rstd[None, :], 0.0)
        dg += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        if WRITE_DX:
            _store(DX, rows, feats, end, fmask, stride_dx, tl.where(tile, a[None, :] * dy, 0.0))
    store_partials(DG_PART, DB_PART, tl.program_id(0), D, feats, fmask, dg, db)


@triton.jit
def bn_grad_finalize(
    DG_PART,    # (P, D) float32
    DB_PART,    # (P, D) float32
    SCALE,      # (D,) float32: a
    COUNT,      # () int64: n
    DW,         # (D,) out: dγ, the weight's dtype (HAS_W)
    DB,         # (D,) out: dβ, the bias's dtype (HAS_B)
    COEF,       # (2, D) float32 out: c₁ = a·dβ/n, c₂ = a·dγ/n
    P, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats, fmask, dgamma, dbeta = block_sums(DG_PART, DB_PART, P, D, BLOCK_F)
    inv_n = 1.0 / tl.maximum(tl.load(COUNT).to(tl.float32), 1.0)
    a = tl.load(SCALE + feats, mask=fmask, other=0.0)
    tl.store(COEF + feats, a * dbeta * inv_n, mask=fmask)
    tl.store(COEF + D + feats, a * dgamma * inv_n, mask=fmask)
    store_grads(DW, DB, feats, fmask, dgamma, dbeta, HAS_W, HAS_B)


@triton.jit
def bn_input_grad(
    DY,         # (N, D), row stride stride_dy
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8 (HAS_PAD)
    STATS,      # (3, D) float32: K, δ, r
    SCALE,      # (D,) float32: a = w·r
    COEF,       # (2, D) float32: c₁, c₂
    DX,         # (N, D) out, row stride stride_dx
    stride_dy, stride_x, stride_dx, N, D, rows_per_program,
    HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats, fmask = features(BLOCK_F, D)
    k, delta, rstd = bn_stats(STATS, D, feats, fmask)
    a = vec(SCALE, feats, fmask, 0.0)
    c1 = vec(COEF, feats, fmask, 0.0)
    c2 = vec(COEF + D, feats, fmask, 0.0)
    bn_dx_rows(DY, X, PAD, DX, k, delta, rstd, a, c1, c2, stride_dy, stride_x, stride_dx, N, rows_per_program,
               feats, fmask, HAS_PAD, BLOCK_N)


# ---------------------------------------------------------------------------
# PowerNorm
# ---------------------------------------------------------------------------


@triton.jit
def power_normalize(
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8 (HAS_PAD)
    PHI,        # (D,) the running ψ², its dtype
    W,          # (D,) weight, its dtype (HAS_W)
    B,          # (D,) bias, its dtype (HAS_B)
    Y,          # (N, D) out, row stride stride_y
    RSTD,       # (D,) float32 out: r = 1/√(ψ² + ε), written by programs (0, f)
    SUMSQ_PART,  # (P, D) float32 out: Σ x² of the program's real rows (SUMSQ)
    COUNT_PART,  # (P,) float32 out: the program's real rows (SUMSQ)
    stride_x, stride_y, N, D, rows_per_program, eps,
    HAS_PAD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SUMSQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats, fmask = features(BLOCK_F, D)
    rstd, a = rstd_scale(vec(PHI, feats, fmask, 0.0), eps, W, feats, fmask, HAS_W)
    if HAS_B:
        bias = vec(B, feats, fmask, 0.0)
    p = tl.program_id(0)
    if p == 0:
        tl.store(RSTD + feats, rstd, mask=fmask)
    sumsq = tl.zeros([BLOCK_F], dtype=tl.float32)
    n = 0.0
    start, end = program_rows(tl.program_id(0), N, rows_per_program)
    for r0 in range(start, end, BLOCK_N):
        rows, real, tile = _tile(PAD, r0, end, fmask, HAS_PAD, BLOCK_N)
        x = _load(X, rows, feats, tile, stride_x)
        y = x * a[None, :]
        if HAS_B:
            y = y + bias[None, :]
        _store(Y, rows, feats, end, fmask, stride_y, tl.where(tile, y, 0.0))
        if SUMSQ:
            sumsq += tl.sum(x * x, axis=0)
            n += tl.sum(real.to(tl.float32), axis=0)
    if SUMSQ:
        tl.store(SUMSQ_PART + p * D + feats, sumsq, mask=fmask)
        if tl.program_id(1) == 0:
            tl.store(COUNT_PART + p, n)


@triton.jit
def power_finalize(
    SUMSQ_PART,  # (P, D) float32
    COUNT_PART,  # (P,) float32
    PHI_B,      # (D,) float32 out: the batch's ψ_B² = Σ x²/n
    COUNT,      # () int64 out: n
    FACTOR,     # () float32 out: the step's weight f (ν's update uses it too)
    NU,         # (D,) ν, its dtype (HAS_NU)
    NU_BEFORE,  # (D,) out: a copy of ν as of this forward (HAS_NU)
    PHI,        # (D,) the running ψ², moved in place (UPDATE)
    NBT,        # () int64 num_batches_tracked (HAS_NBT; moved with UPDATE)
    GIVEN,      # () the step's weight, given (HAS_FACTOR)
    P, D, momentum,
    HAS_NU: tl.constexpr, UPDATE: tl.constexpr, HAS_NBT: tl.constexpr, HAS_FACTOR: tl.constexpr,
    CUMULATIVE: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One program: ψ_B², n, f and ν's copy; with UPDATE ψ² moves (the device-side
    select of :func:`seqnorm.running.update_running_stats`, ``min_count`` 1)."""
    n = 0.0
    for p in range(0, P):
        n += tl.load(COUNT_PART + p)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    factor = step_factor(GIVEN, NBT, momentum, HAS_FACTOR, CUMULATIVE)
    finite = 1
    for f0 in range(0, D, BLOCK_F):
        feats, fmask = feature_block(f0, D, BLOCK_F)
        phi = sum_rows(SUMSQ_PART, P, D, feats, fmask) * inv_n
        finite = store_power_stats(PHI_B, NU, NU_BEFORE, feats, fmask, phi, finite, HAS_NU, UPDATE)
    finish_power(COUNT, FACTOR, PHI_B, PHI, NBT, n, finite, factor, D, UPDATE, HAS_NBT, BLOCK_F)


@triton.jit
def power_input_grad(
    DY,         # (N, D), row stride stride_dy
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8 (HAS_PAD)
    W,          # (D,) weight, its dtype (HAS_W)
    RSTD,       # (D,) float32: r = 1/√(ψ² + ε) of the running ψ²
    NU,         # (D,) ν before this step's update, its dtype (HAS_NU)
    DX,         # (N, D) out, row stride stride_dx
    DG_PART,    # (P, D) float32 out: Σ dy·x̂ of the program's real rows
    DB_PART,    # (P, D) float32 out: Σ dy
    stride_dy, stride_x, stride_dx, N, D, rows_per_program, nu_scale,
    HAS_PAD: tl.constexpr, HAS_W: tl.constexpr, HAS_NU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    feats, fmask = features(BLOCK_F, D)
    w = tl.full([BLOCK_F], 1.0, tl.float32)
    if HAS_W:
        w = vec(W, feats, fmask, 0.0)
    rstd = vec(RSTD, feats, fmask, 0.0)
    nu = tl.zeros([BLOCK_F], dtype=tl.float32)
    if HAS_NU:
        nu = vec(NU, feats, fmask, 0.0) * nu_scale
    dg = tl.zeros([BLOCK_F], dtype=tl.float32)
    db = tl.zeros([BLOCK_F], dtype=tl.float32)
    start, end = program_rows(tl.program_id(0), N, rows_per_program)
    for r0 in range(start, end, BLOCK_N):
        rows, tile, x, dy = _tile_pair(X, DY, PAD, r0, end, feats, fmask, stride_x, stride_dy, HAS_PAD, BLOCK_N)
        xhat = x * rstd[None, :]
        _store(DX, rows, feats, end, fmask, stride_dx,
               tl.where(tile, (w[None, :] * dy - nu[None, :] * xhat) * rstd[None, :], 0.0))
        dg += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    store_partials(DG_PART, DB_PART, tl.program_id(0), D, feats, fmask, dg, db)


@triton.jit
def power_grad_finalize(
    DG_PART,    # (P, D) float32
    DB_PART,    # (P, D) float32
    W,          # (D,) weight, its dtype (HAS_W)
    DW,         # (D,) out: dγ, the weight's dtype (HAS_W)
    DB,         # (D,) out: dβ, the bias's dtype (HAS_B)
    RSTD,       # (D,) float32: r (MOVE_NU)
    PHI_B,      # (D,) float32: ψ_B² (MOVE_NU)
    COUNT,      # () int64: n (MOVE_NU)
    FACTOR,     # () float32: f (MOVE_NU)
    NU_BEFORE,  # (D,) ν as of the forward, ν's dtype (MOVE_NU)
    NU,         # (D,) ν, moved in place (MOVE_NU)
    NU_NEW,     # (D,) float32 scratch: the new ν (MOVE_NU)
    P, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, MOVE_NU: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """dγ, dβ; with MOVE_NU one program moves ν (Algorithm 1) once all of the new ν
    is known finite (:func:`seqnorm.running.move_nu_from_sums`); without, one
    program per feature block."""
    if MOVE_NU:
        n = tl.load(COUNT).to(tl.float32)
        inv = 1.0 / tl.maximum(n, 1.0)
        factor = tl.load(FACTOR)
        finite = 1
        for f0 in range(0, D, BLOCK_F):
            feats, fmask = feature_block(f0, D, BLOCK_F)
            dgamma = sum_rows(DG_PART, P, D, feats, fmask)
            if HAS_W:
                store_as(DW, feats, fmask, dgamma)
                lam = (vec(W, feats, fmask, 0.0) * dgamma) * inv
            else:
                lam = dgamma * inv
            if HAS_B:
                tl.store(DB + feats, sum_rows(DB_PART, P, D, feats, fmask).to(DB.dtype.element_ty), mask=fmask)
            finite = nu_candidate(NU_BEFORE, NU_NEW, RSTD, PHI_B, feats, fmask, lam, factor, finite)
        select_nu(NU, NU_NEW, n, finite, D, BLOCK_F)
    else:
        feats, fmask = feature_block(tl.program_id(0) * BLOCK_F, D, BLOCK_F)
        store_param_grads(DG_PART, DB_PART, DW, DB, P, D, feats, fmask, HAS_W, HAS_B)


# ---------------------------------------------------------------------------
# InstanceNorm's running statistics (the statistics come from the group-wise kernel)
# ---------------------------------------------------------------------------


@triton.jit
def instance_finalize(
    MEAN,       # (B, C) float32: each instance's mean
    VAR,        # (B, C) float32: each instance's biased variance
    STEPS,      # (B,) int64: each sequence's real steps
    RMEAN,      # (C,) running mean, its dtype, moved in place
    RVAR,       # (C,) running (unbiased) variance, moved in place
    NBT,        # () int64 num_batches_tracked (HAS_NBT)
    B, C, momentum,
    HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One program, as :func:`seqnorm.functional.instance_norm`'s update: each
    instance with ``≥ 2`` real steps adds its mean and unbiased variance with
    weight ``1/k`` (``k`` such instances, summed in order); the running
    statistics move where ``k ≥ 1`` and every channel's statistic is finite."""
    k = 0.0
    for b in range(0, B):
        k += (tl.load(STEPS + b) >= 2).to(tl.float32)
    inv_k = 1.0 / tl.maximum(k, 1.0)
    finite = 1
    for pass_ in range(0, 2):                       # 0: finiteness of every channel; 1: the update
        ok = (k >= 1.0) & (finite == 1)
        factor = _factor(NBT, momentum, CUMULATIVE)
        for c0 in range(0, C, BLOCK_F):
            feats, fmask = feature_block(c0, C, BLOCK_F)
            batch_mean = tl.zeros([BLOCK_F], dtype=tl.float32)
            batch_var = tl.zeros([BLOCK_F], dtype=tl.float32)
            for b in range(0, B):
                steps = tl.load(STEPS + b)
                w = (steps >= 2).to(tl.float32) * inv_k
                n = steps.to(tl.float32)
                mean = tl.load(MEAN + b * C + feats, mask=fmask, other=0.0)
                var = tl.load(VAR + b * C + feats, mask=fmask, other=0.0)
                unbiased = unbiased_var(var, n)
                batch_mean += tl.where(steps >= 2, mean, 0.0) * w
                batch_var += tl.where(steps >= 2, unbiased, 0.0) * w
            if pass_ == 0:
                finite = tl.minimum(finite, tl.minimum(_all_finite(batch_mean, fmask), _all_finite(batch_var, fmask)))
            else:
                _moved(RMEAN, feats, fmask, batch_mean, factor, ok)
                _moved(RVAR, feats, fmask, batch_var, factor, ok)
    _count_batch(NBT, (k >= 1.0) & (finite == 1), HAS_NBT)
