"""The host ops of masked GroupNorm / InstanceNorm1d (issue 27, "Hooks": the CPU path's cost).

A group-wise call on a plain float32/float64 CPU tensor whose mask pads each sequence at
its end runs torch's own ``group_norm`` on each run of equal-length sequences' real steps
(``functional._host_groupwise``). These tests hold it to the float64 reference and to the
backend's composite op (forward and backward, gradcheck in float64), check that it is the
path taken, that padded steps are exactly 0 with NaN/Inf there reaching nothing, that large
offsets and overflow-scale values keep their accuracy, that masks with holes, NaN at real
steps, the sync-free policy and torch.compile-free reads behave as before, and that the
per-mask cache sees a mask changed in place.
"""

import numpy as np
import pytest
import torch

import seqnorm
from seqnorm import functional as F
from seqnorm import reference as R
from seqnorm import running
from seqnorm.backends import torch as torch_backend

from conftest import to_np

#: (B, C, T, groups, lengths): runs of equal lengths, all-padding sequences, no padding, one step
CASES = [
    (2, 8, 9, 4, [9, 6]),
    (3, 6, 17, 3, [17, 0, 5]),
    (4, 4, 5, 4, [5, 5, 2, 2]),
    (2, 8, 33, 1, [33, 33]),
    (1, 1, 4, 1, [1]),
    (5, 6, 9, 2, [9, 1, 0, 0, 7]),
]
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 1e-5)}


def _case(b, c, t, lengths, dtype, seed=0, poison=True):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, t, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    mask = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]
    if poison:      # NaN / Inf at padding must reach nothing
        x = x.masked_fill(mask.unsqueeze(1), float("nan"))
        if mask.any():
            b0, t0 = mask.nonzero()[0].tolist()
            x[b0, 0, t0] = float("inf")
    w = torch.randn(c, generator=gen, dtype=dtype)
    bias = torch.randn(c, generator=gen, dtype=dtype)
    dy = torch.randn(b, c, t, generator=gen, dtype=dtype)
    return x, w, bias, mask, dy


class _Spy:
    """Counts calls of the torch backend's composite op (the path the host ops replace)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = torch_backend.TorchBackend.groupwise_norm

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch_backend.TorchBackend, "groupwise_norm", staticmethod(spy))


def _backend_op(x, g, w, b, mask):
    """The same call through the backend's composite op (the general path's tail)."""
    return F._groupwise(x, g, w, b, 1e-5, mask, None, "group_norm")[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_and_backend_op(case, dtype, monkeypatch):
    b, c, t, g, lengths = case
    x, w, bias, mask, dy = _case(b, c, t, lengths, dtype)
    atol, rtol = TOL[dtype]
    xs, ws, bs = (v.clone().requires_grad_() for v in (x, w, bias))
    spy = _Spy(monkeypatch)
    y = F.group_norm(xs, g, ws, bs, 1e-5, padding_mask=mask)
    y.backward(dy)
    assert spy.calls == (0 if any(lengths) else 1)       # all-padding batch: the backend's op
    ref_y, cache = R.group_norm_forward(to_np(x), g, to_np(w), to_np(bias), 1e-5, mask.numpy())
    ref_dx, ref_dw, ref_db = R.group_norm_backward(to_np(dy), cache)
    pads = mask.unsqueeze(1).expand_as(y)
    assert y.dtype == dtype and torch.all(y[pads] == 0) and torch.all(xs.grad[pads] == 0)
    assert torch.isfinite(y).all() and torch.isfinite(xs.grad).all()
    scale = max(1.0, float(np.abs(ref_dw).max()), float(np.abs(ref_db).max()))
    np.testing.assert_allclose(to_np(y), ref_y, atol=atol, rtol=rtol)
    np.testing.assert_allclose(to_np(xs.grad), ref_dx, atol=atol * 5, rtol=rtol * 5)
    np.testing.assert_allclose(to_np(ws.grad), ref_dw, atol=atol * 5 * scale, rtol=rtol * 5)
    np.testing.assert_allclose(to_np(bs.grad), ref_db, atol=atol * 5 * scale, rtol=rtol * 5)
    # the backend's composite op: same values within the dtype's rounding
    xo, wo, bo = (v.clone().requires_grad_() for v in (x, w, bias))
    yo = _backend_op(xo, g, wo, bo, mask)
    yo.backward(dy)
    for mine, theirs in ((y, yo), (xs.grad, xo.grad), (ws.grad, wo.grad), (bs.grad, bo.grad)):
        torch.testing.assert_close(mine, theirs, atol=atol * 5 * scale, rtol=rtol * 5)


def test_gradcheck_on_the_host_path(monkeypatch):
    x, w, b, mask, _ = _case(3, 4, 6, [6, 2, 4], torch.float64, poison=False)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    spy = _Spy(monkeypatch)
    assert torch.autograd.gradcheck(lambda x_, w_, b_: F.group_norm(x_, 2, w_, b_, padding_mask=mask), (x, w, b))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: F.instance_norm(x_, None, None, w_, b_, padding_mask=mask),
                                    (x, w, b))
    assert spy.calls == 0


@pytest.mark.parametrize("how", ["padding_mask", "lengths", "context"])
@pytest.mark.parametrize("kind", ["GroupNorm", "InstanceNorm1d"])
def test_modules_take_the_host_path(kind, how, monkeypatch):
    b, c, t = 3, 8, 11
    x, _, _, mask, dy = _case(b, c, t, [11, 7, 3], torch.float32)
    x.requires_grad_()
    lengths = torch.tensor([11, 7, 3])
    torch.manual_seed(0)
    m = seqnorm.GroupNorm(2, c) if kind == "GroupNorm" else seqnorm.InstanceNorm1d(c, affine=True)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    groups = 2 if kind == "GroupNorm" else c
    expected = _backend_op(x.detach(), groups, m.weight, m.bias, mask)
    if how == "lengths":
        F.group_norm(x.detach(), groups, lengths=lengths)        # the general path makes (and keeps) its mask
    spy = _Spy(monkeypatch)
    for _ in range(2):        # the second call: the runs read from the cache
        if how == "padding_mask":
            y = m(x, padding_mask=mask)
        elif how == "lengths":
            y = m(x, lengths=lengths)
        else:
            with seqnorm.padding(mask):
                y = m(x)
        torch.testing.assert_close(y, expected, atol=2e-5, rtol=1e-5)
    assert spy.calls == 0
    y.backward(dy)
    assert torch.all(x.grad[mask.unsqueeze(1).expand_as(x)] == 0) and torch.isfinite(x.grad).all()


def test_large_offsets_and_overflow_scale_values(monkeypatch):
    spy = _Spy(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    x = (1e4 + torch.randn(2, 4, 50, generator=gen, dtype=torch.float64)).float()
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 30:] = True
    y = F.group_norm(x, 2, padding_mask=mask)
    ref, _ = R.group_norm_forward(to_np(x), 2, padding_mask=mask.numpy())
    np.testing.assert_allclose(to_np(y), ref, atol=2e-3, rtol=1e-3)      # 1e4 in float32: ulp 1e-3
    for dtype, big in ((torch.float32, 1e30), (torch.float64, 1e300)):
        huge = torch.tensor([[[1.0, -1.0, 0.0, 1e-3], [0.3, -2.0, 5e-6, 0.0]]], dtype=torch.float64) * big
        huge = huge.to(dtype).requires_grad_()
        pad = torch.tensor([[False, False, False, True]])
        y = F.group_norm(huge, 1, padding_mask=pad)
        # (the reference's own squares overflow float64 at 1e300: the same x̂ of x/big)
        ref, _ = R.group_norm_forward(to_np(huge.detach()) / big, 1, eps=1e-5 / big / big, padding_mask=pad.numpy())
        assert torch.isfinite(y).all() and torch.all(y[..., 3] == 0)
        np.testing.assert_allclose(to_np(y), ref, atol=1e-5, rtol=1e-5)
        y.sum().backward()
        assert torch.isfinite(huge.grad).all()
    assert spy.calls == 0


def test_non_finite_real_steps_and_holes_take_the_backend_op(monkeypatch):
    x, w, b, mask, _ = _case(2, 4, 6, [6, 3], torch.float32, poison=False)
    x[0, 1, 2] = float("nan")
    spy = _Spy(monkeypatch)
    y = F.group_norm(x, 2, w, b, padding_mask=mask)
    assert spy.calls == 1
    torch.testing.assert_close(y, _backend_op(x, 2, w, b, mask), equal_nan=True)
    x, w, b, _, _ = _case(2, 4, 6, [6, 3], torch.float32, poison=False)
    holes = torch.tensor([[False, True, False, False, True, False], [False] * 6])
    y = F.group_norm(x, 2, w, b, padding_mask=holes)
    assert spy.calls == 3     # (and the reference call below)
    torch.testing.assert_close(y, _backend_op(x, 2, w, b, holes))
    ref, _ = R.group_norm_forward(to_np(x), 2, to_np(w), to_np(b), 1e-5, holes.numpy())
    np.testing.assert_allclose(to_np(y), ref, atol=2e-5, rtol=1e-5)


def test_the_runs_cache_sees_a_mask_changed_in_place_and_inference_masks():
    x, w, b, mask, _ = _case(2, 4, 6, [6, 3], torch.float64, poison=False)
    y1 = F.group_norm(x, 2, w, b, padding_mask=mask)
    mask[0, 4:] = True                      # in place: lengths (4, 3)
    y2 = F.group_norm(x, 2, w, b, padding_mask=mask)
    ref, _ = R.group_norm_forward(to_np(x), 2, to_np(w), to_np(b), 1e-5, mask.numpy())
    np.testing.assert_allclose(to_np(y2), ref, atol=1e-12, rtol=1e-12)
    assert not torch.equal(y1, y2)
    with torch.inference_mode():
        im = torch.arange(6)[None, :] >= torch.tensor([[2], [5]])
        y3 = F.group_norm(x, 2, w, b, padding_mask=im)
    ref, _ = R.group_norm_forward(to_np(x), 2, to_np(w), to_np(b), 1e-5, im.numpy())
    np.testing.assert_allclose(to_np(y3), ref, atol=1e-12, rtol=1e-12)


def test_sync_free_policy_never_takes_the_host_path(monkeypatch):
    x, w, b, mask, _ = _case(2, 4, 6, [6, 3], torch.float32)
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(running, "sync_free", lambda t: True)
    y = F.group_norm(x, 2, w, b, padding_mask=mask)
    assert spy.calls == 1
    assert torch.all(y[mask.unsqueeze(1).expand_as(y)] == 0)


def test_running_statistics_path_unchanged():
    """InstanceNorm1d(track_running_stats=True) keeps the general path: its running
    statistics move exactly as the backend's statistics say."""
    x, _, _, mask, _ = _case(3, 4, 9, [9, 4, 1], torch.float32)
    m = seqnorm.InstanceNorm1d(4, track_running_stats=True).train()
    m(x, padding_mask=mask)
    xr = x.masked_fill(mask.unsqueeze(1), 0).double()
    n = (~mask).sum(1).double()
    mean = xr.sum(2) / n[:, None]
    var = ((xr - mean[..., None]).masked_fill(mask.unsqueeze(1), 0) ** 2).sum(2) / (n[:, None] - 1)
    used = n >= 2
    torch.testing.assert_close(m.running_mean, (0.1 * mean[used].mean(0)).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.running_var, (0.9 + 0.1 * var[used].mean(0)).float(), atol=1e-6, rtol=1e-5)


def test_runs_from_the_context_host_lengths(monkeypatch):
    """Under a padding context of host lengths the module's mask is the context's, and its
    runs come from those lengths (no read of the mask); a mask that only looks like it is read."""
    x, _, _, mask, _ = _case(3, 4, 10, [10, 6, 6], torch.float32)
    gn = seqnorm.GroupNorm(2, 4)
    read = []
    real = F._mask_runs
    monkeypatch.setattr(F, "_mask_runs", lambda m: read.append(m) or real(m))
    spy = _Spy(monkeypatch)
    with seqnorm.padding(lengths=torch.tensor([10, 6, 6])):
        y = gn(x)
        y2 = F.group_norm(x, 2, gn.weight, gn.bias, padding_mask=mask.clone())     # not the context's mask
    assert spy.calls == 0 and len(read) == 1
    expected = _backend_op(x, 2, gn.weight, gn.bias, mask)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y2, expected)


def test_many_runs_take_the_backend_op(monkeypatch):
    """Past ``_HOST_GROUP_RUNS_MAX`` runs of equal lengths one call per run would cost more
    than the backend's op: it runs, with the same values."""
    lengths = [9, 3] * 5                                    # 10 runs
    x, w, b, mask, _ = _case(10, 4, 9, lengths, torch.float32)
    spy = _Spy(monkeypatch)
    y = F.group_norm(x, 2, w, b, padding_mask=mask)
    assert spy.calls == 1
    ref, _ = R.group_norm_forward(to_np(x), 2, to_np(w), to_np(b), 1e-5, mask.numpy())
    np.testing.assert_allclose(to_np(y), ref, atol=2e-5, rtol=1e-5)
    x, w, b, mask, _ = _case(10, 4, 9, sorted(lengths), torch.float32)     # 2 runs
    F.group_norm(x, 2, w, b, padding_mask=mask)
    assert spy.calls == 1
