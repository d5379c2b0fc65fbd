"""The time layers' length arithmetic on Python ints (seqnorm.host_lengths), and the padding
context's host lengths (issue 27: make_padding_safe's host cost).

* ``host_lengths.output_lengths`` is ``time_layers.output_lengths`` (the tensor rule) for every
  layer kind and geometry of a grid, every length 0–24;
* ``host_lengths.reads_padding`` says True wherever a real output reads a padded step (NaN
  put there reaches it), and without dilation only there;
* a padding-safe stack keeps its host lengths as ints, its rates' masks across the calls of
  a kept context, and gives the same outputs as with lengths the hooks cannot read (the
  sync-free policy a CUDA tensor gets, forced);
* an attention module's key mask from host lengths is ``key_mask`` of them, made once per
  rate and context, and the hooks give what they give with lengths they cannot read.
"""

import itertools

import pytest
import torch
from torch import nn

import seqnorm
from seqnorm import host_lengths as hl, masks, running
from seqnorm.attention_safe import key_mask
from seqnorm import time_layers as tl


def _layers():
    for k, s, p, d in itertools.product((1, 2, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2)):
        yield nn.Conv1d(1, 1, k, stride=s, padding=p, dilation=d)
        for op in range(max(s, d)):
            yield nn.ConvTranspose1d(1, 1, k, stride=s, padding=p, dilation=d, output_padding=op)
        if p <= k // 2:
            for ceil in (False, True):
                yield nn.MaxPool1d(k, stride=s, padding=p, dilation=d, ceil_mode=ceil)
                if d == 1:
                    for include in (False, True):
                        yield nn.AvgPool1d(k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=include)
    for k, d in itertools.product((1, 2, 3, 4), (1, 2)):
        yield nn.Conv1d(1, 1, k, padding="same", dilation=d)


LAYERS = list(_layers())
LENGTHS = tuple(range(25))


@pytest.mark.parametrize("layer", LAYERS, ids=repr)
def test_output_lengths_on_ints_are_the_tensor_rule(layer):
    g = tl.geometry(layer)
    assert hl.output_lengths(g, LENGTHS) == tuple(tl.output_lengths(g, torch.tensor(LENGTHS)).tolist())


@pytest.mark.parametrize("layer", LAYERS, ids=repr)
def test_reads_padding_is_whether_a_real_output_sees_a_padded_step(layer):
    g = tl.geometry(layer)
    steps = 24
    with torch.no_grad():
        if isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)):
            layer.weight.fill_(1.0)
            layer.bias.zero_()
        for n in range(1, steps + 1):
            out_n = hl.output_lengths(g, (n,))[0]
            x = torch.ones(1, 1, steps)
            x[..., n:] = float("nan")
            try:
                y = layer(x)
            except RuntimeError:       # torch refuses a window that starts in the right padding
                continue
            sees = bool(y[..., :out_n].isnan().any())
            says = hl.reads_padding(g, (n,), (out_n,), steps)
            assert says or not sees, (n, out_n)
            if g.dilation == 1:
                assert says == sees, (n, out_n)


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 8, 5, stride=2), nn.GroupNorm(2, 8), nn.GELU(),
                         nn.Conv1d(8, 8, 3, padding=2), nn.MaxPool1d(3, stride=2, ceil_mode=True),
                         nn.AvgPool1d(2, ceil_mode=True, count_include_pad=False), nn.BatchNorm1d(8),
                         nn.ConvTranspose1d(8, 4, 4, stride=3, padding=1)).eval()     # rates 64, 30, 32, 16, 8, 23


def test_host_lengths_are_ints_and_a_kept_context_keeps_its_masks():
    net = seqnorm.make_padding_safe(_stack())
    x = torch.randn(2, 3, 64)
    with torch.no_grad(), seqnorm.padding(lengths=torch.tensor([64, 37])) as ctx:
        net(x)
        rates = ctx.known_steps()
        assert len(rates) >= 4
        assert all(type(ctx.host_lengths_at(r)) is tuple for r in rates)
        built = {r: ctx.mask_at(r, x.device) for r in rates}
        net(x)          # the same lengths again: every rate's mask stays the one built
        assert all(ctx.mask_at(r, x.device) is built[r] for r in rates)
        assert all(ctx.lengths_at(r).tolist() == list(ctx.host_lengths_at(r)) for r in rates)


def test_host_path_computes_what_the_sync_free_path_does(monkeypatch):
    net = seqnorm.make_padding_safe(_stack())
    x = torch.randn(2, 3, 64)
    lengths = torch.tensor([64, 37])
    with torch.no_grad(), seqnorm.padding(lengths=lengths) as ctx:
        host = net(x)
        host_rates = {r: ctx.lengths_at(r).tolist() for r in ctx.known_steps()}
    monkeypatch.setattr(running, "sync_free", lambda t: True)     # lengths as a CUDA tensor's: never read
    with torch.no_grad(), seqnorm.padding(lengths=lengths) as ctx:
        device = net(x)
        assert all(ctx.host_lengths_at(r) is None for r in ctx.known_steps())
        device_rates = {r: ctx.lengths_at(r).tolist() for r in ctx.known_steps()}
    assert host_rates == device_rates
    torch.testing.assert_close(host, device, rtol=0, atol=1e-6)


def test_host_lengths_at_is_none_for_lengths_it_must_not_read():
    ctx = masks.PaddingContext(None, torch.tensor([5.0, 3.0]), True)       # float lengths: the general path's error
    ctx.lengths_at(5)
    assert ctx.host_lengths_at(5) is None
    assert ctx.host_lengths_at(7) is None                                  # no lengths known at 7 steps
    ctx = masks.PaddingContext(None, [5, 3], True)
    ctx.lengths_at(5)
    assert ctx.host_lengths_at(5) == (5, 3)


class _TwoAttentions(nn.Module):
    """A strided convolution, then two attention modules at its rate (one key mask for both)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 4, stride=2)
        self.first = nn.MultiheadAttention(8, 2, batch_first=True)
        self.second = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):                                    # (B, T, 3) → (B, T', 8)
        h = self.conv(x.transpose(1, 2)).transpose(1, 2)
        h = self.first(h, h, h, need_weights=False)[0]
        return self.second(h, h, h, need_weights=False)[0]


def _key_masks(net):
    """The key_padding_mask each attention module of ``net`` receives, in call order."""
    seen = []
    for m in (net.first, net.second):
        m.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("key_padding_mask")),
                                    with_kwargs=True)
    return seen


@pytest.mark.parametrize("lengths", [[20, 11, 5], [20, 11, 0]], ids=["negated rate mask", "an empty sequence"])
def test_attention_key_mask_from_host_lengths_is_made_once_per_rate(lengths):
    torch.manual_seed(0)
    net = seqnorm.make_padding_safe(_TwoAttentions().eval())
    seen = _key_masks(net)          # registered after seqnorm's hooks: sees the mask they made
    x = torch.randn(3, 20, 3)
    with torch.no_grad(), seqnorm.padding(lengths=torch.tensor(lengths)) as ctx:
        net(x)
        steps = net.conv(x.transpose(1, 2)).shape[2]
        keep = ctx.at_rate("keys", steps, x.device, lambda: None)
        assert torch.equal(keep, key_mask(ctx.lengths_at(steps), steps))     # an empty sequence keeps every key
        net(x)              # the same lengths again: the key mask is not made again
        assert ctx.at_rate("keys", steps, x.device, lambda: None) is keep
    assert len(seen) == 4 and all(torch.equal(m, ~keep) for m in seen)


def test_attention_hooks_on_host_lengths_compute_what_the_sync_free_path_does(monkeypatch):
    torch.manual_seed(0)
    net = seqnorm.make_padding_safe(_TwoAttentions().eval())
    x, lengths = torch.randn(3, 20, 3), torch.tensor([20, 11, 5])
    with torch.no_grad(), seqnorm.padding(lengths=lengths):
        host = net(x)
    monkeypatch.setattr(running, "sync_free", lambda t: True)     # lengths as a CUDA tensor's: never read
    with torch.no_grad(), seqnorm.padding(lengths=lengths):
        device = net(x)
    assert torch.equal(host, device)


def test_a_time_layer_works_out_its_host_lengths_once_per_lengths():
    """A new batch of the same lengths reuses the layer's plan (its output lengths and fill
    decision); other lengths get a new one, and the outputs are a fresh model's."""
    from seqnorm import padding_safe

    net, fresh = seqnorm.make_padding_safe(_stack()), seqnorm.make_padding_safe(_stack())
    x = torch.randn(2, 3, 64)
    conv = net[0]
    with torch.no_grad():
        for lengths, same_plan in (([64, 37], False), ([64, 37], True), ([50, 64], False)):
            before = padding_safe._plans.get(conv)
            with seqnorm.padding(lengths=torch.tensor(lengths)):
                y = net(x)
            with seqnorm.padding(lengths=torch.tensor(lengths)):
                expected = fresh(x)
            assert (padding_safe._plans[conv] is before) == same_plan
            assert padding_safe._plans[conv].lengths == tuple(lengths)
            assert torch.equal(y, expected)


def test_host_mask_at_is_the_host_lengths_mask_and_never_a_given_one():
    given = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    ctx = masks.PaddingContext(given, None, True)
    ctx.lengths_at(6)
    assert ctx.host_mask_at(6, given.device) is None            # the given mask's rate: handed out as given
    ctx.record(3, (3, 2))
    assert torch.equal(ctx.host_mask_at(3, given.device), masks.lengths_to_padding_mask(torch.tensor([3, 2]), 3))
    assert ctx.host_mask_at(3, given.device) is ctx.mask_at(3, given.device)
    assert ctx.host_mask_at(5, given.device) is None            # no lengths known at 5 steps
