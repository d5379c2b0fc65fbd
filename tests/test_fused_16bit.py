"""The fused kernels on bfloat16 and float16 (``kernels/rows.py``): 16-bit in
and out, float32 inside. Checked against the float64 reference on the same
(16-bit) inputs — to one rounding — and against the torch backend, which casts
to float32 around torch's own ops: forward, backward, running statistics.

float16 runs on the kernels where the CPU converts it in hardware
(``rows.HALF_NATIVE``, F16C on x86-64) and on the cast path elsewhere; the same
assertions hold for both, and ``test_auto_routing`` checks which one ran."""

import numpy as np
import pytest
import torch

import seqnorm
from seqnorm import functional as F
from seqnorm import backends, kinds

from conftest import (GRAD_ARGS, ROWWISE_OPS, assert_same_bits_for_thread_counts, call_op, poisoned_case,
                      reference_op, to_np)

pytest.importorskip("numba")

from seqnorm.kernels import rows  # noqa: E402  (needs Numba)

BF = torch.bfloat16
# Twice the largest relative move of one rounding: bfloat16 keeps 8 significant bits
# (≤ 2^-8 of a value), float16 11 (≤ 2^-11).
ULPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
SHAPES = [(2, 3, 17), (3, 5, 33), (1, 1, 1), (4, 1, 16), (2, 7, 1), (1, 4, 1000), (0, 3, 8), (2, 0, 8)]


pytestmark = pytest.mark.usefixtures("fused")


@pytest.fixture(params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def dt(request):
    return request.param


def _reference(op, x, r, w, b, mask, dy):
    """Outputs and gradients (:data:`GRAD_ARGS` order) of the float64 reference on the 16-bit inputs."""
    y, backward = reference_op(op, to_np(x), to_np(w), to_np(b), mask.numpy(), r=to_np(r))
    return y, list(backward(to_np(dy.to(x.dtype))))


def _close_to_one_rounding(got, want):
    """``got`` (16-bit) is ``want`` (float64) rounded once, give or take float32
    noise — absolute, 1e-4 for these O(1) inputs: where a gradient cancels to ~0
    (RMSNorm of D = 1), float32 cannot resolve it any better, in any dtype."""
    np.testing.assert_allclose(to_np(got), want, rtol=ULPS[got.dtype], atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", ROWWISE_OPS)
def test_kernels_match_the_reference(op, shape, threads, dt):
    x, r, w, b, mask, dy = poisoned_case(shape, hash((op, shape)) % 1000, dt)
    leaf = {k: t.clone().requires_grad_() for k, t in (("x", x), ("w", w), ("b", b), ("r", r))}
    y, s = call_op(op, leaf["x"], leaf["w"], leaf["b"], mask, r=leaf["r"])
    assert y.dtype == dt and (s is None or s.dtype == dt)
    ref_y, ref_grads = _reference(op, x, r, w, b, mask, dy)
    _close_to_one_rounding(y, ref_y)
    assert torch.all(y[mask] == 0)
    if s is not None:
        real = ~mask
        want = x.float() + r.float()
        assert torch.equal(s[real], want.to(dt)[real])          # the float32 sum, rounded once
    got = torch.autograd.grad(y, [leaf[k] for k in GRAD_ARGS[op]], dy.to(dt))
    for g, want in zip(got, ref_grads):
        assert g.dtype == dt and torch.isfinite(g).all()
        _close_to_one_rounding(g, want)
    assert torch.all(got[0][mask] == 0)                          # no gradient reaches a pad


@pytest.mark.parametrize("op", ROWWISE_OPS)
def test_kernels_match_the_cast_path_forward_and_backward(op, dt):
    """The torch backend casts to float32 around torch's ops; the 16-bit kernels
    must agree with it to one rounding, including the gradient through the
    returned sum ``s`` (added before the rounding, and passed on at pads)."""
    x, r, w, b, mask, dy = poisoned_case((5, 40, 96), 3, dt)
    ds = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    results = {}
    for backend in ("fused", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
        with seqnorm.use_backend(backend):
            y, s = call_op(op, leaves[0], leaves[1], leaves[2], mask, r=leaves[3])
        loss = (y.float() * dy).sum() + ((s.float() * ds).sum() if s is not None else 0)
        used = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(loss, used, allow_unused=True)
        results[backend] = [y, s, *grads]
    for a, c in zip(*results.values()):
        if a is None:
            assert c is None
            continue
        assert a.dtype == c.dtype == dt
        torch.testing.assert_close(a.detach().float(), c.detach().float(), rtol=ULPS[dt], atol=1e-4, equal_nan=True)


def test_padded_rows_pass_the_residual_gradient_through(dt):
    x, r, w, b, mask, _ = poisoned_case((3, 6, 24), 5, dt)
    xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, s = F.add_layer_norm(xl, rl, 24, w, b, padding_mask=mask, prenorm=True)
    ds = torch.randn(s.shape).to(dt)
    dx, dr = torch.autograd.grad([y, s], [xl, rl], [torch.zeros_like(y), ds])
    assert torch.equal(dx[mask], ds[mask]) and torch.equal(dr[mask], ds[mask])


def test_rounding_is_torchs(dt):
    """Narrowing float32 → 16 bits in the kernel rounds exactly as torch's
    ``.to(dtype)``: LayerNorm with the weight 1 and bias 0 of a row
    whose float32 result we know equals torch's float32 LayerNorm, rounded."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 512, generator=gen).to(dt)
    with seqnorm.use_backend("torch"):
        via_f32 = F.layer_norm(x.float(), 512)
    got = F.layer_norm(x, 512)
    # float32 results differ by a few float32 ulps between the two implementations, so a
    # value sitting on a rounding midpoint may go either way; everything else is the same bits
    assert (got != via_f32.to(dt)).float().mean() < 1e-3


def test_deterministic_for_any_thread_count(dt):
    x, r, w, b, mask, dy = poisoned_case((8, 100, 96), 8, dt)
    x = x.nan_to_num(0.0)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
        y, s = F.add_layer_norm(leaves[0], leaves[3], 96, leaves[1], leaves[2], padding_mask=mask, prenorm=True)
        outs = [y, s, *torch.autograd.grad(y, leaves, dy.to(dt))]
        xs, ws, bs = leaves[:3]
        for y in (F.seq_batch_norm(xs, None, None, ws, bs, training=True, padding_mask=mask),
                  F.power_norm(xs, torch.ones(96), None, ws, bs, training=True, padding_mask=mask)):
            outs += [y, *torch.autograd.grad(y, [xs, ws, bs], dy.to(dt))]
        return outs

    assert_same_bits_for_thread_counts(run)


def test_non_contiguous_input(dt):
    x = torch.randn(6, 4, 24).to(dt).transpose(0, 1)
    with seqnorm.use_backend("torch"):
        expected = F.layer_norm(x, 24)
    torch.testing.assert_close(F.layer_norm(x, 24).float(), expected.float(), rtol=ULPS[dt], atol=1e-5)


def test_auto_routing():
    """bfloat16 always goes to the kernels; float16 where the CPU converts it in
    hardware (else to torch, after functional's cast); small tensors to torch."""
    from seqnorm.backends.fused import FusedBackend
    from seqnorm.backends.torch import TorchBackend

    with seqnorm.use_backend("auto"):
        assert backends.current_backend(torch.empty(backends.AUTO_MIN_NUMEL, dtype=BF)) is FusedBackend
        half = backends.current_backend(torch.empty(backends.AUTO_MIN_NUMEL, dtype=torch.float16))
        assert half is (FusedBackend if rows.HALF_NATIVE else TorchBackend)
        assert backends.current_backend(torch.empty(8, dtype=BF)) is TorchBackend
        assert backends.current_backend(torch.empty(8, dtype=torch.float16)) is TorchBackend
    assert (torch.float16 in FusedBackend.native_low_precision) is rows.HALF_NATIVE


@pytest.mark.skipif(not rows.HALF_NATIVE,
                    reason="float16 takes the cast path on a CPU without hardware conversions")
def test_float16_conversions_are_exact_and_round_like_torch():
    """The kernels' float16 row I/O: widening every one of the 65,536 bit patterns
    gives NumPy's float32 value (NaN stays NaN); narrowing rounds as torch's
    ``.half()`` — midpoints to even, overflow to ±Inf, subnormals, signed zeros."""
    import numba

    @numba.njit
    def widen(a, out):
        buf = rows.scratch(a, a.shape[1])
        for i in range(a.shape[0]):
            out[i] = rows.in_row(a, i, buf)

    @numba.njit
    def narrow(f, a):
        buf = rows.scratch(a, a.shape[1])
        for i in range(a.shape[0]):
            row = rows.out_row(a, i, buf)
            row[:] = f[i]
            rows.commit(a, i, buf)

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16).reshape(256, 256)
    got = np.empty(every.shape, np.float32)
    widen(every, got)
    want = every.view(np.float16).astype(np.float32)
    assert np.array_equal(got, want, equal_nan=True)

    gen = np.random.default_rng(0)
    lo = gen.integers(0, 0x7BFF, 4096).astype(np.uint16)              # finite float16 values...
    mid = (lo.view(np.float16).astype(np.float64) + (lo + 1).view(np.float16).astype(np.float64)) / 2
    special = [65504, 65519.996, 65520, 1e9, np.inf, -np.inf, 0.0, -0.0, 2.0 ** -24, 2.0 ** -25,
               1.5 * 2.0 ** -25, 2.0 ** -26, 6.1e-5, -3e-6]
    f = np.concatenate([mid, -mid, gen.standard_normal(4096) * 10.0 ** gen.integers(-8, 6, 4096),
                        special]).astype(np.float32)                     # ... and the midpoints between them
    f = np.resize(f, (len(f) // 64 + 1) * 64).reshape(-1, 64)
    bits = np.empty(f.shape, np.int16)
    narrow(f, bits)
    assert np.array_equal(bits, torch.from_numpy(f).half().view(torch.int16).numpy())


FEATURE_SHAPES = [(2, 3, 17), (3, 5, 33), (4, 1, 16), (1, 40, 1000), (2, 0, 8), (6, 50, 1)]


@pytest.mark.parametrize("shape", FEATURE_SHAPES)
@pytest.mark.parametrize("op,training", [("masked_batch", True), ("masked_batch", False), ("power", True)],
                         ids=["masked_batch", "masked_batch_eval", "power"])
def test_feature_kernels_match_the_reference(op, training, shape, threads, dt):
    x, _, w, b, mask, dy = poisoned_case(shape, hash((op, training, shape)) % 1000, dt)
    if mask.numel():
        mask[0, 0] = False
        mask.view(-1)[-1] = False               # at least two real tokens
    x = torch.where(mask.unsqueeze(-1), x, x.nan_to_num(0.5))   # ... that are not poisoned
    d = shape[-1]
    gen = torch.Generator().manual_seed(1)
    rm, rv = torch.randn(d, generator=gen), torch.rand(d, generator=gen) + 0.5   # float32 buffers
    running = (rv.clone(), rm.clone() * 0.1) if op == "power" else (rm, rv)     # (ψ², ν) or (mean, var)
    momentum = 0.25 if op == "power" else 0.0
    ref_running = tuple(to_np(t) for t in running)                              # before training moves them
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    g = dy.to(dt)
    y, _ = call_op(op, xl, wl, bl, mask, training=training, running=running, momentum=momentum)
    ref_y, backward = reference_op(op, to_np(x), to_np(w), to_np(b), mask.numpy(), training=training,
                                   running=ref_running, momentum=momentum)
    got = torch.autograd.grad(y, [xl, wl, bl], g)
    want = backward(to_np(g))
    if op == "power":
        new_nu = want[-1] if want[-1] is not None else ref_running[1]   # no real token: ν is left alone
        np.testing.assert_allclose(to_np(running[1]), new_nu, rtol=1e-5, atol=1e-6)      # ν kept in float32
    assert y.dtype == dt
    _close_to_one_rounding(y, ref_y)
    assert torch.all(y[mask] == 0) and torch.all(got[0][mask] == 0)
    for gr, wa in zip(got, want):
        assert gr.dtype == dt
        _close_to_one_rounding(gr, wa)


@pytest.mark.parametrize("name", ["layer", "rms", "add_layer", "masked_batch", "power"])
def test_modules_agree_across_backends_including_running_statistics(name, dt):
    """A module converted with ``.to(dtype)`` (16-bit parameters and
    buffers) runs under the fused kernels and under torch alike: outputs,
    gradients and the running statistics it keeps."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 60, 48, generator=gen).to(dt)
    r = torch.randn(4, 60, 48, generator=gen).to(dt)
    mask = torch.rand(4, 60, generator=gen) < 0.3
    dy = torch.randn(4, 60, 48, generator=gen).to(dt)
    results = []
    for backend in ("fused", "torch"):
        torch.manual_seed(0)
        module = kinds.build(name, 48).to(dt)
        xl = x.clone().requires_grad_()
        with seqnorm.use_backend(backend):
            y = module(xl, r, padding_mask=mask) if name == "add_layer" else module(xl, padding_mask=mask)
            y = y[0] if isinstance(y, tuple) else y
            grads = torch.autograd.grad(y, [xl, *module.parameters()], dy)
        results.append([y, *grads, *(b.float() for b in module.buffers() if b.is_floating_point())])
    for a, c in zip(*results):
        torch.testing.assert_close(a.float(), c.float(), rtol=2 * ULPS[dt], atol=2e-2)
