r"""Feature-wise norms in Triton: masked BatchNorm and PowerNorm over the token axis.

``x`` is ``(N, D)`` (every token of a batch), ``PAD`` is ``(N,)``. Programs
tile the rows into blocks of ``BLOCK_N`` and the features into blocks of
``BLOCK_F``; a padded row's loads are masked off.

Statistics (:func:`moments_partial`, :func:`moments_merge`), of ``x − K`` with
``K`` the first real row (so that a large common offset cancels exactly, as in
the CPU kernels). Each row block ``p`` gives, per feature, its count of real
rows ``n_p``, mean ``μ_p`` and centred second moment ``M_p`` (corrected
two-pass in registers); one ordered pass then merges them with Chan et al.'s
formula into ``δ = μ − K`` and ``σ²``,

.. math::
    n = n_a + n_b,\quad Δ = μ_b − μ_a,\quad μ = μ_a + Δ\,\frac{n_b}{n},\quad
    M = M_a + M_b + Δ^2\,\frac{n_a n_b}{n},\qquad σ^2 = M/n

— deterministic, no atomics. Normalization (:func:`normalize`):
``y = ((x − K) − δ)·a + b`` with ``a = w/√(σ² + ε)``, 0 at padding.

Backward of BatchNorm (:func:`grad_partial`, then :func:`bn_input_grad`), with
``x̂ = ((x − K) − δ)·r`` and sums over real rows (per-block partials, summed in order):

.. math::
    dβ = \sum dy,\quad dγ = \sum dy\,\hat{x},\quad
    dx = a\Bigl(dy - \frac{dβ}{n} - \hat{x}\,\frac{dγ}{n}\Bigr)

(with running statistics, eval: ``dx = a·dy``).

PowerNorm (:func:`normalize` with ``μ = 0`` and the running ψ², its
``SUMSQ_PART`` giving the batch's ``Σ x²``; :func:`power_input_grad`):
``dx = (w·dy − ν·x̂)·r`` with ``x̂ = x·r``, fused with the partial sums of
``dy·x̂`` and ``dy``.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(PAD, N, D, HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    """The program's rows (int64), features, real-row mask (BLOCK_N,) and tile mask."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    feats = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    real = rows < N
    if HAS_PAD:
        real = real & (tl.load(PAD + rows, mask=real, other=1) == 0)
    tile = real[:, None] & (feats < D)[None, :]
    return rows, feats, real, tile


@triton.jit
def _load(PTR, rows, feats, tile, stride):
    """The tile of a ``(N, D)`` tensor as float32; 0 outside ``tile`` (padded rows are not read)."""
    return tl.load(PTR + rows[:, None] * stride + feats[None, :], mask=tile, other=0.0).to(tl.float32)


@triton.jit
def _per_feature(PTR, feats, D):
    """A ``(D,)`` float32 vector's block, as a row that broadcasts over the tile."""
    return tl.load(PTR + feats, mask=feats < D, other=0.0)[None, :]


@triton.jit
def _store(PTR, rows, feats, N, D, stride, value):
    """Write a tile of an ``(N, D)`` output in its dtype (padded rows get the 0 in ``value``)."""
    out = (rows < N)[:, None] & (feats < D)[None, :]
    tl.store(PTR + rows[:, None] * stride + feats[None, :], value.to(PTR.dtype.element_ty), mask=out)


@triton.jit
def _store_partial(PART, feats, D, value):
    """This row block's partial sums, row ``program_id(0)`` of a ``(P, D)`` buffer."""
    tl.store(PART + tl.program_id(0) * D + feats, value, mask=feats < D)


@triton.jit
def _grad_tile(X, DY, PAD, stride_x, stride_dy, N, D, HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_F: tl.constexpr):
    """A backward kernel's tile: rows, features, mask, and ``x``, ``dy`` as float32."""
    rows, feats, real, tile = _tile(PAD, N, D, HAS_PAD, BLOCK_N, BLOCK_F)
    return rows, feats, tile, _load(X, rows, feats, tile, stride_x), _load(DY, rows, feats, tile, stride_dy)


@triton.jit
def _bn_xhat(x, STATS, feats, D):
    """``x̂ = ((x − K) − δ)·r`` of a tile, from the ``(3, D)`` rows K, δ, r."""
    return ((x - _per_feature(STATS, feats, D)) - _per_feature(STATS + D, feats, D)) \
        * _per_feature(STATS + 2 * D, feats, D)


@triton.jit
def moments_partial(
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8, 1 at padding (HAS_PAD)
    SHIFT,      # (D,) float32: K, the first real row (so that a large common offset cancels)
    COUNT_PART,  # (P,) float32 out: real rows of each row block
    MEAN_PART,  # (P, D) float32 out: μ_p − K
    M2_PART,    # (P, D) float32 out: M_p
    stride_x, N, D,
    HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows, feats, real, tile = _tile(PAD, N, D, HAS_PAD, BLOCK_N, BLOCK_F)
    k = tl.load(SHIFT + feats, mask=feats < D, other=0.0)
    x = _load(X, rows, feats, tile, stride_x)
    x = tl.where(tile, x - k[None, :], 0.0)
    n = tl.sum(real.to(tl.float32), axis=0)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    m = tl.sum(x, axis=0) * inv_n                                  # BLOCK_F
    d = tl.where(tile, x - m[None, :], 0.0)
    corr = tl.sum(d, axis=0) * inv_n
    m2 = tl.maximum(tl.sum(d * d, axis=0) - n * corr * corr, 0.0)
    p = tl.program_id(0)
    fmask = feats < D
    tl.store(MEAN_PART + p * D + feats, m + corr, mask=fmask)
    tl.store(M2_PART + p * D + feats, m2, mask=fmask)
    if tl.program_id(1) == 0:
        tl.store(COUNT_PART + p, n)


@triton.jit
def moments_merge(
    COUNT_PART,  # (P,) float32
    MEAN_PART,  # (P, D) float32
    M2_PART,    # (P, D) float32
    DELTA,      # (D,) float32 out: δ = μ − K
    VAR,        # (D,) float32 out: biased σ² (0 without a real row)
    COUNT,      # () float32 out: n
    P, D,
    BLOCK_F: tl.constexpr,
):
    feats = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = feats < D
    n_a = tl.zeros([BLOCK_F], dtype=tl.float32)
    mean = tl.zeros([BLOCK_F], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_F], dtype=tl.float32)
    for p in range(0, P):                                          # in order: the same bits every run
        n_b = tl.load(COUNT_PART + p)
        n = n_a + n_b
        w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
        diff = tl.load(MEAN_PART + p * D + feats, mask=fmask, other=0.0) - mean
        mean += diff * w_b
        m2 += tl.load(M2_PART + p * D + feats, mask=fmask, other=0.0) + diff * diff * n_a * w_b
        n_a = n
    tl.store(DELTA + feats, mean, mask=fmask)
    tl.store(VAR + feats, m2 / tl.maximum(n_a, 1.0), mask=fmask)
    if tl.program_id(0) == 0:
        tl.store(COUNT, tl.max(n_a, axis=0))


@triton.jit
def normalize(
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8 (HAS_PAD)
    SHIFT,      # (D,) float32: K (HAS_MEAN; PowerNorm: none)
    DELTA,      # (D,) float32: δ, so that μ = K + δ (HAS_MEAN)
    SCALE,      # (D,) float32: a = w·r
    B,          # (D,) float32 bias (HAS_B)
    Y,          # (N, D) out, row stride stride_y
    SUMSQ_PART,  # (P, D) float32 out: Σ x² of the block's real rows (SUMSQ)
    COUNT_PART,  # (P,) float32 out: the block's real rows (SUMSQ)
    stride_x, stride_y, N, D,
    HAS_PAD: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_B: tl.constexpr, SUMSQ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows, feats, real, tile = _tile(PAD, N, D, HAS_PAD, BLOCK_N, BLOCK_F)
    x = _load(X, rows, feats, tile, stride_x)
    y = x
    if HAS_MEAN:
        y = (y - _per_feature(SHIFT, feats, D)) - _per_feature(DELTA, feats, D)
    y = y * _per_feature(SCALE, feats, D)
    if HAS_B:
        y = y + _per_feature(B, feats, D)
    y = tl.where(tile, y, 0.0)
    _store(Y, rows, feats, N, D, stride_y, y)
    if SUMSQ:
        _store_partial(SUMSQ_PART, feats, D, tl.sum(x * x, axis=0))
        if tl.program_id(1) == 0:
            tl.store(COUNT_PART + tl.program_id(0), tl.sum(real.to(tl.float32), axis=0))


@triton.jit
def grad_partial(
    DY,         # (N, D), row stride stride_dy
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8 (HAS_PAD)
    STATS,      # (3, D) float32: K, δ (μ = K + δ), r
    DG_PART,    # (P, D) float32 out: Σ dy·x̂ of the block's real rows
    DB_PART,    # (P, D) float32 out: Σ dy
    stride_dy, stride_x, N, D,
    HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows, feats, tile, x, dy = _grad_tile(X, DY, PAD, stride_x, stride_dy, N, D, HAS_PAD, BLOCK_N, BLOCK_F)
    xhat = tl.where(tile, _bn_xhat(x, STATS, feats, D), 0.0)
    _store_partial(DG_PART, feats, D, tl.sum(dy * xhat, axis=0))
    _store_partial(DB_PART, feats, D, tl.sum(dy, axis=0))


@triton.jit
def bn_input_grad(
    DY,         # (N, D), row stride stride_dy
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8 (HAS_PAD)
    STATS,      # (3, D) float32: K, δ (μ = K + δ), r
    COEF,       # (3, D) float32: a = w·r, c₁ = a·dβ/n, c₂ = a·dγ/n (c₁ = c₂ = 0 in eval)
    DX,         # (N, D) out, row stride stride_dx
    stride_dy, stride_x, stride_dx, N, D,
    HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows, feats, tile, x, dy = _grad_tile(X, DY, PAD, stride_x, stride_dy, N, D, HAS_PAD, BLOCK_N, BLOCK_F)
    xhat = _bn_xhat(x, STATS, feats, D)
    a = _per_feature(COEF, feats, D)
    c1 = _per_feature(COEF + D, feats, D)
    c2 = _per_feature(COEF + 2 * D, feats, D)
    dx = tl.where(tile, a * dy - c1 - xhat * c2, 0.0)
    _store(DX, rows, feats, N, D, stride_dx, dx)


@triton.jit
def power_input_grad(
    DY,         # (N, D), row stride stride_dy
    X,          # (N, D), row stride stride_x
    PAD,        # (N,) uint8 (HAS_PAD)
    W,          # (D,) float32 weight (ones without one)
    RSTD,       # (D,) float32: r = 1/√(ψ² + ε) of the running ψ²
    NU,         # (D,) float32: ν before this step's update (zeros without one)
    DX,         # (N, D) out, row stride stride_dx
    DG_PART,    # (P, D) float32 out: Σ dy·x̂ of the block's real rows
    DB_PART,    # (P, D) float32 out: Σ dy
    stride_dy, stride_x, stride_dx, N, D,
    HAS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows, feats, tile, x, dy = _grad_tile(X, DY, PAD, stride_x, stride_dy, N, D, HAS_PAD, BLOCK_N, BLOCK_F)
    w = _per_feature(W, feats, D)
    rstd = _per_feature(RSTD, feats, D)
    nu = _per_feature(NU, feats, D)
    xhat = x * rstd
    dx = tl.where(tile, (w * dy - nu * xhat) * rstd, 0.0)
    _store(DX, rows, feats, N, D, stride_dx, dx)
    _store_partial(DG_PART, feats, D, tl.sum(dy * xhat, axis=0))
    _store_partial(DB_PART, feats, D, tl.sum(dy, axis=0))
