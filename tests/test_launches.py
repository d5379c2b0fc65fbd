"""Launches per module call on the CUDA path, counted without a GPU (issue 16's budget).

A launch is a Triton kernel or a torch op that starts a CUDA kernel (views,
``empty`` allocations and metadata are not); ``seqnorm.tools.launches``
counts both, with the running-statistics policy a CUDA tensor gets forced on
CPU tensors and the kernels run by Triton's interpreter. Each module call —
forward including its running-statistics update, backward including the
parameter gradients — must stay within the budget, for a module in bfloat16
and in float32 (a bfloat16 input both times). Counts do not depend on the
input's size: a tiny input measures them.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from seqnorm.tools.launches import BUDGET, MODULE_CALLS, LaunchCounter, count, module_call_launches  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16_module", "fp32_module"])
@pytest.mark.parametrize("label,kind,training,kwargs", MODULE_CALLS, ids=[c[0] for c in MODULE_CALLS])
def test_module_call_within_the_launch_budget(label, kind, training, kwargs, param_dtype):
    fwd, bwd = module_call_launches(kind, training, kwargs, torch.bfloat16, param_dtype=param_dtype, device=DEVICE)
    fwd_budget, bwd_budget = BUDGET[label]
    assert sum(fwd.values()) <= fwd_budget, f"{label} forward: {dict(fwd)}"
    assert sum(bwd.values()) <= bwd_budget, f"{label} backward: {dict(bwd)}"
    # everything launched is one of seqnorm's kernels: no torch op between them
    assert all(name.startswith("triton:") for name in (fwd + bwd)), dict(fwd + bwd)


def test_the_counter_counts_kernels_and_ops_but_not_views_or_allocations():
    x = torch.randn(4, 6)
    launched = count(lambda: (x.view(6, 4), x.t(), x.reshape(24)[:3], torch.empty(5), x.new_empty(3),
                              x.add(1), x.sum(0), torch.zeros(3)))
    assert launched == {"add": 1, "sum": 1, "zeros": 1}
    # the torch backend's SeqBatchNorm is many small ops: the counter sees them
    fwd, _ = module_call_launches("masked_batch", True, {}, torch.float32, backend="torch")
    assert sum(fwd.values()) > BUDGET["SeqBatchNorm train"][0]


def test_a_triton_kernel_counts_once_and_its_arguments_not_at_all():
    from seqnorm.backends.triton import _rowwise_fwd_impl

    x = torch.randn(3, 8, device=DEVICE)
    counter = LaunchCounter()
    with counter:
        _rowwise_fwd_impl(x, None, None, None, None, 1e-5, True, False)
    assert dict(counter.ops) == {"triton:rowwise_fwd": 1}


@pytest.mark.parametrize("kind,dtype,momentum", [("instance", torch.float32, 0.1), ("masked_batch", torch.bfloat16, None),
                                                 ("power", torch.bfloat16, 0.1)],
                         ids=["instance", "batch_bf16_cumulative", "power_bf16"])
def test_the_finalize_kernels_keep_the_running_statistics_policy(kind, dtype, momentum, monkeypatch):
    """seqnorm.running is the specification: the running statistics (and ν, and the
    counter) moved inside the finalize kernels equal what its device-side select
    makes of the same kernels' batch statistics (the policy as torch ops), over
    ordinary batches, an all-padding batch, a NaN batch and a batch with a one-step
    sequence — buffers in bfloat16 included (each op rounded as torch rounds it)."""
    import seqnorm
    from seqnorm import kinds
    from seqnorm.tools.launches import gpu_policy
    from seqnorm.backends.triton import TritonBackend

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 6, generator=gen) * 2 + 1
    mask = torch.rand(3, 7, generator=gen) < 0.3
    mask[0, :2] = False
    short = mask.clone()
    short[1] = True
    short[1, 0] = False                                      # one real step: no instance variance
    nan = x.clone()
    nan[0, 0, 3] = float("nan")
    batches = [(x, mask), (x * 0.5 - 1, short), (x, torch.ones_like(mask)), (nan, mask)]
    states = []
    for fused in (False, True):
        monkeypatch.setattr(TritonBackend, "fuses_running_update", fused)
        extra = dict(affine=True, track_running_stats=True) if kind == "instance" else {}
        module = kinds.build(kind, 6, **extra).to(dtype).train()
        module.momentum = momentum
        if kind == "power":
            with torch.no_grad():
                module.running_nu.fill_(0.05)
        with seqnorm.use_backend("triton"), gpu_policy():
            for xb, mb in batches:
                xl = xb.to(dtype).clone().requires_grad_()
                xin = xl.transpose(1, 2) if kind == "instance" else xl
                module(xin, padding_mask=mb).float().sum().backward()
        states.append({k: v.clone() for k, v in module.state_dict().items()})
    # Triton's interpreter narrows float32 to bfloat16 by truncation (a GPU rounds to nearest): there,
    # bfloat16 buffers that round three times a step drift by an ulp or two over the steps
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 or DEVICE == "cuda" else dict(rtol=2 ** -5, atol=1e-2)
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], **tol, msg=key)
