"""Masked GroupNorm / InstanceNorm: reference, functional on every backend, modules.

The float64 reference (``seqnorm.reference.group_norm_*``) is checked against
finite differences and against torch's own GroupNorm without padding; every
backend is then checked against the reference with padding (NaN in the pads,
an all-padding sequence), in every dtype.
"""

import numpy as np
import pytest
import torch

import seqnorm
from seqnorm import functional as F
from seqnorm import reference as R

from conftest import BACKENDS, to_np, to_t

# (dtype, atol, rtol) against the float64 reference of the same (rounded) input
TOLERANCES = [
    (torch.float64, 1e-12, 1e-12),
    (torch.float32, 2e-5, 1e-5),
    (torch.bfloat16, 2e-2, 1e-2),
    (torch.float16, 4e-3, 2e-3),
]
#: (B, C, T, groups): odd sizes, one step, one channel per group, one group
SHAPES = [(2, 6, 17, 3), (1, 1, 1, 1), (3, 4, 5, 4), (2, 8, 33, 1), (4, 6, 9, 2)]


def _case(shape, seed, dtype=torch.float64, poison=True):
    b, c, t, g = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, c, t)) * 2 + 0.5
    lengths = rng.integers(1, t + 1, size=b)
    if b > 2:
        lengths[1] = 0                                       # an all-padding sequence
    mask = np.arange(t)[None, :] >= lengths[:, None]
    w, bias = rng.normal(size=c), rng.normal(size=c)
    dy = rng.normal(size=(b, c, t))
    xt = to_t(x, dtype)
    if poison:
        xt = xt.masked_fill(torch.as_tensor(mask).unsqueeze(1), float("nan"))
    return xt, to_t(w), to_t(bias), torch.as_tensor(mask), to_t(dy)


def test_reference_backward_matches_finite_differences():
    x, w, b, mask, dy = _case((2, 4, 6, 2), 0, poison=False)
    x, w, b, dy, mask = to_np(x), to_np(w), to_np(b), to_np(dy), mask.numpy()

    def loss(x_, w_, b_):
        return float((R.group_norm_forward(x_, 2, w_, b_, 1e-5, mask)[0] * dy).sum())

    _, cache = R.group_norm_forward(x, 2, w, b, 1e-5, mask)
    dx, dw, db = R.group_norm_backward(dy, cache)
    h = 1e-6
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = loss(x, w, b)
            arr[i] = old - h
            down = loss(x, w, b)
            arr[i] = old
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, num, atol=1e-7, rtol=1e-6)
    assert np.all(dx[..., 4:][np.broadcast_to(mask[:, None, :], dx.shape)[..., 4:]] == 0)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != (1, 1, 1, 1)])   # torch refuses one value
def test_reference_is_torch_group_norm_without_padding(shape):
    x, w, b, _, dy = _case(shape, 1, poison=False)
    g = shape[3]
    xt, wt, bt = (t.clone().requires_grad_() for t in (x, w, b))
    yt = torch.nn.functional.group_norm(xt, g, wt, bt, 1e-5)
    yt.backward(dy)
    y, cache = R.group_norm_forward(to_np(x), g, to_np(w), to_np(b), 1e-5)
    dx, dw, db = R.group_norm_backward(to_np(dy), cache)
    for mine, theirs in ((y, yt), (dx, xt.grad), (dw, wt.grad), (db, bt.grad)):
        np.testing.assert_allclose(mine, to_np(theirs), atol=1e-11, rtol=1e-10)


# float64 runs on the torch backend under fused and triton (their kernels are float32 inside)
BACKEND_DTYPES = [(name, *tol) for name in BACKENDS for tol in TOLERANCES
                  if not (tol[0] == torch.float64 and name in ("fused", "triton"))]


@pytest.mark.parametrize("backend_name,dtype,atol,rtol", BACKEND_DTYPES,
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_backend_matches_the_reference_with_padding(backend_name, dtype, atol, rtol, shape):
    x, w, b, mask, dy = _case(shape, 2, dtype)
    g = shape[3]
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    with seqnorm.use_backend(backend_name):
        y = F.group_norm(xg, g, wg, bg, 1e-5, padding_mask=mask)
        y.backward(dy.to(dtype))
    ref_y, cache = R.group_norm_forward(to_np(x), g, to_np(w), to_np(b), 1e-5, mask.numpy())
    ref_dx, ref_dw, ref_db = R.group_norm_backward(to_np(dy.to(dtype)), cache)
    assert y.dtype == dtype and xg.grad.dtype == dtype
    pads = mask.unsqueeze(1).expand_as(y)
    assert torch.all(y[pads] == 0) and torch.all(xg.grad[pads] == 0)   # exact zeros, no NaN leak
    scale = max(1.0, float(np.abs(ref_dw).max()), float(np.abs(ref_db).max()))
    np.testing.assert_allclose(to_np(y), ref_y, atol=atol, rtol=rtol)
    np.testing.assert_allclose(to_np(xg.grad), ref_dx, atol=atol * 5, rtol=rtol * 5)
    np.testing.assert_allclose(to_np(wg.grad), ref_dw, atol=atol * 5 * scale, rtol=rtol * 5)
    np.testing.assert_allclose(to_np(bg.grad), ref_db, atol=atol * 5 * scale, rtol=rtol * 5)


def test_gradcheck_with_padding():
    x, w, b, mask, _ = _case((3, 4, 5, 2), 3, poison=False)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: F.group_norm(x_, 2, w_, b_, padding_mask=mask),
                                    (x, w, b))
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: F.instance_norm(x_, rm.clone(), rv.clone(), w_, b_, padding_mask=mask), (x, w, b))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_batched_equals_alone_and_padding_never_matters(backend_name):
    """The note's property for a time-pooling norm: an utterance's output is
    the same alone, batched with a longer one, and with more (garbage) padding."""
    rng = np.random.default_rng(4)
    long, short = to_t(rng.normal(size=(1, 6, 40)), torch.float32), to_t(rng.normal(size=(1, 6, 23)),
                                                                          torch.float32)
    gn = seqnorm.GroupNorm(2, 6)
    with seqnorm.use_backend(backend_name), torch.no_grad():
        alone = gn(short)
        for extra, fill in ((17, 0.0), (50, 1e4), (50, float("nan"))):
            batch = torch.full((2, 6, 23 + extra), fill)
            batch[0, :, :40] = long[0] if 23 + extra >= 40 else long[0, :, :23 + extra]
            batch[1, :, :23] = short[0]
            batched = gn(batch, lengths=torch.tensor([min(40, 23 + extra), 23]))
            torch.testing.assert_close(batched[1, :, :23], alone[0], atol=2e-6, rtol=1e-5)
            assert torch.all(batched[1, :, 23:] == 0)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_large_offsets_and_finite_extremes(backend_name):
    rng = np.random.default_rng(5)
    x = to_t(1e4 + rng.normal(size=(2, 4, 50)), torch.float32)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 30:] = True
    with seqnorm.use_backend(backend_name):
        y = F.group_norm(x, 2, padding_mask=mask)
    ref, _ = R.group_norm_forward(to_np(x), 2, padding_mask=mask.numpy())
    np.testing.assert_allclose(to_np(y), ref, atol=2e-3, rtol=1e-3)   # 1e4 in float32: ulp 1e-3
    huge = torch.tensor([[[1e30, -1e30, 0.0, 1.0], [3e29, -2e30, 5.0, 0.0]]])
    with seqnorm.use_backend(backend_name):
        y = F.group_norm(huge, 1, lengths=torch.tensor([3]))
    ref, _ = R.group_norm_forward(to_np(huge), 1, padding_mask=np.array([[False, False, False, True]]))
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(to_np(y), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 5), (2, 4, 0), (2, 0, 5)])
def test_zero_size(backend_name, shape):
    x = torch.randn(shape, requires_grad=True)
    groups = 2 if shape[1] else 1
    with seqnorm.use_backend(backend_name):
        y = F.group_norm(x, groups, lengths=torch.zeros(shape[0], dtype=torch.long))
        y.sum().backward()
    assert y.shape == shape and x.grad.shape == shape


def test_errors_name_the_argument():
    x = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match="num_groups must be a positive int dividing the 6 channels"):
        F.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(N, L\) = \(2, 5\)"):
        F.group_norm(x, 3, padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        F.group_norm(x, 3, torch.ones(3))
    with pytest.raises(ValueError, match=r"need input of shape \(N, C, L\)"):
        F.group_norm(torch.randn(2, 6, 5, 5), 3, lengths=torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="expects 6 channels"):
        seqnorm.GroupNorm(3, 6)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="expects 4 channels"):
        seqnorm.InstanceNorm1d(4)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
        F.instance_norm(x, lengths=torch.tensor([6, 2]))
    with pytest.raises(ValueError, match="use_input_stats=False"):
        F.instance_norm(x, use_input_stats=False)


def test_group_norm_module_is_torch_without_padding_and_shares_state_dicts():
    torch.manual_seed(0)
    theirs = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    mine = seqnorm.GroupNorm(4, 8)
    mine.load_state_dict(theirs.state_dict())
    assert isinstance(mine, torch.nn.GroupNorm)
    assert theirs.load_state_dict(mine.state_dict()) is not None
    x = torch.randn(3, 8, 20)
    for x_in in (x, torch.randn(3, 8, 4, 5)):                    # (N, C, *) as torch
        a, b = x_in.clone().requires_grad_(), x_in.clone().requires_grad_()
        ya, yb = mine(a), theirs(b)
        ya.backward(torch.ones_like(ya) * 0.3 + ya.detach())
        yb.backward(torch.ones_like(yb) * 0.3 + yb.detach())
        torch.testing.assert_close(ya, yb, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-5)


def test_channels_last_and_the_padding_context():
    gn = seqnorm.GroupNorm(2, 6)
    gn_last = seqnorm.GroupNorm(2, 6, channels_last=True)
    gn_last.load_state_dict(gn.state_dict())
    x = torch.randn(2, 6, 9)
    lengths = torch.tensor([9, 4])
    expected = gn(x, lengths=lengths)
    torch.testing.assert_close(gn_last(x.transpose(1, 2), lengths=lengths), expected.transpose(1, 2))
    with seqnorm.padding(lengths=lengths):
        torch.testing.assert_close(gn(x), expected)
        torch.testing.assert_close(seqnorm.InstanceNorm1d(6)(x), F.instance_norm(x, lengths=lengths))


def test_instance_norm_module_is_torch_without_padding_over_train_and_eval():
    torch.manual_seed(1)
    theirs = torch.nn.InstanceNorm1d(5, affine=True, track_running_stats=True, momentum=0.3)
    mine = seqnorm.InstanceNorm1d(5, affine=True, track_running_stats=True, momentum=0.3)
    mine.load_state_dict(theirs.state_dict())
    for step in range(2):
        x = torch.randn(4, 5, 12) * 3 + step
        torch.testing.assert_close(mine(x), theirs(x))
    for name, buf in theirs.named_buffers():
        torch.testing.assert_close(getattr(mine, name), buf)
    mine.eval(), theirs.eval()
    x = torch.randn(2, 5, 7)
    torch.testing.assert_close(mine(x), theirs(x))
    torch.testing.assert_close(mine(x[0]), theirs(x[0]))            # unbatched (C, L)


def test_instance_norm_running_statistics_see_real_steps_only():
    """Padded: the running statistics move to the average over sequences with
    ≥ 2 real steps of their real-step mean and unbiased variance; eval zeroes pads."""
    rng = np.random.default_rng(6)
    x = to_t(rng.normal(size=(3, 2, 8)) * 2 + 1, torch.float32)
    lengths = torch.tensor([8, 5, 1])                      # the third takes no part (one real step)
    x_pad = x.clone()
    x_pad[1, :, 5:] = 1e6
    x_pad[2, :, 1:] = float("nan")
    rm, rv = torch.zeros(2), torch.ones(2)
    F.instance_norm(x_pad, rm, rv, momentum=1.0, lengths=lengths)
    means = torch.stack([x[0].mean(1), x[1, :, :5].mean(1)])
    variances = torch.stack([x[0].var(1), x[1, :, :5].var(1)])       # unbiased, as torch stores
    torch.testing.assert_close(rm, means.mean(0))
    torch.testing.assert_close(rv, variances.mean(0))
    before = (rm.clone(), rv.clone())
    F.instance_norm(x_pad[2:], rm, rv, momentum=1.0, lengths=lengths[2:])   # nobody with 2 steps
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    y = F.instance_norm(x_pad, rm, rv, use_input_stats=False, lengths=lengths)
    expected = (x - rm[:, None]) / torch.sqrt(rv[:, None] + 1e-5)
    torch.testing.assert_close(y[0], expected[0])
    assert torch.all(y[1, :, 5:] == 0) and torch.all(y[2, :, 1:] == 0)


@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b in ("fused", "triton")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_give_the_same_bits_on_every_run_and_thread_count(backend_name, dtype):
    from conftest import assert_same_bits_for_thread_counts

    x, w, b, mask, dy = _case((3, 8, 45, 4), 7, dtype)

    def run():
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with seqnorm.use_backend(backend_name):
            y = F.group_norm(xg, 4, wg, b, padding_mask=mask)
            y.backward(dy.to(dtype))
        return [y, xg.grad, wg.grad]

    assert_same_bits_for_thread_counts(run)


def test_auto_runs_large_cpu_inputs_on_the_fused_kernels(monkeypatch):
    from seqnorm.backends import fused

    calls = []
    real = fused.FusedBackend.groupwise_norm
    monkeypatch.setattr(fused.FusedBackend, "groupwise_norm",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    F.group_norm(torch.randn(2, 512, 1024), 32, lengths=torch.tensor([1024, 300]))
    F.group_norm(torch.randn(2, 8, 10), 2)                          # small: torch
    assert calls == [1]
