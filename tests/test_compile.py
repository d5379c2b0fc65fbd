"""torch.compile over every module kind, on every backend: the same outputs,
gradients and running statistics as eager mode, over two training steps
(PowerNorm with a non-zero ν, whose backward reads it), then one eval step.

fullgraph=True for every kind but PowerNorm, whose training step runs eagerly
inside a compiled model (see ``functional._power_norm_training``: a compiled
backward read the ψ² that the same step had updated). On the triton backend
without a GPU the custom ops run through Triton's interpreter."""

import importlib.util

import pytest
import torch

import seqnorm
from seqnorm import kinds

BACKENDS = ["torch", "fused"] + (["triton"] if importlib.util.find_spec("triton") else [])
D = 16


def _steps(module, kind, x, mask, compiled):
    def f(t):
        return module(t, t, padding_mask=mask) if kind == "add_layer" else module(t, padding_mask=mask)

    fn = torch.compile(f, fullgraph=kind != "power") if compiled else f
    out = []
    for train in (True, True, False):
        module.train(train)
        xl = x.clone().requires_grad_()
        y = fn(xl)
        (y.float().sin().sum()).backward()
        out += [y.detach(), xl.grad, *(p.grad.clone() for p in module.parameters())]
        module.zero_grad()
    return out + [b.clone() for b in module.buffers()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "add_layer", "masked_batch", "power", "group", "instance"])
def test_compiled_equals_eager(kind, backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    channels_first = kinds.kind(kind).channels_first
    x = torch.randn(*((3, D, 9) if channels_first else (3, 9, D)), generator=gen)   # mask (B, T) = (3, 9)
    mask = torch.rand(3, 9, generator=gen) < 0.3
    mask[0, :2] = False
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        extra = {"group": dict(num_groups=4), "instance": dict(affine=True, track_running_stats=True)}
        module = kinds.build(kind, D, **extra.get(kind, {}))
        if kind == "power":
            with torch.no_grad():
                module.running_nu.fill_(0.05)
        with seqnorm.use_backend(backend):
            results.append(_steps(module, kind, x, mask, compiled))
    # Inductor reorders the torch backend's composite group sums (parameter grads move ~2e-6)
    atol = 1e-5 if channels_first and backend == "torch" else 1e-6
    for a, c in zip(*results):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=atol)
