"""No register spills: the triton backend's kernels compiled for a GPU without one.

Triton's bundled ptxas compiles for sm_90 (and sm_80) with no driver; ``ptxas -v``
reports each kernel's registers, stack frame and spill bytes. CI compiles a
representative set — the widest rows of each row-wise path (register-resident up
to 16,384 / 4,096 columns, column-blocked beyond, D = 65,536), the feature-wise
tile and finalize kernels with the most registers, the group-wise kernels at
full blocks — and asserts no stack and no spill; ``benchmarks/registers.py``
compiles every specialization for D ∈ {1, …, 65536} × fp32/bf16/fp16 × sm_80/sm_90.

The column-blocked kernels must compute what the register-resident ones do:
checked here in the interpreter with narrow blocks (1e4 offsets, rows whose
squares overflow, padding, the residual and its gradient).
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

import seqnorm  # noqa: E402
from seqnorm import functional as F  # noqa: E402
from seqnorm.tools import registers as R  # noqa: E402


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path) and os.path.exists(get_ptxas(80).path)
    except Exception:   # no NVIDIA backend in this Triton build
        return False


def _ci_specs():
    """The representative set: each family's widest or heaviest specialization."""
    wanted = {
        65536: ("rowwise_fwd_blocked", "rowwise_bwd_blocked", "bn_finalize"),
        16384: ("rowwise_fwd",),
        4096: ("rowwise_bwd",),
        1024: ("power_input_grad", "groupwise_bwd"),
    }
    specs = [s for d, names in wanted.items() for s in R.specializations(d, "bf16") if s.kernel in names]
    assert len(specs) == sum(map(len, wanted.values()))
    return specs


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is not installed")
def test_representative_kernels_compile_without_spills():
    reports = R.report_in_subprocess(_ci_specs(), archs=(90,))
    assert len(reports) == len(_ci_specs())
    lines = [f"{r.spec.label} sm_{r.arch}: {r.registers} registers, stack {r.stack} B, spills "
             f"{r.spill_stores}/{r.spill_loads} B" for r in reports]
    print("\n".join(lines))
    assert all(0 < r.registers <= 255 for r in reports)
    assert not [line for r, line in zip(reports, lines) if r.spills], lines


def test_the_widest_rows_take_the_column_blocked_kernels():
    from seqnorm.backends import triton as tb

    kernels = {s.kernel for s in R.specializations(65536)}
    assert {"rowwise_fwd_blocked", "rowwise_bwd_blocked"} <= kernels
    assert {"rowwise_fwd", "rowwise_bwd"} <= {s.kernel for s in R.specializations(4096)}
    assert tb.MAX_BLOCK_FWD >= tb.MAX_BLOCK_BWD >= tb.BLOCK_C


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="no CUDA device and TRITON_INTERPRET is not 1")
def test_the_column_blocked_kernels_compute_what_the_register_ones_do(monkeypatch):
    from seqnorm.backends import triton as tb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 100, generator=gen) * 3 + 1e4
    x[0, 1, :10] *= 1e30                                     # squares overflow float32
    r = torch.randn(3, 5, 100, generator=gen)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:] = True
    w, b, dy = torch.randn(100, generator=gen), torch.randn(100, generator=gen), torch.randn(3, 5, 100, generator=gen)

    def run():
        out = []
        for center in (True, False):
            leaves = [t.to(device).clone().requires_grad_() for t in (x, r, w, b)]
            xl, rl, wl, bl = leaves
            with seqnorm.use_backend("triton"):
                if center:
                    y, s = F.add_layer_norm(xl, rl, 100, wl, bl, prenorm=True, padding_mask=mask.to(device))
                else:
                    y, s = F.add_rms_norm(xl, rl, 100, wl, prenorm=True, padding_mask=mask.to(device))
            grads = torch.autograd.grad((y * dy.to(device)).sum() + s.sum() * 0.5, leaves[:3 + center])
            out += [y, s, *grads]
        return out

    held = run()
    monkeypatch.setattr(tb, "MAX_BLOCK_FWD", 16)
    monkeypatch.setattr(tb, "MAX_BLOCK_BWD", 16)
    monkeypatch.setattr(tb, "BLOCK_C", 32)                   # 100 columns: four blocks, the last ragged
    blocked = run()
    for a, c in zip(held, blocked):
        assert torch.isfinite(c).all()
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
