"""The fused kernels on bfloat16 (``kernels/rows.py``): bfloat16 in and out,
float32 inside. Checked against the float64 reference on the same (bfloat16)
inputs — to one bfloat16 rounding — and against the torch backend, which casts
to float32 around torch's own ops: forward, backward, running statistics."""

import numpy as np
import pytest
import torch

import seqnorm
from seqnorm import functional as F
from seqnorm import ops
from seqnorm import reference as ref

from conftest import assert_same_bits_for_thread_counts, to_np

pytest.importorskip("numba")

BF = torch.bfloat16
ULP = 2.0 ** -7          # bfloat16 keeps 8 significant bits: one rounding moves a value by ≤ 2^-8 of it
SHAPES = [(2, 3, 17), (3, 5, 33), (1, 1, 1), (4, 1, 16), (2, 7, 1), (1, 4, 1000), (0, 3, 8), (2, 0, 8)]
OPS = ["layer", "rms", "add_layer", "add_rms"]


@pytest.fixture(autouse=True)
def fused():
    with seqnorm.use_backend("fused"):
        yield


def _inputs(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(BF)
    r = torch.randn(shape, generator=gen).to(BF)
    w = (torch.rand(d, generator=gen) + 0.5).to(BF)
    b = torch.randn(d, generator=gen).to(BF)
    mask = torch.rand(shape[:2], generator=gen) < 0.3
    if shape[0] > 1:
        mask[-1] = True                      # a fully padded sequence
    x = x.masked_fill(mask.unsqueeze(-1), float("nan"))   # poisoned padding
    dy = torch.randn(shape, generator=gen)
    return x, r, w, b, mask, dy


def _call(op, x, r, w, b, mask):
    d = x.shape[-1]
    if op == "layer":
        return F.layer_norm(x, d, w, b, padding_mask=mask), None
    if op == "rms":
        return F.rms_norm(x, d, w, 1e-6, padding_mask=mask), None
    if op == "add_layer":
        return F.add_layer_norm(x, r, d, w, b, padding_mask=mask, prenorm=True)
    return F.add_rms_norm(x, r, d, w, 1e-6, padding_mask=mask, prenorm=True)


def _reference(op, x, r, w, b, mask, dy):
    """Outputs and (dx, dw[, db][, dr]) of the float64 reference on the bfloat16 inputs."""
    xq, rq, wq, bq, m, g = to_np(x), to_np(r), to_np(w), to_np(b), mask.numpy(), to_np(dy.to(BF))
    if op == "layer":
        y, c = ref.layer_norm_forward(xq, wq, bq, 1e-5, m)
        dx, dw, db = ref.layer_norm_backward(g, c)
        return y, [dx, dw, db]
    if op == "rms":
        y, c = ref.rms_norm_forward(xq, wq, 1e-6, m)
        return y, list(ref.rms_norm_backward(g, c))
    center = op == "add_layer"
    y, _, c = ref.add_norm_forward(xq, rq, wq, bq if center else None, 1e-5 if center else 1e-6, m, center=center)
    dx, dr, dw, db = ref.add_norm_backward(g, c)
    return y, [dx, dw, db, dr] if center else [dx, dw, dr]


def _close_to_one_rounding(got, want):
    """``got`` (bfloat16) is ``want`` (float64) rounded once, give or take float32
    noise — absolute, 1e-4 for these O(1) inputs: where a gradient cancels to ~0
    (RMSNorm of D = 1), float32 cannot resolve it any better, in any dtype."""
    np.testing.assert_allclose(to_np(got), want, rtol=ULP, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_bf16_kernels_match_the_reference(op, shape, threads):
    x, r, w, b, mask, dy = _inputs(shape, hash((op, shape)) % 1000)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    xl, wl, bl, rl = leaves
    y, s = _call(op, xl, rl, wl, bl, mask)
    assert y.dtype == BF and (s is None or s.dtype == BF)
    ref_y, ref_grads = _reference(op, x, r, w, b, mask, dy)
    _close_to_one_rounding(y, ref_y)
    assert torch.all(y[mask] == 0)
    if s is not None:
        real = ~mask
        want = x.float() + r.float()
        assert torch.equal(s[real], want.to(BF)[real])          # the float32 sum, rounded once
    wrt = {"layer": [xl, wl, bl], "rms": [xl, wl], "add_layer": [xl, wl, bl, rl], "add_rms": [xl, wl, rl]}[op]
    got = torch.autograd.grad(y, wrt, dy.to(BF))
    for g, want in zip(got, ref_grads):
        assert g.dtype == BF and torch.isfinite(g).all()
        _close_to_one_rounding(g, want)
    assert torch.all(got[0][mask] == 0)                          # no gradient reaches a pad


@pytest.mark.parametrize("op", OPS)
def test_bf16_kernels_match_the_cast_path_forward_and_backward(op):
    """The torch backend casts to float32 around torch's ops; the bfloat16 kernels
    must agree with it to one rounding, including the gradient through the
    returned sum ``s`` (added before the rounding, and passed on at pads)."""
    x, r, w, b, mask, dy = _inputs((5, 40, 96), 3)
    ds = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    results = {}
    for backend in ("fused", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
        with seqnorm.use_backend(backend):
            y, s = _call(op, leaves[0], leaves[3], leaves[1], leaves[2], mask)
        loss = (y.float() * dy).sum() + ((s.float() * ds).sum() if s is not None else 0)
        used = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(loss, used, allow_unused=True)
        results[backend] = [y, s, *grads]
    for a, c in zip(*results.values()):
        if a is None:
            assert c is None
            continue
        assert a.dtype == c.dtype == BF
        torch.testing.assert_close(a.detach().float(), c.detach().float(), rtol=ULP, atol=1e-4, equal_nan=True)


def test_bf16_padded_rows_pass_the_residual_gradient_through():
    x, r, w, b, mask, _ = _inputs((3, 6, 24), 5)
    xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, s = F.add_layer_norm(xl, rl, 24, w, b, padding_mask=mask, prenorm=True)
    ds = torch.randn(s.shape).to(BF)
    dx, dr = torch.autograd.grad([y, s], [xl, rl], [torch.zeros_like(y), ds])
    assert torch.equal(dx[mask], ds[mask]) and torch.equal(dr[mask], ds[mask])


def test_bf16_rounding_is_torchs():
    """Narrowing float32 → bfloat16 in the kernel rounds exactly as torch's
    ``.to(torch.bfloat16)``: LayerNorm with the weight 1 and bias 0 of a row
    whose float32 result we know equals torch's float32 LayerNorm, rounded."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 512, generator=gen).to(BF)
    with seqnorm.use_backend("torch"):
        via_f32 = F.layer_norm(x.float(), 512)
    got = F.layer_norm(x, 512)
    # float32 results differ by a few float32 ulps between the two implementations, so a
    # value sitting on a rounding midpoint may go either way; everything else is the same bits
    assert (got != via_f32.to(BF)).float().mean() < 1e-3


def test_bf16_deterministic_for_any_thread_count():
    x, r, w, b, mask, dy = _inputs((8, 100, 96), 8)
    x = x.nan_to_num(0.0)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
        y, s = F.add_layer_norm(leaves[0], leaves[3], 96, leaves[1], leaves[2], padding_mask=mask, prenorm=True)
        outs = [y, s, *torch.autograd.grad(y, leaves, dy.to(BF))]
        xs, ws, bs = leaves[:3]
        for y in (F.seq_batch_norm(xs, None, None, ws, bs, training=True, padding_mask=mask),
                  F.power_norm(xs, torch.ones(96), None, ws, bs, training=True, padding_mask=mask)):
            outs += [y, *torch.autograd.grad(y, [xs, ws, bs], dy.to(BF))]
        return outs

    assert_same_bits_for_thread_counts(run)


def test_bf16_non_contiguous_input():
    x = torch.randn(6, 4, 24).to(BF).transpose(0, 1)
    with seqnorm.use_backend("torch"):
        expected = F.layer_norm(x, 24)
    torch.testing.assert_close(F.layer_norm(x, 24).float(), expected.float(), rtol=ULP, atol=1e-5)


def test_auto_routes_bf16_row_norms_to_the_kernels_and_fp16_to_torch():
    from seqnorm.fused import FusedBackend

    with seqnorm.use_backend("auto"):
        assert ops.current_backend(torch.empty(ops.AUTO_MIN_NUMEL, dtype=BF)) is FusedBackend
        assert ops.current_backend(torch.empty(ops.AUTO_MIN_NUMEL, dtype=torch.float16)) is ops.TorchBackend
        assert ops.current_backend(torch.empty(8, dtype=BF)) is ops.TorchBackend


FEATURE_SHAPES = [(2, 3, 17), (3, 5, 33), (4, 1, 16), (1, 40, 1000), (2, 0, 8), (6, 50, 1)]


@pytest.mark.parametrize("shape", FEATURE_SHAPES)
@pytest.mark.parametrize("op", ["batch", "batch_eval", "power"])
def test_bf16_feature_kernels_match_the_reference(op, shape, threads):
    x, _, w, b, mask, dy = _inputs(shape, hash((op, shape)) % 1000)
    if mask.numel():
        mask[0, 0] = False
        mask.view(-1)[-1] = False               # at least two real tokens
    x = torch.where(mask.unsqueeze(-1), x, x.nan_to_num(0.5))   # ... that are not poisoned
    d = shape[-1]
    gen = torch.Generator().manual_seed(1)
    running = (torch.randn(d, generator=gen), torch.rand(d, generator=gen) + 0.5)   # float32 buffers
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    g = dy.to(BF)
    xq, wq, bq, m, gq = to_np(x), to_np(w), to_np(b), mask.numpy(), to_np(g)
    if op == "power":
        phi, nu = running[1].clone(), running[0].clone() * 0.1
        phi0, nu0 = to_np(phi), to_np(nu)
        y = F.power_norm(xl, phi, nu, wl, bl, training=True, momentum=0.25, padding_mask=mask)
        ref_y, c = ref.power_norm_forward(xq, phi0, wq, bq, 1e-5, m)
        got = torch.autograd.grad(y, [xl, wl, bl], g)
        *want, new_nu = ref.power_norm_backward(gq, c, nu0, factor=0.25)
        if new_nu is None:                          # no real token: ν is left alone
            new_nu = nu0
        np.testing.assert_allclose(to_np(nu), new_nu, rtol=1e-5, atol=1e-6)      # ν kept in float32
    else:
        training = op == "batch"
        rm, rv = running
        y = F.seq_batch_norm(xl, rm, rv, wl, bl, training=training, momentum=0.0, padding_mask=mask)
        ref_y, c = ref.seq_batch_norm_forward(xq, wq, bq, 1e-5, m, to_np(rm), to_np(rv), training)
        got = torch.autograd.grad(y, [xl, wl, bl], g)
        want = ref.seq_batch_norm_backward(gq, c)
    assert y.dtype == BF
    _close_to_one_rounding(y, ref_y)
    assert torch.all(y[mask] == 0) and torch.all(got[0][mask] == 0)
    for gr, wa in zip(got, want):
        assert gr.dtype == BF
        _close_to_one_rounding(gr, wa)


@pytest.mark.parametrize("name", ["layer", "rms", "add", "batch", "power"])
def test_bf16_modules_agree_across_backends_including_running_statistics(name):
    """A module converted with ``.to(torch.bfloat16)`` (bfloat16 parameters and
    buffers) runs under the fused kernels and under torch alike: outputs,
    gradients and the running statistics it keeps."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 60, 48, generator=gen).to(BF)
    r = torch.randn(4, 60, 48, generator=gen).to(BF)
    mask = torch.rand(4, 60, generator=gen) < 0.3
    dy = torch.randn(4, 60, 48, generator=gen).to(BF)
    make = {"layer": lambda: seqnorm.LayerNorm(48), "rms": lambda: seqnorm.RMSNorm(48),
            "add": lambda: seqnorm.AddNorm(48), "batch": lambda: seqnorm.SeqBatchNorm(48),
            "power": lambda: seqnorm.PowerNorm(48)}[name]
    results = []
    for backend in ("fused", "torch"):
        torch.manual_seed(0)
        module = make().to(BF)
        xl = x.clone().requires_grad_()
        with seqnorm.use_backend(backend):
            y = module(xl, r, padding_mask=mask) if name == "add" else module(xl, padding_mask=mask)
            y = y[0] if isinstance(y, tuple) else y
            grads = torch.autograd.grad(y, [xl, *module.parameters()], dy)
        results.append([y, *grads, *(b.float() for b in module.buffers() if b.is_floating_point())])
    for a, c in zip(*results):
        torch.testing.assert_close(a.float(), c.float(), rtol=2 * ULP, atol=2e-2)
