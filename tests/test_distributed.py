"""SyncSeqBatchNorm over 2 CPU processes (gloo, a file rendezvous: no network)
equals single-process SeqBatchNorm over the concatenated batch."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqnorm

sys.path.insert(0, os.path.dirname(__file__))
import dist_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.start_processes(W.worker, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD,
                       start_method="spawn", join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _concat(parts):
    """Concatenate per-rank (B_r, T_r, ...) tensors along B, padding T to the longest."""
    t = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        pad_shape = (p.shape[0], t - p.shape[1]) + tuple(p.shape[2:])
        fill = torch.ones(pad_shape, dtype=p.dtype) if p.dtype == torch.bool else torch.zeros(pad_shape, dtype=p.dtype)
        out.append(torch.cat([p, fill], dim=1))
    return torch.cat(out, dim=0)


def _split(t, parts):
    out, start = [], 0
    for p in parts:
        out.append(t[start:start + p.shape[0], : p.shape[1]])
        start += p.shape[0]
    return out


@pytest.mark.parametrize("scenario", ["ragged", "rank1_all_padding"])
def test_sync_equals_single_process_on_the_concatenated_batch(results, scenario):
    steps = W.global_batches()[scenario]
    single = seqnorm.SeqBatchNorm(W.D).double()
    with torch.no_grad():
        single.weight.copy_(torch.linspace(0.5, 1.5, W.D))
        single.bias.copy_(torch.linspace(-1, 1, W.D))
    for step, per_rank in enumerate(steps):
        xs, masks, dys = zip(*per_rank)
        x = _concat(list(xs)).requires_grad_()
        mask, dy = _concat(list(masks)), _concat(list(dys))
        single.zero_grad()
        y = single(x, padding_mask=mask)
        y.backward(dy)
        for r in range(WORLD):
            got = results[r][scenario][step]
            torch.testing.assert_close(got["y"], _split(y.detach(), xs)[r], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["dx"], _split(x.grad, xs)[r], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["running_mean"], single.running_mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["running_var"], single.running_var, atol=1e-5, rtol=1e-5)
            assert got["nbt"] == single.num_batches_tracked
        # parameter gradients are local sums (DDP reduces them): their sum is the global gradient
        torch.testing.assert_close(sum(results[r][scenario][step]["dw"] for r in range(WORLD)), single.weight.grad,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sum(results[r][scenario][step]["db"] for r in range(WORLD)), single.bias.grad,
                                   atol=1e-5, rtol=1e-5)


def test_sync_path_warns_nothing(results):
    # e.g. torch 2.13 deprecates all_gather_into_tensor with a FutureWarning on every call
    for r in range(WORLD):
        assert results[r]["warnings"] == []


def test_ddp_training_matches_single_process(results):
    model = W.make_model()   # SeqBatchNorm, same initial weights as the ranks' models
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for per_rank in W.ddp_data():
        xs, masks, targets = zip(*per_rank)
        x, mask, target = _concat(list(xs)), _concat(list(masks)), _concat(list(targets))
        total = int((~mask).sum())
        opt.zero_grad()
        err = ((model(x, mask) - target) ** 2).masked_fill(mask[..., None], 0).sum() / total
        err.backward()
        opt.step()
        losses.append(err.item())
    for r in range(WORLD):
        got = results[r]["ddp"]
        assert got["losses"] == pytest.approx(losses, rel=1e-6)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["params"][k], v, atol=1e-6, rtol=1e-6, msg=k)
    assert losses[-1] < losses[0]   # it trained


def test_without_process_group_it_is_seq_batch_norm():
    torch.manual_seed(3)
    a, b = seqnorm.SyncSeqBatchNorm(5), seqnorm.SeqBatchNorm(5)
    x = torch.randn(2, 4, 5)
    m = torch.tensor([[False] * 4, [False, False, True, True]])
    assert torch.equal(a(x, padding_mask=m), b(x, padding_mask=m))
    assert torch.equal(a.running_var, b.running_var)
    assert list(a.state_dict()) == list(b.state_dict())


def test_merge_moments_is_chan():
    torch.manual_seed(4)
    parts = [torch.randn(n, 3, dtype=torch.float64) + 1e4 for n in (5, 0, 9, 1)]
    counts = torch.tensor([float(p.shape[0]) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=torch.float64)
                       for p in parts])
    n, mean, var = seqnorm.distributed.merge_moments(counts, means, m2s)
    every = torch.cat(parts)
    assert n == 15
    torch.testing.assert_close(mean, every.mean(0))
    torch.testing.assert_close(var, every.var(0, unbiased=False))
