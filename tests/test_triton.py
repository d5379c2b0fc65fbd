"""The triton backend's kernels, checked against the float64 reference.

CI has no GPU: there Triton's interpreter (``TRITON_INTERPRET=1``) runs the
same kernels on CPU tensors, and ``use_backend("triton")`` takes them. On a
CUDA machine the tests run on the GPU instead. Shapes are small and awkward
(D = 1, 17, 1000; one token; an all-padding sequence; zero-size), inputs in
float32, bfloat16 and float16, every gradient, running statistics and ν.

The interpreter narrows float32 to bfloat16 by truncation (a GPU rounds to
nearest), so bfloat16 results are allowed two units in the last place here.
"""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import seqnorm  # noqa: E402
from seqnorm import backends  # noqa: E402
from seqnorm import functional as F  # noqa: E402

from conftest import GRAD_ARGS, OPS, call_op, poisoned_case, reference_op, to_np  # noqa: E402

from seqnorm.backends.triton import MAX_FEATURES, TritonBackend, supports  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

SHAPES = [(2, 3, 17), (1, 1, 1), (3, 5, 1), (2, 4, 1000), (0, 3, 8), (2, 0, 8), (4, 7, 33)]
# (dtype, rtol): float32 against the reference; 16-bit: the reference rounded once (bf16: twice, see above)
TOLS = [(torch.float32, 2e-5), (torch.bfloat16, 2.0 ** -6), (torch.float16, 2.0 ** -10)]
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


@pytest.fixture(autouse=True)
def triton_backend():
    with seqnorm.use_backend("triton"):
        yield


def _close(got, want, dtype, scale=1.0):
    np.testing.assert_allclose(to_np(got), want, rtol=dict(TOLS)[dtype] * scale, atol=ATOL[dtype] * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [t for t, _ in TOLS], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("op,training", [(op, True) for op in OPS] + [("masked_batch", False)],
                         ids=list(OPS) + ["masked_batch_eval"])
def test_kernels_match_the_reference(op, training, shape, dtype):
    x, r, w, b, mask, dy = poisoned_case(shape, hash((op, shape)) % 1000, dtype, two_real=True)
    d = shape[-1]
    leaf = {k: t.to(DEVICE).clone().requires_grad_() for k, t in (("x", x), ("r", r), ("w", w), ("b", b))}
    m = mask.to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    if op == "masked_batch":
        running, momentum = (torch.randn(d, generator=gen), torch.rand(d, generator=gen) + 0.5), 0.3
    elif op == "power":   # (ψ², ν), float32 buffers, both moved by training
        running, momentum = (torch.rand(d, generator=gen) + 0.5, torch.randn(d, generator=gen) * 0.1), 0.25
    else:
        running, momentum = None, 0.1
    ref_running = None if running is None else tuple(to_np(t) for t in running)
    if running is not None:
        running = tuple(t.to(DEVICE) for t in running)
    q = {k: to_np(t) for k, t in leaf.items()}
    if op == "masked_batch" and training and int((~mask).sum()) == 1:   # no variance: an error, as in torch
        with pytest.raises(ValueError, match="more than 1 real token"):
            call_op(op, leaf["x"], leaf["w"], leaf["b"], m, training=True, running=running)
        return
    y, s = call_op(op, leaf["x"], leaf["w"], leaf["b"], m, r=leaf["r"], training=training, running=running,
                   momentum=momentum)
    ref_y, backward = reference_op(op, q["x"], q["w"], q["b"], mask.numpy(), r=q["r"], training=training,
                                   running=ref_running, momentum=momentum)
    assert y.dtype == dtype and y.device.type == DEVICE
    _close(y, ref_y, dtype)
    assert torch.all(y[m] == 0)
    if s is not None:   # the sum, rounded once, at every position (padding included)
        want = (x.float() + r.float()).to(dtype)
        _close(s, to_np(want).astype(np.float64), dtype)
    ref_grads = backward(to_np(dy.to(dtype)))
    got = torch.autograd.grad(y, [leaf[k] for k in GRAD_ARGS[op]], dy.to(DEVICE, dtype))
    for g, rg in zip(got, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        _close(g, rg, dtype, scale=10 * max(1.0, float(np.abs(rg).max(initial=0)) ** 0.5))
    assert torch.all(got[0][m] == 0)                       # no gradient reaches a pad
    if op == "masked_batch" and training and int((~mask).sum()) > 1:
        real = q["x"][~mask.numpy()]
        n = real.shape[0]
        want_mean = (1 - momentum) * ref_running[0] + momentum * real.mean(0)
        want_var = (1 - momentum) * ref_running[1] + momentum * real.var(0) * n / (n - 1)
        np.testing.assert_allclose(to_np(running[0]), want_mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(to_np(running[1]), want_var, rtol=1e-4, atol=1e-4)
    if op == "power" and ref_grads[-1] is not None:        # ν, moved by Algorithm 1 in the backward
        np.testing.assert_allclose(to_np(running[1]), ref_grads[-1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("op", ["layer", "rms", "add_layer", "masked_batch"])
def test_large_offsets_keep_float32_accuracy(op):
    gen = torch.Generator().manual_seed(7)
    x = 1e4 + torch.randn(4, 9, 40, generator=gen)
    mask = torch.rand(4, 9, generator=gen) < 0.2
    mask[0, :2] = False
    y, _ = call_op(op, x.to(DEVICE), None, None, mask.to(DEVICE), r=torch.zeros_like(x).to(DEVICE))
    ref_y, _ = reference_op(op, x.double().numpy(), None, None, mask.numpy(), r=np.zeros(x.shape))
    assert np.abs(to_np(y) - ref_y).max() / np.abs(ref_y).max() < 1e-4


@pytest.mark.parametrize("op", ["layer", "rms", "add_layer", "add_rms"])
def test_finite_rows_whose_squares_overflow_stay_finite(op):
    x = torch.randn(3, 8)
    x[0, :4] = torch.tensor([1e30, -1e30, 0.0, 1.0])
    x[2] *= 1e25
    y, _ = call_op(op, x.to(DEVICE), None, None, None, r=torch.zeros_like(x).to(DEVICE))
    ref_y, _ = reference_op(op, x.double().numpy(), None, None, None, r=np.zeros(x.shape))
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(to_np(y), ref_y, rtol=1e-5, atol=1e-5)


def test_nan_and_inf_stay_in_their_row():
    x = torch.randn(4, 16)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    y = F.layer_norm(x.to(DEVICE), 16)
    bad = torch.tensor([False, True, True, False])
    assert torch.isnan(y[bad.to(DEVICE)]).all() and torch.isfinite(y[~bad.to(DEVICE)]).all()


def test_same_bits_on_every_run():
    x, r, w, b, mask, dy = poisoned_case((5, 13, 48), 3, torch.float32, two_real=True)
    m = mask.to(DEVICE)

    def run():
        leaf = [t.to(DEVICE).clone().requires_grad_() for t in (x, w, b)]
        outs = []
        for op in ("layer", "add_rms", "masked_batch", "power"):
            running = (torch.ones(48, device=DEVICE), torch.zeros(48, device=DEVICE)) if op == "power" else None
            y, _ = call_op(op, *leaf, m, r=r.to(DEVICE), running=running)
            outs += [y, *torch.autograd.grad(y, [t for t in leaf if op != "add_rms" or t is not leaf[2]],
                                             dy.to(DEVICE))]
        return outs

    first, second = run(), run()
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_strided_rows_and_non_contiguous_input():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 10, 40, generator=gen)
    for x in (base[:, ::2], base.transpose(0, 1), base[..., :33]):
        with seqnorm.use_backend("torch"):
            want = F.layer_norm(x, x.shape[-1]), F.seq_batch_norm(x.contiguous(), None, None, training=True)
        got = F.layer_norm(x.to(DEVICE), x.shape[-1]), F.seq_batch_norm(x.to(DEVICE), None, None, training=True)
        for g, w_ in zip(got, want):
            torch.testing.assert_close(g.cpu(), w_, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["masked_batch", "power", "layer", "add_layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_modules_agree_with_the_torch_backend_buffers_included(kind, dtype):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3, 11, 24, generator=gen).to(dtype)
    mask = torch.rand(3, 11, generator=gen) < 0.3
    mask[0, :2] = False
    dy = torch.randn(3, 11, 24, generator=gen).to(dtype)
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        module = seqnorm.kinds.build(kind, 24).to(DEVICE, dtype).train()
        xl = x.to(DEVICE).clone().requires_grad_()
        with seqnorm.use_backend(backend):
            for _ in range(2):   # two steps: the running statistics move twice
                y = module(xl, xl, padding_mask=mask.to(DEVICE)) if kind == "add_layer" else \
                    module(xl, padding_mask=mask.to(DEVICE))
                grads = torch.autograd.grad(y, [xl, *module.parameters()], dy.to(DEVICE))
        results.append([y, *grads, *(t.float() for t in module.buffers() if t.is_floating_point())])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for a, c in zip(*results):
        torch.testing.assert_close(a.float().cpu(), c.float().cpu(), **tol)


def test_routing():
    assert backends.current_backend(torch.empty(4, 8, device=DEVICE)) is TritonBackend
    assert backends.current_backend(torch.empty(4, 8, dtype=torch.float64, device=DEVICE)) is not TritonBackend
    assert supports(torch.empty(1, MAX_FEATURES, device=DEVICE))                 # 65,536 features: ours
    assert not supports(torch.empty(1, MAX_FEATURES + 1, device=DEVICE))         # wider: torch's
    assert backends.current_backend(torch.empty(1, MAX_FEATURES + 1, device=DEVICE)) is not TritonBackend
    with seqnorm.use_backend("auto"):
        chosen = backends.current_backend(torch.empty(backends.AUTO_MIN_NUMEL, device=DEVICE))
        assert (chosen is TritonBackend) == (DEVICE == "cuda")    # auto: Triton on CUDA only


def test_gpu_bench_dry_run_on_this_device(capsys):
    """`seqnorm bench --device cuda`'s code path (masked Triton kernels against torch
    native, the composite path and gather; every provider checked against seqnorm
    before timing), run here on tiny shapes — through the interpreter without a GPU."""
    from seqnorm.commands import bench as B

    rows = B.bench([(2, 8, 16)], ["fp32", "bf16"], B.OPS, ["fwd", "fwd+bwd"], budget_s=0.0, device=DEVICE,
                   gpu_style=True, min_reps=1)
    got = {(r.op, r.dtype, r.mode, r.provider) for r in rows}
    for op in B.OPS:
        for dt in ("fp32", "bf16"):
            for mode in ("fwd", "fwd+bwd"):
                assert (op, dt, mode, "seqnorm") in got and (op, dt, mode, "seqnorm[torch]") in got
    assert ("seq_batch_norm", "fp32", "fwd", "gather") in got and ("layer_norm", "fp32", "fwd", "torch") in got
    assert all(r.ms > 0 and (r.pct_copy is None or r.pct_copy > 0) for r in rows)
    assert "layer_norm" in capsys.readouterr().out


def test_the_widest_row_65536_features():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, MAX_FEATURES, generator=gen) * 3 + 100
    dy = torch.randn(2, MAX_FEATURES, generator=gen)
    xl = x.to(DEVICE).clone().requires_grad_()
    y, _ = call_op("layer", xl, None, None, None)
    (dx,) = torch.autograd.grad(y, [xl], dy.to(DEVICE))
    ref_y, backward = reference_op("layer", x.double().numpy(), None, None, None)
    np.testing.assert_allclose(to_np(y), ref_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_np(dx), backward(dy.double().numpy())[0], rtol=1e-3, atol=1e-4)
