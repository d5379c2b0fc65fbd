"""seqnorm.functional against torch (values and gradients), against the float64
reference (masked forward and backward), gradcheck, dtypes and stability."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck

from seqnorm import functional as F
from seqnorm import reference as ref

from conftest import to_np

# (dtype, atol, rtol) for comparisons against torch on the same inputs
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

# (input shape, normalized_shape): odd sizes, D=1, T=1, zero-size, multi-dim normalized_shape
ROWWISE_SHAPES = [
    ((2, 3, 8), (8,)),
    ((5, 7, 123), (123,)),
    ((1, 1, 1023), (1023,)),
    ((3, 1, 17), (17,)),
    ((4, 6, 1), (1,)),
    ((0, 5), (5,)),
    ((2, 0, 5), (5,)),
    ((9,), (9,)),
    ((2, 3, 4, 5), (4, 5)),
    ((2, 3, 4, 5), (3, 4, 5)),
]


def _params(shape, dtype, weight, bias, gen):
    w = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_() if weight else None
    b = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_() if bias else None
    return w, b


def _grads(out, inputs, gen):
    dy = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    live = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, live, dy, allow_unused=True) if live else [])
    return [None if t is None else next(grads) for t in inputs], dy


# ---------------------------------------------------------------------------
# Parity with torch (no padding)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,nshape", ROWWISE_SHAPES)
@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_torch(shape, nshape, dtype, weight, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_()
    w, b = _params(nshape, dtype, weight, bias, gen)
    ours = F.layer_norm(x, nshape, w, b, 1e-5)
    theirs = TF.layer_norm(x, nshape, w, b, 1e-5)
    assert torch.equal(ours, theirs)  # the same kernel underneath: bit for bit
    g1, dy = _grads(ours, [x, w, b], gen)
    g2 = torch.autograd.grad(theirs, [t for t in (x, w, b) if t is not None], dy, allow_unused=True)
    for a, c in zip([g for g in g1 if g is not None], g2):
        torch.testing.assert_close(a, c, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,nshape", ROWWISE_SHAPES)
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_torch(shape, nshape, dtype, weight, eps):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_()
    w, _ = _params(nshape, dtype, weight, False, gen)
    ours = F.rms_norm(x, nshape, w, eps)
    theirs = TF.rms_norm(x, nshape, w, eps)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    g1, dy = _grads(ours, [x, w], gen)
    g2 = torch.autograd.grad(theirs, [t for t in (x, w) if t is not None], dy)
    for a, c in zip([g for g in g1 if g is not None], g2):
        torch.testing.assert_close(a, c, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_norm_matches_unfused_torch(center, prenorm, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 33, dtype=dtype, generator=gen).requires_grad_()
    r = torch.randn(3, 5, 33, dtype=dtype, generator=gen).requires_grad_()
    w, b = _params((33,), dtype, True, center, gen)
    if center:
        out = F.add_layer_norm(x, r, 33, w, b, prenorm=prenorm)
        ref_y = TF.layer_norm(x + r, (33,), w, b)
    else:
        out = F.add_rms_norm(x, r, 33, w, prenorm=prenorm)
        ref_y = TF.rms_norm(x + r, (33,), w)
    y = out[0] if prenorm else out
    torch.testing.assert_close(y, ref_y, atol=0, rtol=0)
    if prenorm:
        assert torch.equal(out[1], x + r)
    params = [t for t in (x, r, w, b) if t is not None]
    dy = torch.randn(y.shape, dtype=dtype, generator=gen)
    ours = torch.autograd.grad((y * dy).sum() + (out[1] ** 2).sum() if prenorm else (y * dy).sum(), params)
    theirs = torch.autograd.grad((ref_y * dy).sum() + ((x + r) ** 2).sum() if prenorm else (ref_y * dy).sum(), params)
    for a, c in zip(ours, theirs):
        torch.testing.assert_close(a, c, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def _torch_bn_on_sequences(bn, x):
    """torch.nn.BatchNorm1d on (B, T, D): the transposed (B, D, T) tensor, or (N, D) as is."""
    return bn(x.transpose(1, 2)).transpose(1, 2) if x.dim() == 3 else bn(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 7, 13), (1, 5, 1), (3, 1, 6), (37, 9)])
@pytest.mark.parametrize("affine", [True, False])
def test_seq_batch_norm_matches_torch_batchnorm1d(shape, dtype, affine):
    gen = torch.Generator().manual_seed(3)
    d = shape[-1]
    theirs = torch.nn.BatchNorm1d(d, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_(generator=gen)
            theirs.bias.normal_(generator=gen)
    rm, rv = theirs.running_mean.clone(), theirs.running_var.clone()
    w = None if not affine else theirs.weight.detach().clone().requires_grad_()
    b = None if not affine else theirs.bias.detach().clone().requires_grad_()
    atol, rtol = TOL[dtype]
    for step in range(3):  # training steps update the running statistics identically
        x = (3 * torch.randn(shape, dtype=dtype, generator=gen) + 2).requires_grad_()
        ours = F.seq_batch_norm(x, rm, rv, w, b, training=True, momentum=0.1)
        ref_y = _torch_bn_on_sequences(theirs, x)
        torch.testing.assert_close(ours, ref_y, atol=atol, rtol=rtol)
        dy = torch.randn(shape, dtype=dtype, generator=gen)
        params = [x] + ([w] if affine else [])
        tparams = [x] + ([theirs.weight] if affine else [])
        for a, c in zip(torch.autograd.grad((ours * dy).sum(), params),
                        torch.autograd.grad((ref_y * dy).sum(), tparams)):
            torch.testing.assert_close(a, c, atol=atol * 10, rtol=rtol * 10)
        torch.testing.assert_close(rm, theirs.running_mean, atol=atol, rtol=rtol)
        torch.testing.assert_close(rv, theirs.running_var, atol=atol, rtol=rtol)
    theirs.eval()
    x = torch.randn(shape, dtype=dtype, generator=gen)
    torch.testing.assert_close(F.seq_batch_norm(x, rm, rv, w, b, training=False),
                               _torch_bn_on_sequences(theirs, x), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------
# Masked: functional (torch autograd) against the reference's hand-written backward
# ---------------------------------------------------------------------------


def _masked_case(seed, shape=(4, 6, 11), full_row=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2 + 1
    mask = rng.random(shape[:2]) < 0.35
    mask[0, 0] = mask[0, 1] = False
    if full_row:
        mask[2] = True
    x[mask] = np.nan  # poison: nothing may leak from a padded token
    return x, mask


def _check_against_reference(y, inputs, ref_y, ref_grads, mask, gen, dy_np):
    np.testing.assert_allclose(to_np(y), ref_y, rtol=1e-10, atol=1e-12)
    assert torch.all(y[torch.as_tensor(mask)] == 0)
    grads = torch.autograd.grad(y, inputs, torch.as_tensor(dy_np))
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        np.testing.assert_allclose(to_np(g), rg, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("center", [True, False])
def test_masked_rowwise_matches_reference(center, backend):
    x_np, mask = _masked_case(10)
    rng = np.random.default_rng(11)
    w_np, b_np = rng.normal(size=11), rng.normal(size=11)
    x = torch.tensor(x_np, requires_grad=True)
    w = torch.tensor(w_np, requires_grad=True)
    b = torch.tensor(b_np, requires_grad=True) if center else None
    m = torch.tensor(mask)
    if center:
        y = F.layer_norm(x, (11,), w, b, 1e-5, padding_mask=m)
        ref_y, cache = ref.layer_norm_forward(x_np, w_np, b_np, 1e-5, mask)
    else:
        y = F.rms_norm(x, (11,), w, 1e-6, padding_mask=m)
        ref_y, cache = ref.rms_norm_forward(x_np, w_np, 1e-6, mask)
    dy = rng.normal(size=x_np.shape)
    ref_grads = (ref.layer_norm_backward if center else ref.rms_norm_backward)(dy, cache)
    _check_against_reference(y, [t for t in (x, w, b) if t is not None], ref_y, ref_grads, mask, None, dy)


@pytest.mark.parametrize("center", [True, False])
def test_masked_add_norm_matches_reference(center, backend):
    x_np, mask = _masked_case(12)
    rng = np.random.default_rng(13)
    r_np = rng.normal(size=x_np.shape)
    w_np = rng.normal(size=11)
    x, r = torch.tensor(x_np, requires_grad=True), torch.tensor(r_np, requires_grad=True)
    w, m = torch.tensor(w_np, requires_grad=True), torch.tensor(mask)
    fn = F.add_layer_norm if center else F.add_rms_norm
    y, s = fn(x, r, 11, w, eps=1e-5, prenorm=True, padding_mask=m)
    ref_y, ref_s, cache = ref.add_norm_forward(x_np, r_np, w_np, None, 1e-5, mask, center=center)
    np.testing.assert_allclose(to_np(y), ref_y, rtol=1e-10, atol=1e-12)
    real = ~mask
    np.testing.assert_array_equal(to_np(s)[real], ref_s[real])
    dy = rng.normal(size=x_np.shape)
    dx, dr, dw, _ = ref.add_norm_backward(dy, cache)
    gx, gr, gw = torch.autograd.grad(y, [x, r, w], torch.tensor(dy))
    for g, rg in ((gx, dx), (gr, dr), (gw, dw)):
        np.testing.assert_allclose(to_np(g), rg, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("full_row", [True, False])
def test_masked_seq_batch_norm_matches_reference(training, full_row, backend):
    x_np, mask = _masked_case(14, full_row=full_row)
    rng = np.random.default_rng(15)
    w_np, b_np = rng.normal(size=11), rng.normal(size=11)
    rm_np, rv_np = rng.normal(size=11), rng.random(11) + 0.5
    x, w, b = (torch.tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))
    rm, rv = torch.tensor(rm_np), torch.tensor(rv_np)
    y = F.seq_batch_norm(x, rm, rv, w, b, training=training, momentum=0.2,
                         padding_mask=torch.tensor(mask))
    ref_y, cache = ref.seq_batch_norm_forward(x_np, w_np, b_np, 1e-5, mask, rm_np, rv_np,
                                              use_batch_stats=training)
    dy = rng.normal(size=x_np.shape)
    _check_against_reference(y, [x, w, b], ref_y, ref.seq_batch_norm_backward(dy, cache), mask, None, dy)
    if training:  # running statistics from real tokens only, unbiased variance
        n = cache["count"]
        np.testing.assert_allclose(to_np(rm), ref.running_update(rm_np, cache["batch_mean"], 0.2))
        np.testing.assert_allclose(to_np(rv), ref.running_update(rv_np, ref.unbiased(cache["batch_var"], n), 0.2))
    else:
        np.testing.assert_array_equal(to_np(rm), rm_np)


@pytest.mark.parametrize("training", [True, False])
def test_masked_power_norm_matches_reference(training, backend):
    x_np, mask = _masked_case(16)
    rng = np.random.default_rng(17)
    w_np, b_np = rng.normal(size=11), rng.normal(size=11)
    phi_np, nu_np = rng.random(11) + 0.5, rng.normal(size=11) * 0.1
    x, w, b = (torch.tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))
    phi, nu = torch.tensor(phi_np), torch.tensor(nu_np)
    y = F.power_norm(x, phi, nu, w, b, training=training, momentum=0.25,
                     padding_mask=torch.tensor(mask))
    ref_y, cache = ref.power_norm_forward(x_np, phi_np, w_np, b_np, 1e-5, mask)
    dy = rng.normal(size=x_np.shape)
    dx, dw, db, new_nu = ref.power_norm_backward(dy, cache, nu_np if training else None, factor=0.25)
    _check_against_reference(y, [x, w, b], ref_y, (dx, dw, db), mask, None, dy)
    if training:
        np.testing.assert_allclose(to_np(phi), ref.running_update(phi_np, cache["batch_phi"], 0.25))
        np.testing.assert_allclose(to_np(nu), new_nu, rtol=1e-10)
    else:
        np.testing.assert_array_equal(to_np(phi), phi_np)
        np.testing.assert_array_equal(to_np(nu), nu_np)


# ---------------------------------------------------------------------------
# gradcheck in float64, every op, with and without padding
# ---------------------------------------------------------------------------


def _gc_inputs(seed, shape=(3, 4, 5), masked=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(shape[-1], dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(shape[-1], dtype=torch.float64, generator=gen, requires_grad=True)
    mask = None
    if masked:
        mask = torch.zeros(shape[:2], dtype=torch.bool)
        mask[0, 2:] = True
        mask[1] = True  # a fully padded sequence
    return x, w, b, mask


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_rowwise(masked, backend):
    x, w, b, mask = _gc_inputs(20, masked=masked)
    r = torch.randn_like(x).requires_grad_()
    assert gradcheck(lambda x, w, b: F.layer_norm(x, (5,), w, b, padding_mask=mask), (x, w, b))
    assert gradcheck(lambda x, w: F.rms_norm(x, (5,), w, 1e-6, padding_mask=mask), (x, w))
    assert gradcheck(lambda x, r, w, b: F.add_layer_norm(x, r, (5,), w, b, prenorm=True, padding_mask=mask),
                     (x, r, w, b))
    assert gradcheck(lambda x, r, w: F.add_rms_norm(x, r, (5,), w, 1e-6, prenorm=True, padding_mask=mask),
                     (x, r, w))


def test_gradcheck_layer_norm_multidim(backend):
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([True, False])
    assert gradcheck(lambda x, w: F.layer_norm(x, (3, 4), w, None, padding_mask=mask), (x, w))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_seq_batch_norm(masked, training, backend):
    x, w, b, mask = _gc_inputs(22, masked=masked)
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    # momentum 0 keeps the running statistics fixed across gradcheck's many calls
    assert gradcheck(lambda x, w, b: F.seq_batch_norm(x, rm, rv, w, b, training=training, momentum=0.0,
                                                      padding_mask=mask), (x, w, b))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_power_norm_exact_path(masked, training, backend):
    """With running_nu=None the backward is the exact gradient (ψ² held constant)."""
    x, w, b, mask = _gc_inputs(23, masked=masked)
    phi = torch.rand(5, dtype=torch.float64) + 0.5
    assert gradcheck(lambda x, w, b: F.power_norm(x, phi, None, w, b, training=training, momentum=0.0,
                                                  padding_mask=mask), (x, w, b))


# ---------------------------------------------------------------------------
# Low precision: float32 statistics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_float32_math_rounded_once(dtype):
    gen = torch.Generator().manual_seed(30)
    x = torch.randn(4, 9, 64, generator=gen).to(dtype)
    w = torch.randn(64, generator=gen).to(dtype)
    b = torch.randn(64, generator=gen).to(dtype)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[1, 5:] = True
    expect_ln = TF.layer_norm(x.float(), (64,), w.float(), b.float()).to(dtype)
    assert F.layer_norm(x, 64, w, b).dtype == dtype
    assert torch.equal(F.layer_norm(x, 64, w, b), expect_ln)
    expect_rms = TF.rms_norm(x.float(), (64,), w.float(), torch.finfo(dtype).eps).to(dtype)
    assert torch.equal(F.rms_norm(x, 64, w), expect_rms)
    # against torch's own low-precision kernels, with the low-precision tolerance
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(F.layer_norm(x, 64, w, b), TF.layer_norm(x, (64,), w, b), atol=atol * 4, rtol=rtol)
    y = F.seq_batch_norm(x, None, None, w, b, training=True, padding_mask=mask)
    ref_y, _ = ref.seq_batch_norm_forward(to_np(x), to_np(w), to_np(b), 1e-5, mask.numpy())
    np.testing.assert_allclose(to_np(y), ref_y, atol=atol * 4, rtol=rtol)
    y = F.power_norm(x, torch.full((64,), 2.0), None, w, b, padding_mask=mask)
    ref_y, _ = ref.power_norm_forward(to_np(x), np.full(64, 2.0), to_np(w), to_np(b), 1e-5, mask.numpy())
    np.testing.assert_allclose(to_np(y), ref_y, atol=atol * 4, rtol=rtol)
    # gradients flow back in the input dtype
    xg = x.clone().requires_grad_()
    F.layer_norm(xg, 64, w, b, padding_mask=mask).float().sum().backward()
    assert xg.grad.dtype == dtype and torch.all(xg.grad[mask] == 0)


def test_float16_values_whose_squares_overflow_float16(backend):
    x = (300 + torch.randn(2, 3, 16)).half()   # 300² = 90000 > 65504, the float16 maximum
    assert torch.isinf((x * x).sum())
    for y in (F.layer_norm(x, 16), F.rms_norm(x, 16), F.seq_batch_norm(x, None, None, training=True)):
        assert torch.isfinite(y).all()
    np.testing.assert_allclose(to_np(F.rms_norm(x, 16)), ref.rms_norm_forward(to_np(x), eps=torch.finfo(torch.float16).eps)[0],
                               atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------
# Numerical stability: a large offset in float32 (no E[x²] − E[x]² cancellation)
# ---------------------------------------------------------------------------


def test_large_offset_float32_matches_float64():
    gen = torch.Generator().manual_seed(31)
    x32 = 1e4 + torch.randn(8, 64, 96, generator=gen)
    mask = torch.rand(8, 64, generator=gen) < 0.2
    x64 = x32.double()  # the same float32 inputs, computed in float64
    phi32 = (x32 * x32).mean((0, 1))
    cases = [
        lambda x: F.layer_norm(x, 96, padding_mask=mask),
        lambda x: F.rms_norm(x, 96, padding_mask=mask),
        lambda x: F.seq_batch_norm(x, None, None, training=True, padding_mask=mask),
        lambda x: F.power_norm(x, phi32.to(x.dtype), None, padding_mask=mask),
    ]
    for fn in cases:
        y32, y64 = fn(x32), fn(x64)
        assert torch.isfinite(y32).all()
        # relative to the output's scale (outputs are O(1))
        err = (y32.double() - y64).abs().max() / y64.abs().max()
        assert err < 1e-3, err
    # and the masked BN statistics themselves
    real = x64[~mask]
    rm, rv = torch.zeros(96), torch.ones(96)
    F.seq_batch_norm(x32, rm, rv, training=True, momentum=1.0, padding_mask=mask)
    torch.testing.assert_close(rm.double(), real.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(rv.double(), real.var(0), rtol=1e-3, atol=0)


# ---------------------------------------------------------------------------
# Padding edge cases
# ---------------------------------------------------------------------------


def test_all_padding_batch_returns_zeros_and_keeps_running_stats(backend):
    x = torch.full((2, 3, 4), float("nan"), requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    rm, rv = torch.randn(4), torch.rand(4) + 1
    phi, nu = torch.rand(4) + 1, torch.randn(4)
    saved = [t.clone() for t in (rm, rv, phi, nu)]
    w, b = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    outs = [
        F.layer_norm(x, 4, w, b, padding_mask=mask),
        F.rms_norm(x, 4, w, padding_mask=mask),
        F.add_layer_norm(x, x, 4, w, b, padding_mask=mask),
        F.seq_batch_norm(x, rm, rv, w, b, training=True, padding_mask=mask),
        F.power_norm(x, phi, nu, w, b, training=True, padding_mask=mask),
    ]
    for y in outs:
        assert torch.equal(y, torch.zeros_like(y))
        gx, gw, gb = torch.autograd.grad(y.sum(), [x, w, b], allow_unused=True)
        assert torch.equal(gx, torch.zeros_like(gx))
        assert torch.equal(gw, torch.zeros_like(gw))
    for t, s in zip((rm, rv, phi, nu), saved):
        assert torch.equal(t, s)


def test_lengths_equal_padding_mask(backend):
    gen = torch.Generator().manual_seed(40)
    x = torch.randn(3, 5, 6, generator=gen)
    lengths = torch.tensor([5, 2, 0])
    mask = torch.arange(5)[None, :] >= lengths[:, None]
    for fn in (lambda **k: F.layer_norm(x, 6, **k), lambda **k: F.rms_norm(x, 6, **k),
               lambda **k: F.seq_batch_norm(x, None, None, training=True, **k),
               lambda **k: F.power_norm(x, torch.ones(6), **k)):
        assert torch.equal(fn(lengths=lengths), fn(padding_mask=mask))


def test_one_real_token_in_training_raises_and_keeps_stats(backend):
    x = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="more than 1 real token"):
        F.seq_batch_norm(x, rm, rv, training=True, padding_mask=mask)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))
    # eval mode uses the running statistics: one token is fine
    assert torch.isfinite(F.seq_batch_norm(x, rm, rv, training=False, padding_mask=mask)).all()


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5), (0, 3, 5), (2, 3, 0)])
def test_zero_size_inputs(shape, backend):
    import seqnorm

    x = torch.randn(shape, requires_grad=True)
    d = shape[-1]
    bn, pn = seqnorm.SeqBatchNorm(d), seqnorm.PowerNorm(d)
    outs = [bn(x), pn(x), F.layer_norm(x, d), F.rms_norm(x, d), F.add_layer_norm(x, x, d)]
    for y in outs:
        assert y.shape == x.shape
        (g,) = torch.autograd.grad(y.sum(), [x])
        assert g.shape == x.shape
    # a batch with no token records nothing
    if math.prod(shape[:-1]) == 0:
        assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_var, torch.ones(d))


def test_unmasked_ops_match_reference(backend):
    """Reference ↔ functional parity for every op without padding, forward and backward."""
    rng = np.random.default_rng(50)
    x_np, r_np = rng.normal(size=(3, 7, 6)), rng.normal(size=(3, 7, 6))
    w_np, b_np, phi_np = rng.normal(size=6), rng.normal(size=6), rng.random(6) + 0.5
    dy = rng.normal(size=x_np.shape)
    cases = [
        (lambda x, w, b: F.layer_norm(x, 6, w, b),
         lambda: ref.layer_norm_forward(x_np, w_np, b_np), ref.layer_norm_backward),
        (lambda x, w, b: F.rms_norm(x, 6, w, 1e-6),
         lambda: ref.rms_norm_forward(x_np, w_np, 1e-6), ref.rms_norm_backward),
        (lambda x, w, b: F.add_layer_norm(x, torch.tensor(r_np), 6, w, b),
         lambda: ref.add_norm_forward(x_np, r_np, w_np, b_np)[::2],
         lambda dy, c: (lambda g: (g[0], g[2], g[3]))(ref.add_norm_backward(dy, c))),
        (lambda x, w, b: F.seq_batch_norm(x, None, None, w, b, training=True),
         lambda: ref.seq_batch_norm_forward(x_np, w_np, b_np), ref.seq_batch_norm_backward),
        (lambda x, w, b: F.power_norm(x, torch.tensor(phi_np), None, w, b, training=True),
         lambda: ref.power_norm_forward(x_np, phi_np, w_np, b_np), lambda dy, c: ref.power_norm_backward(dy, c)[:3]),
    ]
    for fn, ref_fwd, ref_bwd in cases:
        x, w, b = (torch.tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))
        y = fn(x, w, b)
        ref_y, cache = ref_fwd()
        np.testing.assert_allclose(to_np(y), ref_y, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad(y, [x, w, b], torch.tensor(dy), allow_unused=True)
        for g, rg in zip(grads, ref_bwd(dy, cache)):
            if rg is None:
                assert g is None
            else:
                np.testing.assert_allclose(to_np(g), rg, rtol=1e-9, atol=1e-11)
