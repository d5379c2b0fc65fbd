"""The running-statistics policy without host synchronization (seqnorm.running).

On a GPU every module's forward and backward must run without reading a value
back to the host (it would stall the device and break CUDA-graph capture). CI
has no GPU, so the sync-free policy — chosen for non-CPU tensors and under
torch.compile — is forced here on CPU tensors, and a TorchFunctionMode fails
the test at any host read (``bool()``, ``int()``, ``float()``, ``.item()``,
``.tolist()``, ``nonzero``) made by seqnorm, on the torch and triton backends.
On a CUDA machine the same checks run with ``torch.cuda.set_sync_debug_mode``.
"""

import importlib.util

import pytest
import torch
from torch.overrides import TorchFunctionMode

import seqnorm
from seqnorm import kinds, running

HOST_READS = {torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
              torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero}
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
D = 12


class NoHostReads(TorchFunctionMode):
    """Raise at any call that reads tensor data back to the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"host read: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def forced(monkeypatch):
    """The sync-free policy on CPU tensors, as on a GPU."""
    monkeypatch.setattr(running, "sync_free", lambda t: True)


def _batch(seed=0, one_token=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, D, generator=gen) * 2 + 1
    mask = torch.rand(3, 7, generator=gen) < 0.3
    mask[0, :2] = False
    if one_token:
        mask[:] = True
        mask[1, 4] = False
    return x, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["masked_batch", "power", "layer", "rms", "add_layer", "group", "instance"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_and_eval_steps_read_nothing_back(kind, momentum, backend, forced):
    extra = {"momentum": momentum} if kinds.kind(kind).feature_dim else {}
    if kind == "group":
        extra = dict(num_groups=3)
    if kind == "instance":   # torch's InstanceNorm takes momentum=None as "no update"
        extra = dict(affine=True, track_running_stats=True, momentum=momentum or 0.1)
    module = kinds.build(kind, D, **extra)
    x, mask = _batch()
    channels_first = kinds.kind(kind).channels_first
    if channels_first:
        x = x.transpose(1, 2).contiguous()                  # (B, C, T), mask (B, T)
    with seqnorm.use_backend(backend):
        for train in (True, True, False):
            module.train(train)
            xl = x.clone().requires_grad_()
            with NoHostReads():
                y = module(xl, xl, padding_mask=mask) if kind == "add_layer" else module(xl, padding_mask=mask)
                y.pow(2).sum().backward()
            y_tokens = y.transpose(1, 2) if channels_first else y
            assert torch.isfinite(xl.grad).all() and torch.all(y_tokens[mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["masked_batch", "power"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_the_selected_update_equals_the_host_policy(kind, momentum, backend, monkeypatch):
    """Ordinary batches, an all-padding batch and a NaN batch: the device-side
    select keeps exactly what the host policy keeps (statistics, ν and counter)."""
    x, mask = _batch(1)
    nan = x.clone()
    nan[0, 0, 3] = float("nan")
    batches = [(x, mask), (x * 0.5 - 1, mask), (x, torch.ones_like(mask)), (nan, mask), (x + 2, mask)]
    states = []
    for forced_policy in (False, True):
        if forced_policy:
            monkeypatch.setattr(running, "sync_free", lambda t: True)
        module = kinds.build(kind, D, momentum=momentum).train()
        with seqnorm.use_backend(backend), pytest.warns(running.NonFiniteStatisticsWarning) \
                if not forced_policy else _nothing():
            for xb, mb in batches:
                xl = xb.clone().requires_grad_()
                module(xl, padding_mask=mb).sum().backward()
        states.append({k: v.clone() for k, v in module.state_dict().items()})
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-5, atol=1e-6, msg=key)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_real_token_is_defined_without_a_sync(backend, forced):
    """Where the host cannot be asked, one real token does not raise: its variance
    is 0, it normalizes to the bias, and the running statistics stay as they were."""
    bn = seqnorm.SeqBatchNorm(D).train()
    with torch.no_grad():
        bn.bias.copy_(torch.arange(D, dtype=torch.float32))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x, mask = _batch(one_token=True)
    with seqnorm.use_backend(backend), NoHostReads():
        y = bn(x, padding_mask=mask)
    torch.testing.assert_close(y[1, 4], bn.bias.detach())
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["masked_batch", "power", "layer", "add_layer", "group", "instance"])
def test_cuda_training_step_does_not_synchronize(kind):
    extra = {"group": dict(num_groups=3), "instance": dict(affine=True, track_running_stats=True)}.get(kind, {})
    module = kinds.build(kind, D, **extra).cuda().train()
    x, mask = (t.cuda() for t in _batch())
    if kinds.kind(kind).channels_first:
        x = x.transpose(1, 2).contiguous()
    for backend in ("auto", "torch"):
        with seqnorm.use_backend(backend):
            xl = x.clone().requires_grad_()
            module(xl, xl, padding_mask=mask) if kind == "add_layer" else module(xl, padding_mask=mask)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                y = module(xl, xl, padding_mask=mask) if kind == "add_layer" else module(xl, padding_mask=mask)
                y.sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
