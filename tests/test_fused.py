"""The fused CPU kernels (Numba) against the float64 reference: forward and
backward, edge shapes, padding, NaN/Inf, offsets, threads, determinism, compile."""

import numpy as np
import pytest
import torch

import seqnorm
from seqnorm import backends
from seqnorm import functional as F

from conftest import GRAD_ARGS, OPS, assert_same_bits_for_thread_counts, call_op, reference_op, to_np

pytest.importorskip("numba")

SHAPES = [(2, 3, 17), (3, 5, 33), (1, 1, 1), (4, 1, 16), (2, 7, 1), (1, 4, 1000), (0, 3, 8), (2, 0, 8)]
# (dtype, atol, rtol) against the float64 reference
TOLS = [(torch.float64, 1e-11, 1e-9), (torch.float32, 2e-5, 2e-5)]


pytestmark = pytest.mark.usefixtures("fused")


def _case(shape, seed, pad_rows=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2 + 0.5
    mask = rng.random(shape[:2]) < 0.3
    if pad_rows and shape[0] > 1:
        mask[-1] = True          # a fully padded sequence
    if mask.size:
        mask.flat[0] = False
    if mask.size > 1:
        mask.flat[1] = False     # keep two real tokens for BN
    x[mask] = np.nan             # poison the padding
    return rng, x, mask


def _compare(y, ref_y, atol, rtol):
    np.testing.assert_allclose(to_np(y), ref_y, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("op,training", [(op, True) for op in OPS] + [("masked_batch", False)],
                         ids=list(OPS) + ["masked_batch_eval"])
def test_fused_matches_reference(op, training, shape, dtype, atol, rtol, threads):
    rng, x_np, mask = _case(shape, hash((op, training, shape)) % 1000)
    d = shape[-1]
    w_np, b_np, r_np = rng.normal(size=d), rng.normal(size=d), rng.normal(size=shape)
    rm_np, rv_np = rng.normal(size=d), rng.random(d) + 0.5
    leaf = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in (("x", x_np), ("w", w_np),
                                                                          ("b", b_np), ("r", r_np))}
    x, w, b, r = leaf["x"], leaf["w"], leaf["b"], leaf["r"]
    m = torch.tensor(mask)
    if op == "masked_batch":
        running = (torch.tensor(rm_np, dtype=dtype), torch.tensor(rv_np, dtype=dtype))
        momentum = 0.0
    elif op == "power":   # ψ² and ν, both updated in place by training
        running = (torch.tensor(rv_np, dtype=dtype), torch.tensor(rng.normal(size=d) * 0.1, dtype=dtype))
        momentum = 0.25
    else:
        running, momentum = None, 0.1
    # the reference sees exactly the inputs the kernel sees, before any in-place update
    q = {k: to_np(t) for k, t in leaf.items()}
    ref_running = None if running is None else tuple(to_np(t) for t in running)
    dy = rng.normal(size=shape)
    if op == "masked_batch" and training and (~mask).sum() == 1:  # one token has no variance: an error
        with pytest.raises(ValueError, match="more than 1 real token"):
            call_op(op, x, w, b, m, r=r, training=True, running=running, momentum=momentum)
        return
    y, s = call_op(op, x, w, b, m, r=r, training=training, running=running, momentum=momentum)
    ref_y, backward = reference_op(op, q["x"], q["w"], q["b"], mask, r=q["r"], training=training,
                                   running=ref_running, momentum=momentum)
    _compare(y, ref_y, atol, rtol)
    assert torch.all(y[m] == 0)
    if s is not None:  # the sum in the input dtype
        np.testing.assert_array_equal(to_np(s)[~mask], to_np(x + r)[~mask])
    ref_grads = backward(dy)
    got = torch.autograd.grad(y, [leaf[k] for k in GRAD_ARGS[op]], torch.tensor(dy, dtype=dtype))
    for g, rg in zip(got, ref_grads):
        assert torch.isfinite(g).all()
        _compare(g, rg, atol * 10, rtol * 10)
    if op == "power" and ref_grads[-1] is not None:   # ν, moved by Algorithm 1 in the backward
        _compare(running[1], ref_grads[-1], atol * 10, rtol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_no_grad_path_equals_grad_path(dtype):
    """Without autograd the kernels run bare, and post-norm Add & Norm does not
    even write the sum out: the same bits either way."""
    torch.manual_seed(2)
    x, r = torch.randn(4, 8, 40).to(dtype), torch.randn(4, 8, 40).to(dtype)
    w, b = torch.randn(40).to(dtype), torch.randn(40).to(dtype)
    m = torch.rand(4, 8) < 0.3

    def outs(t):
        return [F.layer_norm(t, 40, w, b, padding_mask=m), F.add_rms_norm(t, r, 40, w, padding_mask=m),
                F.add_layer_norm(t, r, 40, w, b, padding_mask=m),
                *F.add_layer_norm(t, r, 40, w, b, padding_mask=m, prenorm=True),
                F.seq_batch_norm(t, None, None, w, b, training=True, padding_mask=m),
                F.power_norm(t, torch.ones(40), None, w, b, padding_mask=m)]

    with torch.no_grad():
        a = outs(x)
    c = outs(x.clone().requires_grad_())
    for u, v in zip(a, c):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_post_norm_gradients_equal_prenorm_gradients(dtype, center):
    """Post-norm Add & Norm with autograd (for 16-bit inputs the sum is not even
    written: the backward re-forms it from the addends) gives the bits of the
    prenorm form's output and gradients when no gradient flows into the sum."""
    gen = torch.Generator().manual_seed(21)
    x, r, dy = (torch.randn(5, 9, 40, generator=gen).to(dtype) for _ in range(3))
    w, b = torch.randn(40, generator=gen).to(dtype), torch.randn(40, generator=gen).to(dtype)
    m = torch.rand(5, 9, generator=gen) < 0.3
    add = F.add_layer_norm if center else F.add_rms_norm
    extra = {"bias": b} if center else {}
    results = []
    for prenorm in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, r, w, *extra.values())]
        kw = {"bias": leaves[3]} if center else {}
        y = add(leaves[0], leaves[1], 40, leaves[2], padding_mask=m, prenorm=prenorm, **kw)
        y = y[0] if prenorm else y
        results.append([y, *torch.autograd.grad(y, leaves, dy)])
    for u, v in zip(*results):
        assert torch.equal(u, v)


def test_non_contiguous_inputs_are_made_contiguous():
    x = torch.randn(6, 4, 24).transpose(0, 1)           # (4, 6, 24), not contiguous
    w = torch.randn(48)[::2]                              # strided weight
    m = torch.rand(4, 6) < 0.3
    with seqnorm.use_backend("torch"):
        expected = [F.layer_norm(x, 24, w, padding_mask=m),
                    F.seq_batch_norm(x, None, None, w, training=True, padding_mask=m)]
    got = [F.layer_norm(x, 24, w, padding_mask=m), F.seq_batch_norm(x, None, None, w, training=True, padding_mask=m)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_stay_in_their_row(dtype):
    x = torch.randn(3, 5, 32).to(dtype)
    x[0, 1, 7] = float("nan")
    x[2, 3, 0] = float("inf")
    bad = torch.zeros(3, 5, dtype=torch.bool)
    bad[0, 1] = bad[2, 3] = True
    r = torch.randn_like(x)
    for y in (F.layer_norm(x, 32), F.rms_norm(x, 32), F.add_layer_norm(x, r, 32), F.add_rms_norm(x, r, 32)):
        assert torch.isnan(y[bad]).all()          # the poisoned rows are NaN, as IEEE says
        assert torch.isfinite(y[~bad]).all()       # every other row is untouched
    with seqnorm.use_backend("torch"):
        clean = F.layer_norm(x, 32)
    assert torch.equal(torch.isfinite(clean), torch.isfinite(F.layer_norm(x, 32)))


@pytest.mark.parametrize("op", OPS)
def test_finite_rows_whose_squares_overflow_give_the_reference(op):
    """Rows like [1e30, -1e30, 0, 1]: Σx² overflows float32, yet the normalized row is
    finite (±√2); the fused kernels give the float64 reference's values and gradients
    (torch's own float32 LayerNorm gives 0 and RMSNorm NaN-free zeros here)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 8, generator=gen)
    x[0, 0, :4] = torch.tensor([1e30, -1e30, 0.0, 1.0])
    x[1, 1, 5] = -1e36
    if op not in ("masked_batch", "power"):
        x[1, 2] *= 3e37       # a whole row near float32's end (a feature-wise 1/σ that small is subnormal)
    dy = torch.randn(2, 3, 8, generator=gen)
    w, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 0] = True
    results = []
    for dtype in (torch.float32, torch.float64):
        xx = x.to(dtype).clone().requires_grad_()
        running = (torch.full((8,), 1e30, dtype=dtype), None) if op == "power" else None
        with seqnorm.use_backend("fused" if dtype == torch.float32 else "reference"):
            y, _ = call_op(op, xx, w.to(dtype), b.to(dtype), mask, r=torch.zeros_like(xx), eps=1e-5,
                           training=op != "power", running=running)
            y.backward(dy.to(dtype))
        results.append((y.detach().double(), xx.grad.double()))
    (y32, g32), (y64, g64) = results
    assert torch.isfinite(y32).all() and torch.isfinite(g32).all()
    assert (y32 - y64).abs().max() <= 1e-5 * y64.abs().max() + 1e-6
    scale = g64.abs().amax(-1, keepdim=True)           # gradients span 1e-37 … 1: compare row by row
    assert ((g32 - g64).abs() <= 1e-4 * scale + 1e-45).all()


def test_large_offset_float32():
    gen = torch.Generator().manual_seed(7)
    x = 1e4 + torch.randn(16, 64, 128, generator=gen)
    m = torch.rand(16, 64, generator=gen) < 0.2
    for fn in (lambda t: F.layer_norm(t, 128, padding_mask=m),
               lambda t: F.rms_norm(t, 128, padding_mask=m),
               lambda t: F.seq_batch_norm(t, None, None, training=True, padding_mask=m)):
        y32, y64 = fn(x), fn(x.double())
        assert (y32.double() - y64).abs().max() / y64.abs().max() < 1e-4


def test_deterministic_for_any_thread_count_and_run():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(8, 100, 96, generator=gen)
    w, b = torch.randn(96, generator=gen), torch.randn(96, generator=gen)
    m = torch.rand(8, 100, generator=gen) < 0.25
    dy = torch.randn(8, 100, 96, generator=gen)

    def run():
        xs = x.clone().requires_grad_()
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        outs = []
        for y in (F.layer_norm(xs, 96, ws, bs, padding_mask=m),
                  F.seq_batch_norm(xs, None, None, ws, bs, training=True, padding_mask=m),
                  F.power_norm(xs, torch.ones(96), None, ws, bs, training=True, padding_mask=m)):
            outs += [y.detach(), *torch.autograd.grad(y, [xs, ws, bs], dy)]
        return outs

    assert_same_bits_for_thread_counts(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_compile_sees_custom_ops(dtype):
    """Under torch.compile the fake implementations stand in for the kernels:
    their shapes and dtypes (float32 statistics for 16-bit inputs) must be right."""
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), seqnorm.LayerNorm(32)).to(dtype)
    bn = seqnorm.SeqBatchNorm(32).to(dtype)
    x = torch.randn(4, 16, 32).to(dtype)

    def f(t):
        return bn(model(t)).float().square().mean()

    eager = f(x)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=False)
    out = compiled(x)
    out.backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_auto_uses_fused_for_large_cpu_float_inputs():
    from seqnorm.backends.fused import FusedBackend
    from seqnorm.backends.torch import TorchBackend

    with seqnorm.use_backend("auto"):
        assert backends.current_backend(torch.empty(backends.AUTO_MIN_NUMEL)) is FusedBackend
        assert backends.current_backend(torch.empty(8)) is TorchBackend
        assert backends.current_backend(torch.empty(backends.AUTO_MIN_NUMEL, dtype=torch.int32)) is TorchBackend
