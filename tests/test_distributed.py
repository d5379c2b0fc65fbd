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


def _split(t, parts):
    """The per-rank pieces of a tensor over the concatenated batch."""
    out, start = [], 0
    for p in parts:
        out.append(t[start:start + p.shape[0], : p.shape[1]])
        start += p.shape[0]
    return out


#: (results prefix, case): the torch backend, the triton backend in float64 (which hands
#: float64 to the torch backend) and in float32 (the kernels' own sync path)
BACKEND_CASES = [(b, c) for b in (["", "triton/", "triton32/"] if W.TRITON else [""]) for c in W.CASES
                 if b != "triton32/" or c in W.TRITON32_CASES]


@pytest.mark.parametrize("backend,case", BACKEND_CASES,
                         ids=[f"{c}-{b.strip('/') or 'torch'}" for b, c in BACKEND_CASES])
@pytest.mark.parametrize("scenario", ["ragged", "rank1_all_padding"])
def test_sync_equals_single_process_on_the_concatenated_batch(results, case, scenario, backend):
    """One process on the concatenated batch minimizing what DistributedDataParallel
    minimizes, the *mean* of the ranks' losses (so its ``dy`` is the ranks' over
    WORLD): outputs, running statistics (ψ² and ν too) and counters are equal, each
    rank's input gradient is WORLD times its own, and the ranks' parameter
    gradients average to its own."""
    kind, momentum = W.CASES[case]
    steps = W.global_batches()[scenario]
    single = W.run_steps(W.make_norm(kind, False, momentum), kind, steps, dy_scale=1 / WORLD)
    # float32 kernels against the float64 single process: float32's rounding
    tol = dict(atol=1e-5, rtol=1e-5) if backend != "triton32/" else dict(atol=2e-4, rtol=2e-4)
    close = dict(tol, check_dtype=backend != "triton32/")
    for step, per_rank in enumerate(steps):
        xs = [x for x, _, _ in per_rank]
        want = single[step]
        for r in range(WORLD):
            got = results[r][f"{backend}{case}/{scenario}"][step]
            torch.testing.assert_close(got["y"], _split(want["y"], xs)[r], **close)
            torch.testing.assert_close(got["dx"], WORLD * _split(want["dx"], xs)[r], **close)
            for b in W.BUFFERS[kind]:
                torch.testing.assert_close(got[b], want[b], **close, msg=b)
            assert got["nbt"] == want["nbt"]
        for key in ("dw", "db"):
            mean = sum(results[r][f"{backend}{case}/{scenario}"][step][key] for r in range(WORLD)) / WORLD
            torch.testing.assert_close(mean, want[key], **close)
    # Rank 0 keeping statistics of its own batch alone ends elsewhere when rank 1 had
    # real tokens (so the checks above have teeth), and the same when it was all padding.
    alone = W.run_steps(W.make_norm(kind, False, momentum), kind, [[p[0]] for p in steps], dy_scale=1 / WORLD)
    for b in W.BUFFERS[kind]:
        same = torch.allclose(alone[-1][b], single[-1][b], **tol)
        assert same == (scenario == "rank1_all_padding"), b


def test_sync_path_warns_nothing(results):
    # e.g. torch 2.13 deprecates all_gather_into_tensor with a FutureWarning on every call
    for r in range(WORLD):
        assert results[r]["warnings"] == []


@pytest.mark.parametrize("norm", ["batch", "power"])
def test_ddp_training_matches_single_process(results, norm):
    model = W.make_model(norm)   # SeqBatchNorm / PowerNorm, same initial weights as the ranks' models
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for per_rank in W.ddp_data():
        xs, masks, targets = zip(*per_rank)
        x, mask, target = (W.concat_batch(list(t)) for t in (xs, masks, targets))
        total = int((~mask).sum())
        opt.zero_grad()
        err = ((model(x, mask) - target) ** 2).masked_fill(mask[..., None], 0).sum() / total
        err.backward()
        opt.step()
        losses.append(err.item())
    for r in range(WORLD):
        got = results[r][f"ddp/{norm}"]
        assert got["losses"] == pytest.approx(losses, rel=1e-6)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["params"][k], v, atol=1e-6, rtol=1e-6, msg=k)
    assert losses[-1] < losses[0]   # it trained


def test_without_process_group_sync_power_norm_is_power_norm():
    torch.manual_seed(5)
    a, b = seqnorm.SyncPowerNorm(5), seqnorm.PowerNorm(5)
    x = torch.randn(2, 4, 5)
    m = torch.tensor([[False] * 4, [False, False, True, True]])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa, padding_mask=m), b(xb, padding_mask=m)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    assert torch.equal(a.running_phi, b.running_phi) and torch.equal(a.running_nu, b.running_nu)
    assert list(a.state_dict()) == list(b.state_dict())


def test_convert_sync_powernorm_shares_parameters_and_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), seqnorm.PowerNorm(4))
    model[1].running_phi.fill_(3.0)
    out = seqnorm.SyncPowerNorm.convert_sync_powernorm(model)
    assert isinstance(out[1], seqnorm.SyncPowerNorm)
    assert out[1].weight is model[1].weight and out[1].running_phi is model[1].running_phi
    assert out[1].running_nu is model[1].running_nu


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
