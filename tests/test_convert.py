"""seqnorm.convert and the seqnorm.padding context on existing models."""

import copy
import warnings

import pytest
import torch
from torch import nn

import seqnorm


def _encoder(batch_first=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)


def _batch(batch_first=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
    return (x if batch_first else x.transpose(0, 1)), mask


@pytest.mark.parametrize("training", [True, False])
def test_layer_norm_conversion_is_bit_identical_and_state_dicts_round_trip(training):
    ref = _encoder().train(training)
    conv = seqnorm.convert(_encoder(), "layer").train(training)
    assert all(type(m) is not nn.LayerNorm for m in conv.modules())
    assert sum(isinstance(m, seqnorm.LayerNorm) for m in conv.modules()) == 5
    x, mask = _batch()
    assert torch.equal(conv(x, src_key_padding_mask=mask), ref(x, src_key_padding_mask=mask))
    # state_dicts load both ways, strictly
    fresh = seqnorm.convert(_encoder(seed=7), "layer")
    fresh.load_state_dict(ref.state_dict())
    back = _encoder(seed=8)
    back.load_state_dict(fresh.state_dict())
    for (k, a), (_, b) in zip(back.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))

    def forward(self, x):  # x: (N, 8)
        return self.blocks(self.bn(self.rms(self.ln(self.proj(x)))))


def test_user_model_to_batch_carries_statistics():
    torch.manual_seed(2)
    model = UserModel()
    model.train()
    for _ in range(3):
        model(torch.randn(32, 8) * 2 + 1)
    model.eval()
    x = torch.randn(10, 8)
    before = model(x)
    bn_state = {k: v.clone() for k, v in model.bn.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # BatchNorm1d → channels_first SeqBatchNorm: its own layout, nothing lost
        conv = seqnorm.convert(model, "batch")
    assert isinstance(conv.bn, seqnorm.SeqBatchNorm) and isinstance(conv.blocks[1], seqnorm.SeqBatchNorm)
    assert conv.bn.channels_first and not conv.blocks[1].channels_first
    for k, v in bn_state.items():
        assert torch.equal(conv.bn.state_dict()[k], v), k
    # the BatchNorm itself computes the same thing on (N, D) tokens
    h = torch.randn(10, 8)
    ref_bn = nn.BatchNorm1d(8).eval()
    ref_bn.load_state_dict(bn_state)
    torch.testing.assert_close(conv.bn.eval()(h), ref_bn(h))
    assert not conv.training and before.shape == conv(x).shape


def test_batch_to_power_uses_the_quadratic_mean_and_power_to_batch_warns():
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.0, 3.0]))
        bn.running_var.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # nothing is lost: no warning
        pn = seqnorm.convert(bn, "power")
    torch.testing.assert_close(pn.running_phi, torch.tensor([1.5, 5.0, 2.0, 13.0]))
    assert pn.channels_first
    with pytest.warns(seqnorm.ConversionWarning, match="PowerNorm keeps no running mean"):
        back = seqnorm.convert(pn, "batch")
    torch.testing.assert_close(back.running_var, pn.running_phi)
    assert torch.equal(back.running_mean, torch.zeros(4))


def test_power_to_sync_power_carries_every_buffer_and_batch_to_sync_power_the_quadratic_mean():
    pn = seqnorm.PowerNorm(4, momentum=0.2)
    with torch.no_grad():
        pn.running_phi.copy_(torch.tensor([1.5, 5.0, 2.0, 13.0]))
        pn.running_nu.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        pn.num_batches_tracked.fill_(7)
        pn.weight.fill_(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # nothing is lost: no warning
        sync = seqnorm.convert(pn, "sync_power")
    assert isinstance(sync, seqnorm.SyncPowerNorm) and sync.momentum == 0.2
    for k, v in pn.state_dict().items():
        assert torch.equal(sync.state_dict()[k], v), k
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.0, 3.0]))
        bn.running_var.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sync = seqnorm.convert(bn, "sync_power")
    assert sync.channels_first
    torch.testing.assert_close(sync.running_phi, torch.tensor([1.5, 5.0, 2.0, 13.0]))


def test_layer_to_rms_warns_about_a_dropped_bias_only_when_nonzero():
    ln = nn.LayerNorm(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rms = seqnorm.convert(ln, "rms")          # zero bias: nothing lost, no warning
    assert isinstance(rms, seqnorm.RMSNorm) and rms.eps == ln.eps
    with torch.no_grad():
        ln.bias.fill_(0.5)
        ln.weight.fill_(2.0)
    with pytest.warns(seqnorm.ConversionWarning, match="bias was dropped"):
        rms = seqnorm.convert(ln, "rms")
    assert torch.equal(rms.weight, ln.weight)


def test_convert_errors():
    with pytest.raises(ValueError, match="to must be one of"):
        seqnorm.convert(nn.LayerNorm(4), "group")
    with pytest.raises(ValueError, match=r"normalized_shape=\[3, 4\]"):
        seqnorm.convert(nn.LayerNorm((3, 4)), "batch")


def test_padding_reaches_the_norms_of_a_converted_transformer():
    """Masked BN inside nn.TransformerEncoder: with seqnorm.padding, what padded tokens
    contain no longer changes any real token's output; without it, it does."""
    model = seqnorm.convert(_encoder(), "batch").train()
    assert model.layers[0].activation_relu_or_gelu == 0   # torch's LayerNorm fast path is off
    x, mask = _batch()
    other = x.clone()
    other[mask] = 1e3 * torch.randn(int(mask.sum()), 16)
    real = ~mask

    def run(inp, use_context):
        torch.manual_seed(0)
        m = seqnorm.convert(_encoder(), "batch").train()
        if use_context:
            with seqnorm.padding(mask):
                return m(inp, src_key_padding_mask=mask)
        return m(inp, src_key_padding_mask=mask)

    with_ctx = run(x, True), run(other, True)
    torch.testing.assert_close(with_ctx[0][real], with_ctx[1][real], atol=1e-5, rtol=1e-5)
    assert torch.all(with_ctx[0][mask] == 0)       # the final LayerNorm zeroes padding too
    without = run(x, False), run(other, False)
    assert (without[0][real] - without[1][real]).abs().max() > 1e-2


def test_padding_context_with_sequence_first_activations():
    torch.manual_seed(3)
    model = seqnorm.convert(_encoder(batch_first=False), "layer").train()
    x, mask = _batch(batch_first=False)             # x: (T, B, D), mask: (B, T)
    with seqnorm.padding(mask, batch_first=False):
        y = model(x, src_key_padding_mask=mask)
    assert torch.all(y.transpose(0, 1)[mask] == 0)
    assert torch.all(y.transpose(0, 1)[~mask] != 0)
    with pytest.raises(ValueError, match="needs padding_mask or lengths"):
        seqnorm.padding()
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(B, T\) \[from seqnorm.padding\]"):
        with seqnorm.padding(mask[:, :3]):
            seqnorm.LayerNorm(16)(torch.randn(3, 5, 16))


def test_a_conv_stack_with_batchnorm1d_converts_without_touching_its_code():
    """BatchNorm1d inside a conv stack takes (N, C, L): after convert it is a
    channels_first SeqBatchNorm — same outputs, gradients and running statistics
    without padding (train and eval), and with padding (seqnorm.padding, (N, L))
    the padded steps no longer move the real steps' statistics."""
    torch.manual_seed(3)
    stack = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 5, 1))
    conv = seqnorm.convert(copy.deepcopy(stack), "batch")
    assert isinstance(conv[1], seqnorm.SeqBatchNorm) and conv[1].channels_first
    x = torch.randn(3, 4, 11)
    for train in (True, True, False):
        stack.train(train), conv.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = stack(xa), conv(xb)
        ya.pow(2).sum().backward(), yb.pow(2).sum().backward()
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(conv[1], name), getattr(stack[1], name))
    # padding: the BatchNorm's output at real steps ignores what the padded steps hold
    bn = conv[1].train()
    h = torch.randn(3, 6, 11)
    lengths = torch.tensor([11, 7, 4])
    with seqnorm.padding(lengths=lengths):
        a = bn(h)
        h2 = h.clone()
        h2[1, :, 7:] = 1e3
        h2[2, :, 4:] = -5.0
        b = bn(h2)
    real = seqnorm.lengths_to_padding_mask(lengths, 11).logical_not()      # (N, L)
    torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real])
    assert torch.all(a.transpose(1, 2)[~real] == 0)
    with pytest.raises(ValueError, match=r"channels_first=True\) expects input of shape \(N, 6, L\)"):
        bn(torch.randn(3, 11, 6))
