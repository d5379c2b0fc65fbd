"""Modules: torch's arguments, defaults, parameter/buffer names and state_dict
keys; state_dicts load both ways; training/eval behaviour as torch.nn."""

import inspect

import numpy as np
import pytest
import torch
from torch import nn

import seqnorm
from seqnorm import reference as ref

from conftest import to_np


def _defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def test_constructor_defaults_mirror_torch():
    assert _defaults(seqnorm.LayerNorm) == _defaults(nn.LayerNorm)
    ours, theirs = _defaults(seqnorm.RMSNorm), _defaults(nn.RMSNorm)
    assert {k: ours[k] for k in theirs} == theirs
    assert {k: ours[k] for k in set(ours) - set(theirs)} == {"offset": 0.0, "casting": "float32"}   # keyword-only
    ours, theirs = _defaults(seqnorm.SeqBatchNorm), _defaults(nn.BatchNorm1d)
    assert {k: ours[k] for k in theirs} == theirs
    assert set(ours) - set(theirs) == {"batch_first", "channels_first"}   # keyword-only additions


@pytest.mark.parametrize("ours_cls,theirs_cls,args", [
    (seqnorm.LayerNorm, nn.LayerNorm, dict(normalized_shape=(3, 8))),
    (seqnorm.LayerNorm, nn.LayerNorm, dict(normalized_shape=8, bias=False)),
    (seqnorm.LayerNorm, nn.LayerNorm, dict(normalized_shape=8, elementwise_affine=False)),
    (seqnorm.RMSNorm, nn.RMSNorm, dict(normalized_shape=8)),
    (seqnorm.SeqBatchNorm, nn.BatchNorm1d, dict(num_features=8)),
    (seqnorm.SeqBatchNorm, nn.BatchNorm1d, dict(num_features=8, affine=False)),
    (seqnorm.SeqBatchNorm, nn.BatchNorm1d, dict(num_features=8, bias=False)),
    (seqnorm.SeqBatchNorm, nn.BatchNorm1d, dict(num_features=8, track_running_stats=False)),
])
def test_state_dict_loads_both_ways(ours_cls, theirs_cls, args):
    ours, theirs = ours_cls(**args), theirs_cls(**args)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
        for name, b in theirs.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 2.0)
            else:
                b.fill_(7)
    ours.load_state_dict(theirs.state_dict())                 # torch -> seqnorm (strict)
    back = theirs_cls(**args)
    back.load_state_dict(ours.state_dict())                   # seqnorm -> torch (strict)
    for (k, a), (_, c) in zip(back.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, c), k
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_bias_false_registers_no_parameter():
    assert seqnorm.LayerNorm(4, bias=False).bias is None
    bn = seqnorm.SeqBatchNorm(4, bias=False)
    assert bn.bias is None and [n for n, _ in bn.named_parameters()] == ["weight"]
    assert seqnorm.SeqBatchNorm(4, affine=False).weight is None
    assert "bias" not in dict(seqnorm.AddNorm(4, norm="rms").named_parameters())


def test_layer_norm_module_is_torch_layer_norm_without_padding():
    torch.manual_seed(0)
    ours, theirs = seqnorm.LayerNorm((5, 6)), nn.LayerNorm((5, 6))
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 5, 6)
    assert isinstance(ours, nn.LayerNorm)
    assert torch.equal(ours(x), theirs(x))
    rms, trms = seqnorm.RMSNorm(6, eps=1e-6), nn.RMSNorm(6, eps=1e-6)
    assert isinstance(rms, nn.RMSNorm)
    assert torch.equal(rms(x), trms(x))


def _as_bn1d_input(x):
    return x.transpose(1, 2)


@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
def test_seq_batch_norm_trains_like_batchnorm1d(momentum):
    torch.manual_seed(1)
    ours, theirs = seqnorm.SeqBatchNorm(6, momentum=momentum), nn.BatchNorm1d(6, momentum=momentum)
    for step in range(4):
        x = torch.randn(3, 5 + step, 6) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(_as_bn1d_input(x)).transpose(1, 2))
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(ours(x), theirs(_as_bn1d_input(x)).transpose(1, 2))
    # without running statistics, eval uses batch statistics, as torch
    a, b = seqnorm.SeqBatchNorm(6, track_running_stats=False).eval(), nn.BatchNorm1d(6, track_running_stats=False).eval()
    torch.testing.assert_close(a(x), b(_as_bn1d_input(x)).transpose(1, 2))


def test_seq_batch_norm_masked_running_stats_and_counter(backend):
    torch.manual_seed(2)
    bn = seqnorm.SeqBatchNorm(4, momentum=None)
    x = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 2, 0])
    x_poisoned = x.clone()
    x_poisoned[1, 2:] = float("nan")
    x_poisoned[2] = float("inf")
    y = bn(x_poisoned, lengths=lengths)
    real = torch.cat([x[0], x[1, :2]])                          # the 7 real tokens
    torch.testing.assert_close(bn.running_mean, real.mean(0))   # cumulative average of one batch
    torch.testing.assert_close(bn.running_var, real.var(0))     # unbiased, as torch
    assert bn.num_batches_tracked.item() == 1
    assert torch.isfinite(y).all() and torch.all(y[1, 2:] == 0) and torch.all(y[2] == 0)
    # an all-padding batch changes nothing, not even the counter
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    y = bn(torch.full((2, 3, 4), float("nan")), padding_mask=torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(y, torch.zeros(2, 3, 4))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_seq_batch_norm_batch_first_false():
    torch.manual_seed(3)
    a, b = seqnorm.SeqBatchNorm(4), seqnorm.SeqBatchNorm(4, batch_first=False)
    x = torch.randn(2, 5, 4)                       # (B, T, D)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    ya = a(x, padding_mask=mask)
    yb = b(x.transpose(0, 1), padding_mask=mask)   # (T, B, D) with the same (B, T) mask
    assert yb.shape == (5, 2, 4)
    torch.testing.assert_close(ya, yb.transpose(0, 1))
    torch.testing.assert_close(a.running_var, b.running_var)
    assert "batch_first=False" in repr(b)


def test_power_norm_module_follows_algorithm_1_over_steps(backend):
    """Three training steps of the module against the reference's Algorithm 1."""
    rng = np.random.default_rng(4)
    pn = seqnorm.PowerNorm(5, momentum=0.2).double()
    with torch.no_grad():
        pn.weight.copy_(torch.tensor(rng.normal(size=5)))
        pn.bias.copy_(torch.tensor(rng.normal(size=5)))
    phi, nu = np.ones(5), np.zeros(5)
    w, b = to_np(pn.weight), to_np(pn.bias)
    for step in range(3):
        x_np = rng.normal(size=(3, 6, 5)) * (step + 1)
        mask = rng.random((3, 6)) < 0.3
        x = torch.tensor(x_np, requires_grad=True)
        y = pn(x, padding_mask=torch.tensor(mask))
        ref_y, cache = ref.power_norm_forward(x_np, phi, w, b, pn.eps, mask)
        np.testing.assert_allclose(to_np(y), ref_y, rtol=1e-12)
        dy = rng.normal(size=x_np.shape)
        y.backward(torch.tensor(dy))
        dx, _, _, nu = ref.power_norm_backward(dy, cache, nu, factor=0.2)
        phi = ref.running_update(phi, cache["batch_phi"], 0.2)
        np.testing.assert_allclose(to_np(x.grad), dx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(to_np(pn.running_phi), phi, rtol=1e-12)
        np.testing.assert_allclose(to_np(pn.running_nu), nu, rtol=1e-10)
    assert pn.num_batches_tracked.item() == 3
    pn.eval()   # eval divides by the running ψ² and updates nothing
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    expected = x / torch.sqrt(pn.running_phi + pn.eps) * pn.weight + pn.bias
    torch.testing.assert_close(pn(x), expected)
    assert pn.num_batches_tracked.item() == 3


def test_add_norm_module():
    torch.manual_seed(5)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    add = seqnorm.AddNorm(8, prenorm=True)
    add.load_state_dict(ln.state_dict())
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    y, s = add(x, r)
    assert torch.equal(y, ln(x + r)) and torch.equal(s, x + r)
    rms = seqnorm.AddNorm(8, norm="rms")
    assert rms.eps is None
    assert torch.equal(rms(x, r), nn.RMSNorm(8)(x + r))
    assert "prenorm=True" in repr(add)


@pytest.mark.parametrize("module", [
    seqnorm.LayerNorm(6), seqnorm.RMSNorm(6), seqnorm.SeqBatchNorm(6), seqnorm.PowerNorm(6),
])
def test_padding_outputs_and_grads_are_zero(module, backend):
    torch.manual_seed(6)
    x = torch.randn(3, 4, 6)
    x[0, 3] = float("nan")
    x = x.requires_grad_()
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 3] = True
    mask[2] = True
    y = module.train()(x, padding_mask=mask)
    assert torch.all(y[mask] == 0) and torch.isfinite(y).all()
    y.pow(2).sum().backward()
    assert torch.all(x.grad[mask] == 0) and torch.isfinite(x.grad).all()
    for p in module.parameters():
        assert torch.isfinite(p.grad).all()
    for b in module.buffers():
        assert torch.isfinite(b).all()
