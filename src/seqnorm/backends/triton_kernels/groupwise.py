r"""Group-wise norms in Triton: masked GroupNorm (InstanceNorm: a group per channel).

``x`` is a contiguous channels-first ``(B, C, T)``; program ``p = b·G + g``
owns sequence ``b``'s group ``g``: its ``C/G`` channel rows of ``T`` steps, of
which the ``n = (C/G)·L_b`` real elements enter the statistics (a padded step
is never loaded).

Forward, in float32: each block of ``BLOCK_T`` steps of a row gives its count,
mean and ``M₂ = Σ(x − mean_blk)²``, merged in order into the group's by Chan's
formula (:func:`_group_moments`),

.. math::
    n = n_a + n_b,\quad Δ = μ_b − μ_a,\quad μ = μ_a + Δ\,\frac{n_b}{n},\quad
    M = M_a + M_b + Δ^2\,\frac{n_a n_b}{n}

so an offset of 1e4 costs nothing; ``σ² = M/n``, ``r = 1/√(σ² + ε)`` and
``y = (x − μ)·r·w_c + b_c``, 0 at padding. A finite group whose squares
overflow (``σ²`` Inf) is merged again from ``x/a``, ``a`` a power of two near
``max|x|``: ``μ = a·μ'``, ``r = (1/a)/√(σ'² + ε/a²)``. ``MEAN``, ``RSTD`` and
``VAR`` (biased) are stored per program.

Backward, with ``x̂ = (x − μ)·r`` and each channel's ``β_c = Σ dy``,
``γ_c = Σ dy·x̂`` over the sequence's real steps (written to ``DB_PART`` /
``DW_PART`` ``(B, C)``, summed over ``B`` by the caller, in order):

.. math::
    c_1 = \frac{1}{n}\sum_c w_c β_c,\qquad c_2 = \frac{1}{n}\sum_c w_c γ_c,\qquad
    dx = r\,(w_c\,dy − c_1 − \hat{x}\,c_2)
"""

import triton
import triton.language as tl


@triton.jit
def _block(PAD, pad_base, t, T, HAS_PAD: tl.constexpr):
    """``(in_row, use)`` of the steps ``t``: inside the row, and inside and real (a
    padded step is never loaded)."""
    in_row = t < T
    use = in_row
    if HAS_PAD:
        real = tl.load(PAD + pad_base + t, mask=in_row, other=1) == 0
        use = tl.where(in_row, real, False)
    return in_row, use


@triton.jit
def _channel(P, c0, c, default, HAS: tl.constexpr):
    """A per-channel parameter as float32, or ``default`` without one."""
    if HAS:
        v = tl.load(P + c0 + c).to(tl.float32)
    else:
        v = default
    return v


@triton.jit
def _group_moments(X, PAD, x_base, pad_base, T, CG, inv_a, HAS_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """``(n, mean, M₂)`` of ``x·inv_a`` over the group's real elements, block by block (Chan)."""
    offs = tl.arange(0, BLOCK_T)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for c in range(0, CG):
        for t0 in range(0, T, BLOCK_T):
            _, use = _block(PAD, pad_base, t0 + offs, T, HAS_PAD)
            x = tl.load(X + x_base + c * T + t0 + offs, mask=use, other=0.0).to(tl.float32) * inv_a
            nb = tl.sum(use.to(tl.float32), axis=0)
            mb = tl.sum(x, axis=0) / tl.maximum(nb, 1.0)
            d = tl.where(use, x - mb, 0.0)
            total = n + nb
            w = tl.where(total > 0, nb / tl.maximum(total, 1.0), 0.0)
            delta = mb - mean
            mean = mean + delta * w
            m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * n * w
            n = total
    return n, mean, m2


@triton.jit
def groupwise_fwd(
    X,          # (B, C, T) input, contiguous
    Y,          # (B, C, T) output
    W,          # (C,) weight (HAS_W)
    B,          # (C,) bias (HAS_B)
    PAD,        # (B, T) uint8, 1 at padding (HAS_PAD)
    MEAN,       # (B·G,) float32 out: μ
    RSTD,       # (B·G,) float32 out: r (0 for an all-padding group)
    VAR,        # (B·G,) float32 out: σ² (biased)
    STEPS,      # (B,) int64 out: real steps of each sequence (written by its group 0)
    C, T,       # channels, steps
    CG,         # channels per group
    G,          # groups
    eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    c0 = (pid % G) * CG
    x_base = (b * C + c0) * T                # int64: B·C·T may pass 2^31
    pad_base = b * T
    n, mean, m2 = _group_moments(X, PAD, x_base, pad_base, T, CG, 1.0, HAS_PAD, BLOCK_T)
    var = m2 / tl.maximum(n, 1.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    if (var > 3.0e38) | (var != var):       # squares overflowed (a finite group near 1e19 and beyond)
        offs = tl.arange(0, BLOCK_T)
        amax = 0.0
        for c in range(0, CG):
            for t0 in range(0, T, BLOCK_T):
                _, use = _block(PAD, pad_base, t0 + offs, T, HAS_PAD)
                x = tl.load(X + x_base + c * T + t0 + offs, mask=use, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.where(use, tl.abs(x), 0.0), axis=0))
        inv_a = tl.exp2(-tl.floor(tl.log2(amax)))
        n, mean_s, m2_s = _group_moments(X, PAD, x_base, pad_base, T, CG, inv_a, HAS_PAD, BLOCK_T)
        var_s = m2_s / tl.maximum(n, 1.0)
        mean = mean_s / inv_a
        var = var_s / (inv_a * inv_a)
        rstd = inv_a / tl.sqrt(var_s + eps * inv_a * inv_a)
    rstd = tl.where(n > 0, rstd, 0.0)
    if pid % G == 0:
        tl.store(STEPS + b, (n / CG).to(tl.int64))
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)
    tl.store(VAR + pid, var)
    offs = tl.arange(0, BLOCK_T)
    for c in range(0, CG):
        wc = _channel(W, c0, c, 1.0, HAS_W)
        bc = _channel(B, c0, c, 0.0, HAS_B)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            in_row, use = _block(PAD, pad_base, t, T, HAS_PAD)
            x = tl.load(X + x_base + c * T + t, mask=use, other=0.0).to(tl.float32)
            y = tl.where(use, (x - mean) * rstd * wc + bc, 0.0)
            tl.store(Y + x_base + c * T + t, y.to(Y.dtype.element_ty), mask=in_row)


@triton.jit
def groupwise_bwd(
    DY,         # (B, C, T) gradient of y, contiguous
    X,          # (B, C, T) input
    DX,         # (B, C, T) out
    W,          # (C,) weight (HAS_W)
    PAD,        # (B, T) uint8 (HAS_PAD)
    STEPS,      # (B,) int64: real steps of each sequence
    MEAN,       # (B·G,) float32: μ
    RSTD,       # (B·G,) float32: r
    DW_PART,    # (B, C) float32 out: Σ dy·x̂ over the sequence's real steps
    DB_PART,    # (B, C) float32 out: Σ dy
    C, T, CG, G,
    HAS_W: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    c0 = (pid % G) * CG
    x_base = (b * C + c0) * T
    pad_base = b * T
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    n = (tl.load(STEPS + b) * CG).to(tl.float32)
    offs = tl.arange(0, BLOCK_T)
    c1 = 0.0
    c2 = 0.0
    for c in range(0, CG):
        wc = _channel(W, c0, c, 1.0, HAS_W)
        sb = tl.zeros([BLOCK_T], dtype=tl.float32)
        sg = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            _, use = _block(PAD, pad_base, t, T, HAS_PAD)
            x = tl.load(X + x_base + c * T + t, mask=use, other=0.0).to(tl.float32)
            dy = tl.load(DY + x_base + c * T + t, mask=use, other=0.0).to(tl.float32)
            sb += dy
            sg += tl.where(use, dy * ((x - mean) * rstd), 0.0)
        beta = tl.sum(sb, axis=0)
        gamma = tl.sum(sg, axis=0)
        tl.store(DB_PART + b * C + c0 + c, beta)
        tl.store(DW_PART + b * C + c0 + c, gamma)
        c1 += wc * beta
        c2 += wc * gamma
    c1 = c1 / tl.maximum(n, 1.0)
    c2 = c2 / tl.maximum(n, 1.0)
    for c in range(0, CG):
        wc = _channel(W, c0, c, 1.0, HAS_W)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            in_row, use = _block(PAD, pad_base, t, T, HAS_PAD)
            x = tl.load(X + x_base + c * T + t, mask=use, other=0.0).to(tl.float32)
            dy = tl.load(DY + x_base + c * T + t, mask=use, other=0.0).to(tl.float32)
            dx = tl.where(use, rstd * (dy * wc - c1 - ((x - mean) * rstd) * c2), 0.0)
            tl.store(DX + x_base + c * T + t, dx.to(DX.dtype.element_ty), mask=in_row)
