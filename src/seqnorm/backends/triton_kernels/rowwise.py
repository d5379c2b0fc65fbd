r"""Row-wise norms in Triton: LayerNorm and RMSNorm, with or without the residual Add.

Forward, one program per row ``r`` of ``s = x (+ residual)``, in float32 with
the row in registers (``D ≤ 65536``), by the corrected two-pass algorithm:

.. math::
    m = \frac{1}{D}\sum_j s_j,\quad d_j = s_j - m,\quad δ = \frac{1}{D}\sum_j d_j,\quad
    σ^2 = \frac{1}{D}\sum_j d_j^2 - δ^2,\quad r = \frac{1}{\sqrt{σ^2 + ε}}

(the second pass corrects the rounding of ``m``, so an offset of 1e4 costs
float32 nothing), ``x̂ = (d − δ)·r``, ``y = x̂·w + b``. RMSNorm: ``m = δ = 0``,
``σ² = mean(s²)``. ``m``, ``δ`` and ``r`` are stored per row for the backward
(``SHIFT``, ``DELTA``, ``RSTD``). A finite row whose squares overflow float32
(``σ²`` Inf) has ``σ²`` formed again from ``d/a``, ``a`` a power of two near
``max|d|``, and ``r = (1/a)/√(σ'² + ε/a²)``.

Backward, a block of rows per program, with ``g = w ⊙ dy`` (the constants
named as in Triton's tutorial 05):

.. math::
    c_1 = \frac{1}{D}\sum_j g_j,\qquad c_2 = \frac{1}{D}\sum_j g_j\,\hat{x}_j,\qquad
    dx = r\,(g - c_1 - \hat{x}\,c_2)

(``c₁ = 0`` for RMSNorm); ``dx`` gets ``ds`` (the gradient of the returned sum)
added, which is all a padded row receives. ``Σ dy ⊙ x̂`` and ``Σ dy`` over the
program's rows are written as one partial row each (``DW_PART``, ``DB_PART``)
and summed in order by the caller. With the residual the backward re-forms the
float32 sum from ``x`` and ``residual`` (never a rounded sum).
"""

import triton
import triton.language as tl


@triton.jit
def rowwise_fwd(
    X,          # (R, D) input, row stride stride_x
    RES,        # (R, D) residual, row stride stride_r (HAS_RES)
    Y,          # (R, D) output, row stride stride_y
    S,          # (R, D) the sum x + residual, row stride stride_s (WRITE_S)
    W,          # (D,) weight (HAS_W)
    B,          # (D,) bias (HAS_B)
    PAD,        # (R,) uint8, 1 at padding (HAS_PAD)
    SHIFT,      # (R,) float32 out: m
    DELTA,      # (R,) float32 out: δ
    RSTD,       # (R,) float32 out: r (0 at padding)
    stride_x, stride_r, stride_y, stride_s,
    D,          # features per row
    eps,
    HAS_RES: tl.constexpr, WRITE_S: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_PAD: tl.constexpr, CENTER: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    if HAS_PAD:
        real = tl.load(PAD + row) == 0
    else:
        real = row >= 0
    use = tl.where(real, in_row, False)      # a padded row loads nothing ...
    read = use
    if WRITE_S:
        read = in_row                        # ... unless its sum is returned (the residual stream)
    s = tl.load(X + row * stride_x + cols, mask=read, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(RES + row * stride_r + cols, mask=read, other=0.0).to(tl.float32)
        if WRITE_S:
            tl.store(S + row * stride_s + cols, s.to(S.dtype.element_ty), mask=in_row)
    if CENTER:
        m = tl.sum(s, axis=0) / D
        d = tl.where(use, s - m, 0.0)
        delta = tl.sum(d, axis=0) / D
        var = tl.sum(d * d, axis=0) / D - delta * delta
    else:
        m = 0.0
        d = tl.where(use, s, 0.0)
        delta = 0.0
        var = tl.sum(d * d, axis=0) / D
    overflow = (var > 3.0e38) | (var != var)  # squares overflowed (a finite row near 1e19 and beyond)
    var = tl.maximum(var, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    if overflow:                             # (a NaN row comes here too, and stays NaN)
        amax = tl.max(tl.abs(d), axis=0)
        inv_a = tl.exp2(-tl.floor(tl.log2(amax)))
        ds = d * inv_a
        dl = delta * inv_a
        var2 = tl.maximum(tl.sum(ds * ds, axis=0) / D - dl * dl, 0.0)
        rstd = inv_a / tl.sqrt(var2 + eps * inv_a * inv_a)
    rstd = tl.where(real, rstd, 0.0)
    xhat = (d - delta) * rstd
    y = xhat
    if HAS_W:
        y = y * tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    y = tl.where(use, y, 0.0)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=in_row)
    tl.store(SHIFT + row, m)
    tl.store(DELTA + row, delta)
    tl.store(RSTD + row, rstd)


@triton.jit
def rowwise_bwd(
    DY,         # (R, D) gradient of y, row stride stride_dy
    X,          # (R, D) input (what was normalized, or one addend of it), row stride stride_x
    RES,        # (R, D) residual, row stride stride_r (HAS_RES)
    DS,         # (R, D) gradient of the returned sum, row stride stride_ds (HAS_DS)
    DX,         # (R, D) out, row stride stride_dx
    W,          # (D,) weight (HAS_W)
    PAD,        # (R,) uint8, 1 at padding (HAS_PAD)
    SHIFT,      # (R,) float32: m
    DELTA,      # (R,) float32: δ
    RSTD,       # (R,) float32: r
    DW_PART,    # (P, D) float32 out: Σ dy ⊙ x̂ over this program's rows
    DB_PART,    # (P, D) float32 out: Σ dy over this program's rows
    stride_dy, stride_x, stride_r, stride_ds, stride_dx,
    R,          # rows
    D,          # features per row
    rows_per_program,
    HAS_RES: tl.constexpr, HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_PAD: tl.constexpr,
    CENTER: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    else:
        w = tl.where(in_row, 1.0, 0.0)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program          # int64 offsets: R·D may pass 2^31
    last = tl.minimum(first + rows_per_program, R)
    for row in range(first, last):
        if HAS_PAD:
            real = tl.load(PAD + row) == 0
        else:
            real = row >= 0
        use = tl.where(real, in_row, False)
        s = tl.load(X + row * stride_x + cols, mask=use, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(RES + row * stride_r + cols, mask=use, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=use, other=0.0).to(tl.float32)
        m = tl.load(SHIFT + row)
        delta = tl.load(DELTA + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(use, ((s - m) - delta) * rstd, 0.0)
        g = dy * w
        if CENTER:
            c1 = tl.sum(g, axis=0) / D
        else:
            c1 = 0.0
        c2 = tl.sum(g * xhat, axis=0) / D
        dx = tl.where(use, (g - c1 - xhat * c2) * rstd, 0.0)
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=in_row)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * D + cols, dw, mask=in_row)
    tl.store(DB_PART + pid * D + cols, db, mask=in_row)


# ---------------------------------------------------------------------------
# Column-blocked: rows too wide for registers (BLOCK_D > MAX_BLOCK_D in the launcher)
# ---------------------------------------------------------------------------
# The same maths, the row read in BLOCK_C-column blocks, once per pass (the
# re-reads come from cache): a thread holds BLOCK_C/threads elements per
# tensor instead of the whole row, so nothing spills to local memory.


@triton.jit
def _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns ``[c0, c0 + BLOCK_C)`` of ``s = x (+ residual)``, float32, 0 outside the row
    or at padding; and ``(cols, in_row, use)``."""
    cols = c0 + tl.arange(0, BLOCK_C)
    in_row = cols < D
    use = tl.where(real, in_row, False)
    s = tl.load(X + row * stride_x + cols, mask=use, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(RES + row * stride_r + cols, mask=use, other=0.0).to(tl.float32)
    return s, cols, in_row, use


@triton.jit
def rowwise_fwd_blocked(
    X, RES, Y, S, W, B, PAD, SHIFT, DELTA, RSTD,   # as rowwise_fwd
    stride_x, stride_r, stride_y, stride_s, D, eps,
    HAS_RES: tl.constexpr, WRITE_S: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_PAD: tl.constexpr, CENTER: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """:func:`rowwise_fwd` in column blocks: pass 1 the sum (and ``s``, written
    whole where WRITE_S), pass 2 the centred moments, pass 3 ``y``."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_PAD:
        real = tl.load(PAD + row) == 0
    else:
        real = row >= 0
    total = 0.0
    for c0 in range(0, D, BLOCK_C):
        if WRITE_S:                          # the sum at every position, padding included
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, True, HAS_RES, BLOCK_C)
            tl.store(S + row * stride_s + cols, s.to(S.dtype.element_ty), mask=in_row)
            s = tl.where(use & real, s, 0.0)
        else:
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
        total += tl.sum(s, axis=0)
    if CENTER:
        m = total / D
    else:
        m = 0.0
    sd = 0.0
    sdd = 0.0
    amax = 0.0
    for c0 in range(0, D, BLOCK_C):
        s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
        d = tl.where(use, s - m, 0.0)
        sd += tl.sum(d, axis=0)
        sdd += tl.sum(d * d, axis=0)
        amax = tl.maximum(amax, tl.max(tl.abs(d), axis=0))
    if CENTER:
        delta = sd / D
        var = sdd / D - delta * delta
    else:
        delta = 0.0
        var = sdd / D
    overflow = (var > 3.0e38) | (var != var)
    var = tl.maximum(var, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    if overflow:                             # squares overflowed: the moments of d/a, a ≈ max|d|
        inv_a = tl.exp2(-tl.floor(tl.log2(amax)))
        sdd2 = 0.0
        for c0 in range(0, D, BLOCK_C):
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
            ds = tl.where(use, s - m, 0.0) * inv_a
            sdd2 += tl.sum(ds * ds, axis=0)
        dl = delta * inv_a
        var2 = tl.maximum(sdd2 / D - dl * dl, 0.0)
        rstd = inv_a / tl.sqrt(var2 + eps * inv_a * inv_a)
    rstd = tl.where(real, rstd, 0.0)
    for c0 in range(0, D, BLOCK_C):
        s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
        y = (tl.where(use, s - m, 0.0) - delta) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, tl.where(use, y, 0.0).to(Y.dtype.element_ty), mask=in_row)
    tl.store(SHIFT + row, m)
    tl.store(DELTA + row, delta)
    tl.store(RSTD + row, rstd)


@triton.jit
def rowwise_bwd_blocked(
    DY, X, RES, DS, DX, W, PAD, SHIFT, DELTA, RSTD, DW_PART, DB_PART,   # as rowwise_bwd
    stride_dy, stride_x, stride_r, stride_ds, stride_dx, R, D, rows_per_program,
    HAS_RES: tl.constexpr, HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_PAD: tl.constexpr,
    CENTER: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """:func:`rowwise_bwd` in column blocks: per row, pass 1 the constants ``c₁``,
    ``c₂``, pass 2 ``dx`` and the program's partial ``Σ dy ⊙ x̂``, ``Σ dy`` — kept in
    its own rows of ``DW_PART``/``DB_PART`` (zeroed here first, then read and
    written by this program alone: no atomics, no zero fill by the caller)."""
    pid = tl.program_id(0)
    for c0 in range(0, D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        tl.store(DW_PART + pid * D + cols, tl.zeros([BLOCK_C], dtype=tl.float32), mask=cols < D)
        tl.store(DB_PART + pid * D + cols, tl.zeros([BLOCK_C], dtype=tl.float32), mask=cols < D)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, R)
    for row in range(first, last):
        if HAS_PAD:
            real = tl.load(PAD + row) == 0
        else:
            real = row >= 0
        m = tl.load(SHIFT + row)
        delta = tl.load(DELTA + row)
        rstd = tl.load(RSTD + row)
        sg = 0.0
        sgx = 0.0
        for c0 in range(0, D, BLOCK_C):
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
            dy = tl.load(DY + row * stride_dy + cols, mask=use, other=0.0).to(tl.float32)
            if HAS_W:
                dy = dy * tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
            xhat = tl.where(use, ((s - m) - delta) * rstd, 0.0)
            sg += tl.sum(dy, axis=0)
            sgx += tl.sum(dy * xhat, axis=0)
        if CENTER:
            c1 = sg / D
        else:
            c1 = 0.0
        c2 = sgx / D
        for c0 in range(0, D, BLOCK_C):
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
            dy = tl.load(DY + row * stride_dy + cols, mask=use, other=0.0).to(tl.float32)
            if HAS_W:
                g = dy * tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
            else:
                g = dy
            xhat = tl.where(use, ((s - m) - delta) * rstd, 0.0)
            dx = tl.where(use, (g - c1 - xhat * c2) * rstd, 0.0)
            if HAS_DS:
                dx += tl.load(DS + row * stride_ds + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=in_row)
            dw = tl.load(DW_PART + pid * D + cols, mask=in_row, other=0.0)
            tl.store(DW_PART + pid * D + cols, dw + dy * xhat, mask=in_row)
            db = tl.load(DB_PART + pid * D + cols, mask=in_row, other=0.0)
            tl.store(DB_PART + pid * D + cols, db + dy, mask=in_row)
