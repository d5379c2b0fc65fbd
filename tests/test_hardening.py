"""Hardening: non-finite batches, zero variance, serialization, compile/export,
train/eval switching — for every module."""

import copy
import io
import pickle
import warnings

import pytest
import torch

import seqnorm
from seqnorm import kinds
from seqnorm.running import NonFiniteStatisticsWarning

D = 8


#: the module kinds (seqnorm.kinds) checked here
NAMES = ("layer", "rms", "masked_batch", "power", "add_layer", "sync_batch")


def modules():
    return {name: kinds.build(name, D) for name in NAMES}


def _call(name, mod, x, **kw):
    return mod(x, x, **kw) if name == "add_layer" else mod(x, **kw)


def _trained(name, mod):
    torch.manual_seed(0)
    mod.train()
    for _ in range(3):
        _call(name, mod, torch.randn(4, 5, D) * 2 + 1)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mod


@pytest.mark.parametrize("name", ["masked_batch", "power", "sync_batch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_leaves_running_statistics_and_warns(name, bad):
    mod = _trained(name, modules()[name])
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    x = torch.randn(3, 4, D)
    x[1, 2, 5] = bad
    with pytest.warns(NonFiniteStatisticsWarning, match="left unchanged"):
        y = _call(name, mod, x)
    for k, v in mod.state_dict().items():
        if k in before and not k.endswith(("weight", "bias")):
            assert torch.equal(v, before[k]), k
    assert not torch.isfinite(y[..., 5]).all()      # the bad feature's statistic is bad …
    assert torch.isfinite(y[..., :5]).all()          # … the others are not touched


@pytest.mark.parametrize("backend", ["torch", "fused", "reference"])
@pytest.mark.parametrize("where", ["input", "gradient"])
def test_non_finite_backward_leaves_running_nu_and_warns(backend, where):
    """PowerNorm's ν is updated in the backward from the gradient: NaN/Inf at a real
    token, or an Inf gradient (a loss-scaling overflow step), must not poison it."""
    torch.manual_seed(1)
    with seqnorm.use_backend(backend):
        pn = seqnorm.PowerNorm(D).train()
        for _ in range(3):                          # a ν that is not all zeros
            pn(torch.randn(4, 5, D) * 2 + 1).pow(2).sum().backward()
        nu = pn.running_nu.clone()
        assert nu.abs().sum() > 0
        x = torch.randn(3, 4, D)
        dy = torch.randn(3, 4, D)
        if where == "input":
            x[1, 2, 5] = float("nan")
        else:
            dy[0, 1, 3] = float("inf")
        x.requires_grad_()
        phi = pn.running_phi.clone()
        with pytest.warns(NonFiniteStatisticsWarning) as caught:
            pn(x).backward(dy)
        messages = " | ".join(str(w.message) for w in caught)
        assert "running_nu was left unchanged" in messages
        # a NaN input also stops the forward's ψ² update; an Inf gradient does not concern it
        assert ("running statistics were left unchanged" in messages) == (where == "input")
        assert torch.equal(pn.running_nu, nu)
        assert torch.equal(pn.running_phi, phi) == (where == "input")
        pn(torch.randn(3, 4, D)).sum().backward()   # a finite batch moves it again
        assert not torch.equal(pn.running_nu, nu) and torch.isfinite(pn.running_nu).all()


@pytest.mark.parametrize("name", ["layer", "rms", "add_layer"])
def test_non_finite_token_stays_in_its_row(name):
    mod = modules()[name].train()
    x = torch.randn(3, 4, D)
    x[1, 2, 5] = float("nan")
    y = _call(name, mod, x)
    bad = torch.zeros(3, 4, dtype=torch.bool)
    bad[1, 2] = True
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()


def test_zero_variance_and_eps_zero():
    x = torch.full((2, 3, D), 7.0)
    ln = seqnorm.LayerNorm(D)
    with torch.no_grad():
        ln.bias.fill_(0.25)
    assert torch.equal(ln(x), torch.full_like(x, 0.25))     # x̂ = 0 exactly, output = bias
    bn = seqnorm.SeqBatchNorm(D)
    assert torch.equal(bn(x), torch.zeros_like(x))
    rms = seqnorm.RMSNorm(D, eps=0.0)
    assert torch.equal(rms(torch.zeros(1, 2, D)).isnan(), torch.ones(1, 2, D, dtype=torch.bool))
    # eps = 0 with a constant row is 0/0: NaN, as the maths says (documented), never an exception
    ln0 = seqnorm.LayerNorm(D, eps=0.0)
    assert torch.isnan(ln0(x)).all()


@pytest.mark.parametrize("name", list(modules()))
def test_pickle_deepcopy_and_weights_only_state_dict(name, tmp_path):
    mod = _trained(name, modules()[name]).eval()
    x = torch.randn(2, 3, D)
    expected = _call(name, mod, x)
    for clone in (pickle.loads(pickle.dumps(mod)), copy.deepcopy(mod)):
        assert torch.equal(_call(name, clone.eval(), x), expected)
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    fresh = modules()[name]
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(_call(name, fresh.eval(), x), expected)


@pytest.mark.parametrize("name", list(modules()))
def test_train_eval_switching(name):
    mod = _trained(name, modules()[name])
    x = torch.randn(2, 3, D)
    mod.eval()
    a = _call(name, mod, x)
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    mod.train()
    _call(name, mod, torch.randn(2, 3, D))
    mod.eval()
    b = _call(name, mod, x)
    if name in ("layer", "rms", "add_layer"):
        assert torch.equal(a, b)        # no state: train/eval do not matter
    else:                                # one more training batch moved the running statistics
        assert not torch.equal(a, b)
        mod.load_state_dict(state)
        assert torch.equal(_call(name, mod, x), a)


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_torch_export(backend):
    mask = torch.tensor([[False, False, True], [False, True, True]])
    x = torch.randn(2, 3, D)
    with seqnorm.use_backend(backend):
        for name, mod in modules().items():
            mod = _trained(name, mod).eval()
            args = (x, x) if name == "add_layer" else (x,)
            ep = torch.export.export(mod, args, kwargs={"padding_mask": mask})
            torch.testing.assert_close(ep.module()(*args, padding_mask=mask), mod(*args, padding_mask=mask))


def test_torch_compile_model_with_every_module():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = torch.nn.ModuleDict({k: v for k, v in modules().items() if k != "add_layer"})
            self.add = seqnorm.AddNorm(D, norm="rms")

        def forward(self, x, mask):
            h = x
            for m in self.mods.values():
                h = m(h, padding_mask=mask)
            return self.add(h, x, padding_mask=mask)

    torch.manual_seed(1)
    net = Net()
    x = torch.randn(3, 4, D)
    mask = torch.tensor([[False] * 4, [False, False, True, True], [False] + [True] * 3])
    eager_net = copy.deepcopy(net)
    compiled = torch.compile(net)
    for training in (True, False):
        net.train(training)
        eager_net.train(training)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = compiled(x, mask)
        torch.testing.assert_close(got, eager_net(x, mask), atol=1e-5, rtol=1e-5)
    for (k, a), (_, b) in zip(net.state_dict().items(), eager_net.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
