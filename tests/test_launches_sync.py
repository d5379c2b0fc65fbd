"""The Sync modules' launches on the CUDA path (issue 16): the local budget of their
single-process modules plus their collectives, one each way — counted in one process
through a one-rank gloo group (:func:`seqnorm.tools.launches.sync_path`), whose
buffers and launches are those of every rank of a larger group — and their
collective path on the kernels equal to the single-process module's."""

import os

import pytest
import torch

pytest.importorskip("triton")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed not built", allow_module_level=True)

import seqnorm  # noqa: E402
from seqnorm.tools.launches import (SYNC_BUDGET, SYNC_COLLECTIVES, SYNC_MODULE_CALLS, gpu_policy,  # noqa: E402
                                       module_call_launches, split_collectives, sync_path)

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def one_rank():
    with sync_path():
        yield


@pytest.mark.parametrize("label,kind,training,kwargs", SYNC_MODULE_CALLS, ids=[c[0] for c in SYNC_MODULE_CALLS])
def test_sync_module_call_within_the_local_budget_plus_one_collective(label, kind, training, kwargs, one_rank):
    fwd, bwd = module_call_launches(kind, training, kwargs, torch.bfloat16, param_dtype=torch.float32, device=DEVICE)
    (fwd_local, fwd_coll), (bwd_local, bwd_coll) = split_collectives(fwd), split_collectives(bwd)
    fwd_budget, bwd_budget = SYNC_BUDGET[label]
    assert sum(fwd_local.values()) <= fwd_budget, f"{label} forward: {dict(fwd)}"
    assert sum(bwd_local.values()) <= bwd_budget, f"{label} backward: {dict(bwd)}"
    assert sum(fwd_coll.values()) == SYNC_COLLECTIVES, f"{label} forward: {dict(fwd)}"
    assert sum(bwd_coll.values()) == SYNC_COLLECTIVES, f"{label} backward: {dict(bwd)}"
    # everything local is one of seqnorm's kernels: no torch op between them
    assert all(name.startswith("triton:") for name in fwd_local + bwd_local), dict(fwd + bwd)


class _TwoIdenticalRanks:
    """A gathering hook standing for two ranks that hold the same batch: the rank
    merge, the sums and ν's scale see two ranks (the kernels' sync path, no group)."""

    world, rank = 2, 0

    def gather(self, t):
        return torch.stack([t, t.clone()])

    def sums(self, t):
        return t.double() * 2


@pytest.mark.parametrize("kind", ["batch", "power"])
@pytest.mark.parametrize("policy", ["gpu", "host"])
def test_the_kernels_sync_path_equals_one_process_on_the_doubled_batch(kind, policy, monkeypatch):
    """Two ranks holding the same batch ``x`` are one process on ``[x; x]`` minimizing
    the mean of the ranks' losses (DDP's): the same output on ``x``, each rank's input
    gradient twice that process's, and the same running statistics, ν and counter —
    a 1e4 offset included (K, the first real row, cancels it)."""
    import contextlib

    from seqnorm import distributed

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 10, generator=gen) * 2 + 1e4 * (kind == "batch")
    mask = torch.rand(3, 6, generator=gen) < 0.3
    mask[0, 0] = False
    dy = torch.randn(3, 6, 10, generator=gen)
    sync_cls, single_cls = ((distributed.SyncSeqBatchNorm, seqnorm.SeqBatchNorm) if kind == "batch"
                            else (distributed.SyncPowerNorm, seqnorm.PowerNorm))
    sync, single = sync_cls(10), single_cls(10)
    with torch.no_grad():
        for m in (sync, single):
            m.weight.copy_(torch.linspace(0.5, 1.5, 10))
            m.bias.copy_(torch.linspace(-1, 1, 10))
            if kind == "power":
                m.running_nu.copy_(torch.linspace(-0.1, 0.1, 10))
    monkeypatch.setattr(distributed, "_sync_reduce", lambda m: _TwoIdenticalRanks() if m.training else None)
    with seqnorm.use_backend("triton"), (gpu_policy() if policy == "gpu" else contextlib.nullcontext()):
        for _ in range(2):
            xs, xd = x.clone().requires_grad_(), torch.cat([x, x]).requires_grad_()
            ys = sync(xs, padding_mask=mask)
            ys.backward(dy)
            yd = single(xd, padding_mask=torch.cat([mask, mask]))
            yd.backward(torch.cat([dy, dy]) / 2)
            torch.testing.assert_close(ys, yd[:3], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(xs.grad, 2 * xd.grad[:3], atol=1e-4, rtol=1e-4)
            for key, value in single.state_dict().items():
                torch.testing.assert_close(sync.state_dict()[key], value, atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("kind", ["batch", "power"])
def test_a_rank_without_rows_joins_the_same_collectives(kind, monkeypatch):
    """Every rank all-gathers a buffer of one size (the partials' grid is fixed by the
    device and the width), so a rank whose batch has no rows — or more rows than the
    others — still matches the others' collectives; its buffers do not move."""
    from seqnorm import distributed

    class Recording(_TwoIdenticalRanks):
        def __init__(self):
            self.calls = []

        def gather(self, t):
            self.calls.append(("gather", t.numel(), t.dtype))
            return super().gather(t)

        def sums(self, t):
            self.calls.append(("sums", t.numel(), t.dtype))
            return super().sums(t)

    cls = distributed.SyncSeqBatchNorm if kind == "batch" else distributed.SyncPowerNorm
    calls = []
    for b in (0, 1, 9):
        hook = Recording()
        monkeypatch.setattr(distributed, "_sync_reduce", lambda m, hook=hook: hook if m.training else None)
        module = cls(6)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        x = torch.randn(b, 40, 6, requires_grad=True)
        with seqnorm.use_backend("triton"), gpu_policy():
            module(x, padding_mask=torch.zeros(b, 40, dtype=torch.bool)).sum().backward()
        calls.append(hook.calls)
        if b == 0:
            assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert calls[0] == calls[1] == calls[2] and [c[0] for c in calls[0]] == ["gather", "sums"], calls
