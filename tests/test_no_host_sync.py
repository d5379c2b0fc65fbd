"""No host synchronization: the running-statistics policy (seqnorm.running) and the padding path.

On a GPU every module's forward and backward must run without reading a value
back to the host (it would stall the device and break CUDA-graph capture). CI
has no GPU, so the sync-free policy — chosen for non-CPU tensors and under
torch.compile — is forced here on CPU tensors, and a TorchFunctionMode fails
the test at any host read (``bool()``, ``int()``, ``float()``, ``.item()``,
``.tolist()``, ``nonzero``) made by seqnorm, on the torch and triton backends.
:class:`HostReads` also counts what only a dispatch mode sees (``torch.equal``,
boolean indexing, reads inside torch); it covers the padding path: ``lengths=``,
``seqnorm.padding`` and ``make_padding_safe`` models, HF speech models included.
On a CUDA machine the same checks run with ``torch.cuda.set_sync_debug_mode``.
"""

import copy
import importlib.util
from collections import Counter

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import seqnorm
from seqnorm import kinds, masks, running

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


# ---------------------------------------------------------------------------
# The padding path: lengths=, seqnorm.padding, make_padding_safe (issue 20)
# ---------------------------------------------------------------------------

#: aten ops that read tensor data back to the host (on CUDA, each one a stream synchronization)
READ_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.is_nonzero", "aten.masked_select",
            "aten._unique2", "aten.unique_consecutive", "aten.unique_dim"}


class HostReads:
    """Count host reads, by name: the aten ops of :data:`READ_OPS` and boolean-mask
    indexing (an implicit ``nonzero``), seen by a dispatch mode wherever they are
    called from; ``tolist`` and ``numpy``, which read a CPU tensor without dispatch."""

    def __init__(self):
        self.counts = Counter()
        counts = self.counts

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                indexed = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
                if name in READ_OPS or indexed:
                    counts[name] += 1
                return func(*args, **(kwargs or {}))

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in (torch.Tensor.tolist, torch.Tensor.numpy):
                    counts[func.__name__] += 1
                return func(*args, **(kwargs or {}))

        self.modes = (Function(), Dispatch())

    def __enter__(self):
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


def _reads(fn):
    """``(fn(), host reads made by it)``."""
    with HostReads() as reads:
        out = fn()
    return out, dict(reads.counts)


MODULE_KINDS = ["layer", "rms", "add_layer", "add_rms", "masked_batch", "power", "group", "instance"]


def _module_and_input(kind):
    extra = {"group": dict(num_groups=3), "instance": dict(affine=True, track_running_stats=True)}
    module = kinds.build(kind, D, **extra.get(kind, {}))
    x, mask = _batch(2)
    mask = torch.arange(7)[None, :] >= torch.tensor([7, 4, 2])[:, None]        # padding at the end
    if kinds.kind(kind).channels_first:
        x = x.transpose(1, 2).contiguous()
    return module, x, mask, (~mask).sum(1)


def _call(module, kind, x, **padding):
    return module(x, x, **padding) if kind.startswith("add_") else module(x, **padding)


@pytest.mark.parametrize("kind", MODULE_KINDS)
@pytest.mark.parametrize("how", ["lengths", "context lengths", "context mask"])
def test_lengths_and_the_padding_context_read_nothing_back(kind, how, forced):
    """Every module given ``lengths=`` or called inside ``seqnorm.padding`` (lengths
    or mask), in training and eval: 0 host reads, and the output of ``padding_mask=``."""
    module, x, mask, lengths = _module_and_input(kind)
    for train in (True, False):
        module.train(train)
        state = copy.deepcopy(module.state_dict())
        expected = _call(module, kind, x, padding_mask=mask)
        module.load_state_dict(state)
        if how == "lengths":
            y, reads = _reads(lambda: _call(module, kind, x, lengths=lengths))
        else:
            scope = seqnorm.padding(lengths=lengths) if how == "context lengths" else seqnorm.padding(mask)
            with scope:
                y, reads = _reads(lambda: _call(module, kind, x))
        assert reads == {}, f"{kind}, {how}: host reads {reads}"
        torch.testing.assert_close(y, expected)


class _Channels(nn.Module):
    """(N, C, L) ↔ (N, L, C), so that a LayerNorm can sit in a conv stack."""

    def forward(self, x):
        return x.transpose(1, 2)


def _conv_stack():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 8, 5, stride=2, padding=2), nn.BatchNorm1d(8), nn.GELU(),
        nn.Conv1d(8, 8, 3, dilation=2, padding="same"), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.MaxPool1d(3, stride=2, padding=1), nn.InstanceNorm1d(8, affine=True),
        nn.AvgPool1d(2), nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1), nn.Tanh(),
        _Channels(), nn.LayerNorm(4), _Channels(), nn.Conv1d(4, 4, 4, padding=2),
    )


def _waves():
    x = torch.randn(3, 3, 57, generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([57, 30, 41])
    return x, lengths, torch.arange(57)[None, :] >= lengths[:, None]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_padding_safe_conv_stack_reads_nothing_back(train, monkeypatch):
    """Conv1d (strided, dilated, even kernel), BatchNorm1d, GroupNorm, MaxPool1d,
    InstanceNorm1d, AvgPool1d, ConvTranspose1d, LayerNorm under seqnorm.padding
    (lengths, and mask): 0 host reads, and what the host policy computes."""
    x, lengths, mask = _waves()
    net = seqnorm.make_padding_safe(_conv_stack()).train(train)
    state = copy.deepcopy(net.state_dict())
    with seqnorm.padding(lengths=lengths):
        expected = net(x)                            # the host policy: CPU checks
    monkeypatch.setattr(running, "sync_free", lambda t: True)
    for scope in (lambda: seqnorm.padding(lengths=lengths), lambda: seqnorm.padding(mask)):
        net.load_state_dict(state)
        with scope():
            y, reads = _reads(lambda: net(x))
        assert reads == {}
        torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("name", ["wav2vec2", "hubert"])
def test_hf_speech_models_read_nothing_back_under_the_padding_context(name, forced):
    pytest.importorskip("transformers")
    from seqnorm import hf

    model = seqnorm.make_padding_safe(hf.build(name))
    audio = torch.randn(2, 1600, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), seqnorm.padding(lengths=torch.tensor([1600, 1000])):
        out, reads = _reads(lambda: model(audio).last_hidden_state)
    assert reads == {} and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["wav2vec2", "hubert"])
def test_hf_speech_models_read_nothing_back_from_their_own_mask(name, forced):
    """The context a padding-safe model opens from its own attention_mask (no seqnorm.padding
    around the call) adds no host read to those the model makes itself with a mask (HF zeroes
    padded frames by boolean indexing) — and it is open: the output is the masked one."""
    pytest.importorskip("transformers")
    from seqnorm import hf

    stock, model = hf.build(name), seqnorm.make_padding_safe(hf.build(name))
    audio = torch.randn(2, 1600, generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(1600)[None, :] < torch.tensor([1600, 1000])[:, None]).long()
    with torch.no_grad():
        _, stock_reads = _reads(lambda: stock(audio, attention_mask=mask).last_hidden_state)
        out, reads = _reads(lambda: model(audio, attention_mask=mask).last_hidden_state)
        with seqnorm.padding(lengths=torch.tensor([1600, 1000])):
            expected = model(audio, attention_mask=mask).last_hidden_state
    assert reads == stock_reads
    torch.testing.assert_close(out, expected)


def test_each_rate_builds_its_mask_once(monkeypatch):
    """Inside one context the mask at a frame rate is built once and shared by every
    layer at that rate (three norms and a conv at the input's rate, two norms after
    the strided conv: two masks)."""
    built = []
    real = masks._mask
    monkeypatch.setattr(masks, "_mask", lambda lengths, steps: built.append(steps) or real(lengths, steps))
    net = seqnorm.make_padding_safe(nn.Sequential(
        nn.GroupNorm(1, 3), nn.InstanceNorm1d(3), nn.Conv1d(3, 3, 3, padding=1), nn.BatchNorm1d(3),
        nn.Conv1d(3, 4, 4, stride=2), nn.GroupNorm(2, 4), nn.BatchNorm1d(4)))
    with seqnorm.padding(lengths=torch.tensor([20, 9])):
        net(torch.randn(2, 3, 20))
    assert built == [20, 9]


def test_device_lengths_are_checked_on_the_device(forced):
    """Where reading lengths back would synchronize, a length beyond the input fails a
    device-side check (a RuntimeError on the CPU) instead of a host-side ValueError —
    still without a host read; a sequence too short for a kernel counts as empty from
    there on, as with host lengths (make_padding_safe does no harm: torch runs it batched)."""
    ln = seqnorm.LayerNorm(D)
    x = torch.randn(2, 5, D)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, 5\]"):
        _reads(lambda: ln(x, lengths=torch.tensor([6, 2])))
    net = seqnorm.make_padding_safe(nn.Sequential(nn.Conv1d(1, 4, 10, stride=5), nn.GroupNorm(2, 4),
                                                  nn.Conv1d(4, 4, 3)))
    with seqnorm.padding(lengths=torch.tensor([100, 12])):   # too short for the last kernel: empty from there
        _, reads = _reads(lambda: net(torch.randn(2, 1, 100)))   # on, as on the host (where it also warns)
    assert reads == {}
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, 100\]"):
        with seqnorm.padding(lengths=torch.tensor([120, 50])):
            net(torch.randn(2, 1, 100))


def test_host_lengths_are_checked_on_the_host(forced):
    """Lengths a data loader makes — a Python list, or a CPU tensor for a model on
    a device — are host data: checked there with the ValueError, no device involved
    (a Python list costs no tensor read at all); the mask lands on the input's device."""
    ln = seqnorm.LayerNorm(D)
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\].*got values in \[2, 6\]"):
        ln(x, lengths=[6, 2])
    y, reads = _reads(lambda: ln(x, lengths=[5, 2]))
    assert reads == {} and torch.equal(y, ln(x, padding_mask=torch.arange(5)[None] >= torch.tensor([[5], [2]])))


def test_cpu_lengths_for_a_device_input_are_host_data():
    """A CPU lengths tensor for an input elsewhere (here the meta device) is checked
    on the host and its mask built on the input's device."""
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 8\] .*got values in \[5, 9\]"):
        seqnorm.lengths_to_padding_mask(torch.tensor([5, 9]), 8, device="meta")
    mask = seqnorm.lengths_to_padding_mask(torch.tensor([5, 8]), 8, device="meta")
    assert mask.device.type == "meta" and mask.shape == (2, 8) and mask.dtype == torch.bool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_padding_path_does_not_synchronize():
    """lengths= on the device and on the host (a CPU tensor), seqnorm.padding (host
    lengths, device lengths, mask) on every module in training and eval, and the
    padding-safe conv stack: no synchronization (torch.cuda.set_sync_debug_mode)."""
    def no_sync(call, scope=None):
        for debug in ("default", "error"):                          # a warm-up, then the check
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(debug)
            try:
                if scope is None:
                    call()
                else:
                    with scope():
                        call()
            finally:
                torch.cuda.set_sync_debug_mode("default")

    def scopes(lengths, mask):
        on_device, mask = lengths.cuda(), mask.cuda()
        return (lambda: seqnorm.padding(lengths=lengths), lambda: seqnorm.padding(lengths=on_device),
                lambda: seqnorm.padding(mask))

    for kind in MODULE_KINDS:
        module, x, mask, lengths = _module_and_input(kind)
        module, x, on_device = module.cuda(), x.cuda(), lengths.cuda()
        for train in (True, False):
            module.train(train)
            no_sync(lambda: _call(module, kind, x, lengths=on_device))
            no_sync(lambda: _call(module, kind, x, lengths=lengths))
            for scope in scopes(lengths, mask):
                no_sync(lambda: _call(module, kind, x), scope)
    x, lengths, mask = _waves()
    net, x = seqnorm.make_padding_safe(_conv_stack()).cuda(), x.cuda()
    for train in (True, False):
        net.train(train)
        for scope in scopes(lengths, mask):
            no_sync(lambda: net(x), scope)
    if importlib.util.find_spec("transformers"):
        from seqnorm import hf

        audio, lengths = torch.randn(2, 1600).cuda(), torch.tensor([1600, 1000])
        for name in ("wav2vec2", "hubert"):
            model = seqnorm.make_padding_safe(hf.build(name)).cuda()
            for scope in scopes(lengths, torch.arange(1600)[None, :] >= lengths[:, None]):
                with torch.no_grad():
                    no_sync(lambda: model(audio), scope)


def test_lengths_compile_whole():
    """Under torch.compile lengths are checked on the device too, so a norm given
    ``lengths=`` compiles into one graph (it broke on the host read before)."""
    torch._dynamo.reset()
    ln = seqnorm.LayerNorm(D)
    x, lengths = torch.randn(2, 5, D), torch.tensor([5, 3])
    compiled = torch.compile(lambda x, lengths: ln(x, lengths=lengths), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, lengths), ln(x, lengths=lengths))
    # the message names T, not its value: formatting a traced size would recompile for every other T
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, T\] \(the sequence length T\)"):
        compiled(x, torch.tensor([6, 3]))
