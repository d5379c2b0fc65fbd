"""The triton backend's cached launches (issue 27: ``seqnorm.backends.triton_kernels.launch``).

Through Triton's interpreter (``TRITON_INTERPRET=1``, no GPU): after a warm-up call, every
launch of a module call is a hit of a handle cached per specialization — no miss, and
``kernel[grid]`` (Triton's per-call binding and specialization) is never reached — on the
forward and the backward of every kernel family; the cache key separates every call that
Triton's own specialization separates. The interpreter has no compiled launcher, so the
handle there runs the interpreted kernel; the compiled handle's binding (the launcher
called with the loaded function, packed metadata, stream and the constexprs in parameter
order) is checked here against a stand-in compiled kernel, and on a GPU by
``tests/test_cuda.py`` and ``benchmarks/gpu.sh``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import seqnorm  # noqa: E402
from seqnorm import kinds  # noqa: E402
from seqnorm.backends import triton as tb  # noqa: E402
from seqnorm.backends.triton_kernels import launch as L  # noqa: E402
from seqnorm.tools.launches import gpu_policy  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.interpreting(), reason="the interpreter runs these checks")

CALLS = [("layer", True, {}), ("rms", True, {}), ("add_layer", True, {"prenorm": True}),
         ("masked_batch", True, {}), ("masked_batch", False, {}), ("power", True, {}),
         ("power", True, {"momentum": None}), ("group", True, {"num_groups": 2}), ("instance", True, {})]


def _call(kind, training, kwargs, dtype):
    torch.manual_seed(0)
    module = kinds.build(kind, 8, **kwargs).to(dtype).train(training)
    x = torch.randn(2, 5, 8, dtype=dtype)
    if kinds.kind(kind).channels_first:
        x = x.transpose(1, 2).contiguous()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True

    def run():
        leaves = [x.clone().requires_grad_()] + ([x.flip(0).clone().requires_grad_()] if kind.startswith("add_")
                                                 else [])
        out = module(*leaves, padding_mask=mask)
        first = out[0] if isinstance(out, tuple) else out
        first.float().square().sum().backward()
        return first

    return run


class _Counts:
    """Misses and hits of every cached kernel, and calls of ``kernel[grid]``."""

    def __init__(self, monkeypatch):
        self.misses, self.hits, self.getitem = 0, 0, 0
        counts = self
        miss, launch = L.CachedKernel._miss, L.CachedKernel.run
        getitem = triton.runtime.jit.KernelInterface.__getitem__

        def counted_miss(kernel, *args):
            counts.misses += 1
            return miss(kernel, *args)

        def counted_launch(kernel, *args, **kwargs):
            counts.hits += 1
            return launch(kernel, *args, **kwargs)

        def counted_getitem(fn, grid):
            counts.getitem += 1
            return getitem(fn, grid)

        monkeypatch.setattr(L.CachedKernel, "_miss", counted_miss)
        monkeypatch.setattr(L.CachedKernel, "run", counted_launch)
        monkeypatch.setattr(triton.runtime.jit.KernelInterface, "__getitem__", counted_getitem)


@pytest.mark.parametrize("kind,training,kwargs", CALLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_after_warm_up_every_launch_is_a_cached_handle(monkeypatch, kind, training, kwargs, dtype):
    """A module's second call: launches only, no miss, no ``kernel[grid]``; and the same
    values as a twin module's second call launched by Triton's own ``run`` (handles dropped)."""
    run, twin = _call(kind, training, kwargs, dtype), _call(kind, training, kwargs, dtype)
    with seqnorm.use_backend("triton"), gpu_policy():
        _drop_handles()
        twin()
        _drop_handles()
        expected = twin()
        run()
        counts = _Counts(monkeypatch)
        again = run()
    assert counts.hits >= 2                  # forward and backward launches
    assert counts.misses == 0, "a launch after warm-up missed the cache"
    assert counts.getitem == 0, "a launch after warm-up went through kernel[grid]"
    assert torch.equal(again, expected)


def _drop_handles():
    for family in (tb.fk, tb.gk, tb.pk, tb.rk, tb.sk):
        for kernel in family.kernels():
            kernel.handles.clear()


def test_a_new_specialization_misses_once_then_hits(monkeypatch):
    ln = seqnorm.LayerNorm(8)
    with seqnorm.use_backend("triton"), torch.no_grad():
        ln(torch.randn(3, 8))
        counts = _Counts(monkeypatch)
        ln(torch.randn(3, 24)[:, 1:9])           # a row stride of 24 (not 8) and a misaligned pointer
        first = counts.misses
        ln(torch.randn(3, 24)[:, 1:9])
    assert first == 1 and counts.misses == 1


def _triton_spec(args):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    return [native_specialize_impl(CUDABackend, a, False, True, True) for a in args]


def test_equal_keys_mean_equal_triton_specializations():
    """Over tensors of three dtypes at aligned and misaligned offsets and ints of every
    class, two argument lists with the same key have the same Triton specialization."""
    base = {dt: torch.zeros(64, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.uint8)}
    tensors = [base[dt][off:] for dt in base for off in (0, 1, 4, 8, 16)]
    ints = [0, 1, 2, 15, 16, 17, 32, 2 ** 31 - 1, 2 ** 31, -1, -16]
    key = L._key_function("tifti")
    seen = {}
    for t1, i1, t2, i2 in itertools.product(tensors[::2], ints, tensors[1::2], ints[::3]):
        args = (t1, i1, 0.5, t2, i2)
        spec = _triton_spec(args)
        k = key(*args)
        assert seen.setdefault(k, spec) == spec, (k, spec, seen[k])
    assert len(seen) > 20


def test_implied_tensors_are_left_out_of_the_key_and_the_rest_still_decide_it():
    """A specialization's implied positions (buffers the call site allocates, repeats of an
    argument) do not enter its key; every other tensor's dtype and alignment still do — and
    the row-wise forward's call sites imply only what they allocate or repeat."""
    key = L._key_function("ttti", frozenset({1}))
    a, b = torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)
    assert key(a, a, a, 3) == key(a, b[1:], a, 3)                    # position 1: any dtype, any offset
    assert key(a, a, a, 3) != key(a, a, b, 3)                        # position 2: its dtype counts
    assert key(a, a, a, 3) != key(a, a, torch.zeros(9)[1:], 3)       # ... and its alignment
    assert key(a, a, a, 3) != key(a, a, a, 16)
    assert tb._rowwise_fwd_kernel(64, False, False, True, True, True, True).implied == {1, 2, 3, 7}
    assert tb._rowwise_fwd_kernel(64, True, True, True, True, True, True).implied == {2, 3, 7}   # a residual counts


def test_the_compiled_handle_calls_the_launcher_as_triton_does(monkeypatch):
    """A stand-in compiled kernel: the miss launches through ``run`` and keeps a handle; a
    hit calls the launcher with the grid (padded to 3-D), the current stream, the loaded
    function, its packed metadata, no hooks, the arguments and the constexprs in parameter
    order (defaults included) — what ``JITFunction.run`` passes it."""
    from triton.runtime import driver

    calls = []

    class Param:
        def __init__(self, name, constexpr, default=None):
            self.name, self.is_constexpr = name, constexpr
            self.has_default, self.default = default is not None, default

    class Compiled:
        function, packed_metadata = "FUNCTION", "METADATA"

        def run(self, *args):
            calls.append(("launcher", args))

    class FakeJIT:
        __name__ = "fake"
        params = [Param("X", False), Param("n", False), Param("A", True), Param("B", True, default=7)]

        def run(self, *args, grid, warmup, **options):
            calls.append(("run", args, grid, options))
            return Compiled()

    class FakeDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 1234

    saved = driver._active
    driver.set_active(FakeDriver())
    try:
        kernel = L.CachedKernel(FakeJIT())
        assert kernel._compiled
        x = torch.zeros(4)
        kernel[(5,)](x, 3, A=True, num_warps=4)
        kernel[(6, 2)](x, 3, A=True, num_warps=4)
        kernel[(6, 2)](x, 3, A=False, num_warps=4)      # another constexpr: another specialization
    finally:
        driver._active = saved
    assert [c[0] for c in calls] == ["run", "launcher", "run"]
    assert calls[0][1:] == ((x, 3), (5,), {"A": True, "num_warps": 4})
    assert calls[1][1] == (6, 2, 1, 1234, "FUNCTION", "METADATA", None, None, None, x, 3, True, 7)
    assert kernel.misses == 2 and kernel.hits == 1 and len(kernel.handles) == 2
