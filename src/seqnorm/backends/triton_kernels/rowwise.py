r"""Row-wise norms in Triton: LayerNorm and RMSNorm, with or without the residual Add.

Forward, one program per row ``r`` of ``s = x (+ residual)``, in float32 with
the row in registers (``D ≤ 65536``), by the corrected two-pass algorithm:

.. math::
    m = \frac{1}{D}\sum_j s_j,\quad d_j = s_j - m,\quad δ = \frac{1}{D}\sum_j d_j,\quad
    σ^2 = \frac{1}{D}\sum_j d_j^2 - δ^2,\quad r = \frac{1}{\sqrt{σ^2 + ε}}

(the second pass corrects the rounding of ``m``, so an offset of 1e4 costs
float32 nothing), ``x̂ = (d − δ)·r``, ``y = x̂·w + b``. RMSNorm: ``m = δ = 0``,
``σ² = mean(s²)``. ``m``, ``δ`` and ``r`` are stored per row for the backward
(``STATS``, one ``(R, 3)`` buffer: one allocation a call). A finite row whose squares overflow float32
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

from .partials import program_rows, store_partials


@triton.jit
def _is_real(PAD, row, HAS_PAD: tl.constexpr):
    """Whether row ``row`` is real (its padding bit 0; every row without padding)."""
    if HAS_PAD:
        real = tl.load(PAD + row) == 0
    else:
        real = row >= 0
    return real


@triton.jit
def _param(P, cols, in_row):
    """A ``(D,)`` parameter's columns ``cols`` as float32."""
    return tl.load(P + cols, mask=in_row, other=0.0).to(tl.float32)


@triton.jit
def _affine(xhat, W, B, cols, in_row, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """``y = x̂·w + b`` (each where given)."""
    y = xhat
    if HAS_W:
        y = y * _param(W, cols, in_row)
    if HAS_B:
        y = y + _param(B, cols, in_row)
    return y


@triton.jit
def _mean_if(total, D, CENTER: tl.constexpr):
    """``total/D`` for LayerNorm (``CENTER``), 0 for RMSNorm: ``m``, ``δ`` and ``c₁``."""
    if CENTER:
        mean = total / D
    else:
        mean = 0.0
    return mean


@triton.jit
def _rstd(delta, msq, eps, CENTER: tl.constexpr):
    """``(r, overflow)`` from ``δ`` and ``Σd²/D``: ``σ² = Σd²/D − δ²`` (RMSNorm: ``Σd²/D``),
    ``r = 1/√(σ² + ε)``; ``overflow`` where σ² is Inf or NaN (the squares overflowed:
    :func:`_rescaled_rstd` forms ``r`` again)."""
    if CENTER:
        var = msq - delta * delta
    else:
        var = msq
    overflow = (var > 3.0e38) | (var != var)  # squares overflowed (a finite row near 1e19 and beyond)
    var = tl.maximum(var, 0.0)
    return 1.0 / tl.sqrt(var + eps), overflow


@triton.jit
def _inv_scale(amax):
    """``1/a``, ``a`` the power of two with ``a ≤ amax < 2a``."""
    return tl.exp2(-tl.floor(tl.log2(amax)))


@triton.jit
def _rescaled_rstd(dl, sdd_a, inv_a, D, eps):
    """``r = (1/a)/√(σ'² + ε/a²)`` from ``δ/a`` and ``Σ (d/a)²``: ``σ'² = Σ(d/a)²/D − (δ/a)²``."""
    var2 = tl.maximum(sdd_a / D - dl * dl, 0.0)
    return inv_a / tl.sqrt(var2 + eps * inv_a * inv_a)


@triton.jit
def _xhat(s, m, delta, rstd, use):
    """``x̂ = ((s − m) − δ)·r`` at real columns, 0 elsewhere."""
    return tl.where(use, ((s - m) - delta) * rstd, 0.0)


@triton.jit
def _store_dx(DX, DS, row, stride_dx, stride_ds, cols, in_row, use, g, xhat, c1, c2, rstd, HAS_DS: tl.constexpr):
    """``dx = r·(g − c₁ − x̂·c₂)`` at real columns (0 elsewhere), plus ``ds`` where given."""
    dx = tl.where(use, (g - c1 - xhat * c2) * rstd, 0.0)
    if HAS_DS:
        dx += tl.load(DS + row * stride_ds + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=in_row)


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
def rowwise_fwd(
    X,          # (R, D) input, row stride stride_x
    RES,        # (R, D) residual, row stride stride_r (HAS_RES)
    Y,          # (R, D) output, row stride stride_y
    S,          # (R, D) the sum x + residual, row stride stride_s (WRITE_S)
    W,          # (D,) weight (HAS_W)
    B,          # (D,) bias (HAS_B)
    PAD,        # (R,) uint8, 1 at padding (HAS_PAD)
    STATS,      # (R, 3) float32 out: m, δ, r (r 0 at padding)
    stride_x, stride_r, stride_y, stride_s,
    D,          # features per row
    eps,
    HAS_RES: tl.constexpr, WRITE_S: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_PAD: tl.constexpr, CENTER: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    real = _is_real(PAD, row, HAS_PAD)
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
    else:
        m = 0.0
        d = tl.where(use, s, 0.0)
    delta = _mean_if(tl.sum(d, axis=0), D, CENTER)
    rstd, overflow = _rstd(delta, tl.sum(d * d, axis=0) / D, eps, CENTER)
    if overflow:                             # (a NaN row comes here too, and stays NaN)
        inv_a = _inv_scale(tl.max(tl.abs(d), axis=0))
        ds = d * inv_a
        rstd = _rescaled_rstd(delta * inv_a, tl.sum(ds * ds, axis=0), inv_a, D, eps)
    rstd = tl.where(real, rstd, 0.0)
    y = tl.where(use, _affine((d - delta) * rstd, W, B, cols, in_row, HAS_W, HAS_B), 0.0)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=in_row)
    tl.store(STATS + 3 * row, m)
    tl.store(STATS + 3 * row + 1, delta)
    tl.store(STATS + 3 * row + 2, rstd)


@triton.jit
def rowwise_bwd(
    DY,         # (R, D) gradient of y, row stride stride_dy
    X,          # (R, D) input (what was normalized, or one addend of it), row stride stride_x
    RES,        # (R, D) residual, row stride stride_r (HAS_RES)
    DS,         # (R, D) gradient of the returned sum, row stride stride_ds (HAS_DS)
    DX,         # (R, D) out, row stride stride_dx
    W,          # (D,) weight (HAS_W)
    PAD,        # (R,) uint8, 1 at padding (HAS_PAD)
    STATS,      # (R, 3) float32: m, δ, r
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
        w = _param(W, cols, in_row)
    else:
        w = tl.where(in_row, 1.0, 0.0)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    first, last = program_rows(pid, R, rows_per_program)
    for row in range(first, last):
        s, _, _, use = _row_block(X, RES, row, stride_x, stride_r, 0, D, _is_real(PAD, row, HAS_PAD), HAS_RES,
                                  BLOCK_D)
        dy = tl.load(DY + row * stride_dy + cols, mask=use, other=0.0).to(tl.float32)
        m = tl.load(STATS + 3 * row)
        delta = tl.load(STATS + 3 * row + 1)
        rstd = tl.load(STATS + 3 * row + 2)
        xhat = _xhat(s, m, delta, rstd, use)
        g = dy * w
        c1 = _mean_if(tl.sum(g, axis=0), D, CENTER)
        c2 = tl.sum(g * xhat, axis=0) / D
        _store_dx(DX, DS, row, stride_dx, stride_ds, cols, in_row, use, g, xhat, c1, c2, rstd, HAS_DS)
        dw += dy * xhat
        db += dy
    store_partials(DW_PART, DB_PART, pid, D, cols, in_row, dw, db)


# ---------------------------------------------------------------------------
# Column-blocked: rows too wide for registers (BLOCK_D > MAX_BLOCK_D in the launcher)
# ---------------------------------------------------------------------------
# The same maths, the row read in BLOCK_C-column blocks, once per pass (the
# re-reads come from cache): a thread holds BLOCK_C/threads elements per
# tensor instead of the whole row, so nothing spills to local memory.


@triton.jit
def rowwise_fwd_blocked(
    X, RES, Y, S, W, B, PAD, STATS,   # as rowwise_fwd
    stride_x, stride_r, stride_y, stride_s, D, eps,
    HAS_RES: tl.constexpr, WRITE_S: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_PAD: tl.constexpr, CENTER: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """:func:`rowwise_fwd` in column blocks: pass 1 the sum (and ``s``, written
    whole where WRITE_S), pass 2 the centred moments, pass 3 ``y``."""
    row = tl.program_id(0).to(tl.int64)
    real = _is_real(PAD, row, HAS_PAD)
    total = 0.0
    for c0 in range(0, D, BLOCK_C):
        if WRITE_S:                          # the sum at every position, padding included
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, True, HAS_RES, BLOCK_C)
            tl.store(S + row * stride_s + cols, s.to(S.dtype.element_ty), mask=in_row)
            s = tl.where(use & real, s, 0.0)
        else:
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
        total += tl.sum(s, axis=0)
    m = _mean_if(total, D, CENTER)
    sd = 0.0
    sdd = 0.0
    amax = 0.0
    for c0 in range(0, D, BLOCK_C):
        s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
        d = tl.where(use, s - m, 0.0)
        sd += tl.sum(d, axis=0)
        sdd += tl.sum(d * d, axis=0)
        amax = tl.maximum(amax, tl.max(tl.abs(d), axis=0))
    delta = _mean_if(sd, D, CENTER)
    rstd, overflow = _rstd(delta, sdd / D, eps, CENTER)
    if overflow:                             # squares overflowed: the moments of d/a, a ≈ max|d|
        inv_a = _inv_scale(amax)
        sdd2 = 0.0
        for c0 in range(0, D, BLOCK_C):
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
            ds = tl.where(use, s - m, 0.0) * inv_a
            sdd2 += tl.sum(ds * ds, axis=0)
        rstd = _rescaled_rstd(delta * inv_a, sdd2, inv_a, D, eps)
    rstd = tl.where(real, rstd, 0.0)
    for c0 in range(0, D, BLOCK_C):
        s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
        y = _affine((tl.where(use, s - m, 0.0) - delta) * rstd, W, B, cols, in_row, HAS_W, HAS_B)
        tl.store(Y + row * stride_y + cols, tl.where(use, y, 0.0).to(Y.dtype.element_ty), mask=in_row)
    tl.store(STATS + 3 * row, m)
    tl.store(STATS + 3 * row + 1, delta)
    tl.store(STATS + 3 * row + 2, rstd)


@triton.jit
def rowwise_bwd_blocked(
    DY, X, RES, DS, DX, W, PAD, STATS, DW_PART, DB_PART,   # as rowwise_bwd
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
    first, last = program_rows(pid, R, rows_per_program)
    for row in range(first, last):
        real = _is_real(PAD, row, HAS_PAD)
        m = tl.load(STATS + 3 * row)
        delta = tl.load(STATS + 3 * row + 1)
        rstd = tl.load(STATS + 3 * row + 2)
        sg = 0.0
        sgx = 0.0
        for c0 in range(0, D, BLOCK_C):
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
            dy = tl.load(DY + row * stride_dy + cols, mask=use, other=0.0).to(tl.float32)
            if HAS_W:
                dy = dy * _param(W, cols, in_row)
            xhat = _xhat(s, m, delta, rstd, use)
            sg += tl.sum(dy, axis=0)
            sgx += tl.sum(dy * xhat, axis=0)
        c1 = _mean_if(sg, D, CENTER)
        c2 = sgx / D
        for c0 in range(0, D, BLOCK_C):
            s, cols, in_row, use = _row_block(X, RES, row, stride_x, stride_r, c0, D, real, HAS_RES, BLOCK_C)
            dy = tl.load(DY + row * stride_dy + cols, mask=use, other=0.0).to(tl.float32)
            if HAS_W:
                g = dy * _param(W, cols, in_row)
            else:
                g = dy
            xhat = _xhat(s, m, delta, rstd, use)
            _store_dx(DX, DS, row, stride_dx, stride_ds, cols, in_row, use, g, xhat, c1, c2, rstd, HAS_DS)
            dw = tl.load(DW_PART + pid * D + cols, mask=in_row, other=0.0)
            tl.store(DW_PART + pid * D + cols, dw + dy * xhat, mask=in_row)
            db = tl.load(DB_PART + pid * D + cols, mask=in_row, other=0.0)
            tl.store(DB_PART + pid * D + cols, db + dy, mask=in_row)
