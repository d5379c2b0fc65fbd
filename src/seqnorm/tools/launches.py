"""Count the launches a module call makes on the CUDA path — without a GPU.

A *launch* is one Triton kernel, or one torch op that would start a CUDA
kernel: not a view, not an ``empty`` allocation, not a metadata query. Each
costs a few µs of GPU time and more of host time, whatever the size, so at
the sizes people train at the count matters as much as the kernels' speed.

:class:`LaunchCounter` counts both kinds in one context: a
``TorchDispatchMode`` sees every torch op below autograd (the backward's
ops too), and a hook on Triton's launcher sees every kernel — through the
interpreter (``TRITON_INTERPRET=1``, kernels run on CPU tensors) or compiled.
Ops that Triton's interpreter itself runs to move a kernel's arguments are
not counted. Counts do not depend on the size of the input, so a tiny input
measures them.

On a CPU tensor the running-statistics policy would read counts back to the
host; :func:`gpu_policy` forces the sync-free policy a CUDA tensor gets
(:func:`seqnorm.running.sync_free`), so the counts are the GPU path's.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter", "gpu_policy", "sync_path", "NOT_LAUNCHES", "COLLECTIVES"]

aten = torch.ops.aten

#: torch ops that start no kernel: allocations left uninitialized, metadata, host reads
#: (a host read is a synchronization, which the no-host-sync tests forbid separately)
NOT_LAUNCHES = {
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten.lift_fresh.default,
    aten.detach.default, aten._local_scalar_dense.default, aten.is_same_size.default,
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.is_contiguous.default, aten.is_contiguous.memory_format, aten.is_non_overlapping_and_dense.default,
    aten.set_.source_Storage_storage_offset, aten.resize_.default,
}


#: the collectives' ops (c10d), counted apart: the Sync modules' budget is the local one plus these
COLLECTIVES = {"_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_", "allreduce_",
               "allreduce_coalesced_", "reduce_scatter_tensor_coalesced_", "_reduce_scatter_base_", "broadcast_"}


def split_collectives(ops: Counter):
    """``(local, collectives)``: the Counter of local launches, and of collectives."""
    local = Counter({k: v for k, v in ops.items() if k not in COLLECTIVES})
    return local, Counter({k: v for k, v in ops.items() if k in COLLECTIVES})


def _is_launch(func) -> bool:
    if func in NOT_LAUNCHES:
        return False
    schema = func._schema
    # a view (its output aliases an input without writing): reshape, select, expand, t, ...
    return not (schema.returns and all(r.alias_info is not None and not r.alias_info.is_write
                                       for r in schema.returns))


class LaunchCounter(TorchDispatchMode):
    """Count launches (torch ops that start a kernel, and Triton kernels) inside
    ``with LaunchCounter() as c:``; ``c.total``, and ``c.ops`` (a Counter by name:
    ``"triton:<kernel>"`` or the aten op) say which."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self._inside_kernel = 0

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def reset(self) -> None:
        self.ops.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_kernel and _is_launch(func):
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def _kernel_hook(self) -> Iterator[None]:
        """Count each Triton kernel launch — through the backend's cached handles
        (:class:`~seqnorm.backends.triton_kernels.launch.CachedKernel`) or Triton's own
        ``run`` (a miss, or a kernel launched as ``kernel[grid]``) — once, and none of the
        torch ops its launcher runs."""
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit

        from ..backends.triton_kernels.launch import CachedKernel

        counter = self
        patched = []

        def hooked(original, name_of):
            def launch(fn, *args, **kwargs):
                if not kwargs.get("warmup", False) and not counter._inside_kernel:
                    counter.ops["triton:" + name_of(fn)] += 1
                counter._inside_kernel += 1
                try:
                    return original(fn, *args, **kwargs)
                finally:
                    counter._inside_kernel -= 1
            return launch

        for cls, attr in ((interpreter.InterpretedFunction, "run"), (jit.JITFunction, "run"),
                          (CachedKernel, "run")):
            original = getattr(cls, attr)
            setattr(cls, attr, hooked(original, lambda fn: getattr(fn, "__name__", "kernel")))
            patched.append((cls, attr, original))
        try:
            yield
        finally:
            for cls, attr, original in patched:
                setattr(cls, attr, original)

    def __enter__(self):
        self._hook = self._kernel_hook()
        self._hook.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._hook.__exit__(*exc)


@contextlib.contextmanager
def gpu_policy() -> Iterator[None]:
    """The running-statistics policy a CUDA tensor gets (the device-side select,
    no host read), forced on CPU tensors — as ``tests/test_no_host_sync.py`` does."""
    from .. import running

    saved = running.sync_free
    running.sync_free = lambda t: True
    try:
        yield
    finally:
        running.sync_free = saved


@contextlib.contextmanager
def sync_path() -> Iterator[None]:
    """The Sync modules' collective path in this one process: a one-rank gloo group
    (a file rendezvous, destroyed after; an existing group is used as it is) and
    their hook taken even with one rank, so that their launches and collectives
    are those of every rank of a larger group (the buffers exchanged are the same
    size per rank)."""
    import tempfile

    import torch.distributed as dist

    from .. import distributed

    made = not dist.is_initialized()
    tmp = tempfile.TemporaryDirectory() if made else None
    if made:
        dist.init_process_group("gloo", init_method=f"file://{tmp.name}/store", rank=0, world_size=1)
    saved = distributed._sync_reduce

    def hook(module):
        return distributed.Collectives(module.process_group, distributed._world(module.process_group)) \
            if module.training else None

    distributed._sync_reduce = hook
    try:
        yield
    finally:
        distributed._sync_reduce = saved
        if made:
            dist.destroy_process_group()
            tmp.cleanup()


def count(fn, counter: Optional[LaunchCounter] = None) -> Counter:
    """The launches of ``fn()``, by name."""
    counter = counter or LaunchCounter()
    with counter:
        fn()
    return Counter(counter.ops)


#: issue 16's launch budget per module call on the CUDA path: label → (forward, backward)
BUDGET = {
    "LayerNorm": (1, 2), "RMSNorm": (1, 2), "AddNorm (layer, prenorm)": (1, 2), "AddNorm (rms)": (1, 2),
    "SeqBatchNorm train": (3, 3), "SeqBatchNorm train (cumulative)": (3, 3), "SeqBatchNorm eval": (1, 2),
    "PowerNorm train": (3, 3), "PowerNorm train (cumulative)": (3, 3), "PowerNorm eval": (1, 2),
    "GroupNorm": (2, 3), "InstanceNorm1d": (2, 3), "InstanceNorm1d (affine, running stats)": (2, 3),
}

#: the module calls the launch budget covers: (label, kind, training, constructor kwargs)
MODULE_CALLS = [
    ("LayerNorm", "layer", True, {}),
    ("RMSNorm", "rms", True, {}),
    ("AddNorm (layer, prenorm)", "add_layer", True, {"prenorm": True}),
    ("AddNorm (rms)", "add_rms", True, {}),
    ("SeqBatchNorm train", "masked_batch", True, {}),
    ("SeqBatchNorm train (cumulative)", "masked_batch", True, {"momentum": None}),
    ("SeqBatchNorm eval", "masked_batch", False, {}),
    ("PowerNorm train", "power", True, {}),
    ("PowerNorm train (cumulative)", "power", True, {"momentum": None}),
    ("PowerNorm eval", "power", False, {}),
    ("GroupNorm", "group", True, {"num_groups": 2}),
    ("InstanceNorm1d", "instance", True, {}),
    ("InstanceNorm1d (affine, running stats)", "instance", True, {"affine": True, "track_running_stats": True}),
]


#: the Sync modules: the local budget of their single-process modules, plus one collective each way
SYNC_BUDGET = {"SyncSeqBatchNorm train": (3, 3), "SyncSeqBatchNorm train (cumulative)": (3, 3),
               "SyncPowerNorm train": (3, 3), "SyncPowerNorm train (cumulative)": (3, 3)}
SYNC_COLLECTIVES = 1
SYNC_MODULE_CALLS = [
    ("SyncSeqBatchNorm train", "sync_batch", True, {}),
    ("SyncSeqBatchNorm train (cumulative)", "sync_batch", True, {"momentum": None}),
    ("SyncPowerNorm train", "sync_power", True, {}),
    ("SyncPowerNorm train (cumulative)", "sync_power", True, {"momentum": None}),
]


def module_call_launches(kind: str, training: bool, kwargs: dict, dtype=torch.bfloat16, shape=(2, 5, 8),
                         backend: str = "triton", device="cpu", param_dtype=None):
    """``(forward, backward)`` launch Counters of one module call of ``kind`` on a
    masked ``shape`` = ``(B, T, D)`` input (channels-first kinds: ``(B, D, T)``),
    with the GPU's running-statistics policy. The module is called once first
    (a warm-up: Triton compiles, caches fill), then counted; the backward is
    ``torch.autograd.backward`` with a given ``dy`` (no ``ones_like`` counted)."""
    from .. import kinds, use_backend

    b, t, d = shape
    module = kinds.build(kind, d, **dict(kwargs)).to(device, param_dtype or dtype).train(training)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(b, t, d, generator=gen) * 2 + 1).to(device, dtype)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, t - 2:] = True
    mask = mask.to(device)
    channels_first = kinds.kind(kind).channels_first
    if channels_first:
        x = x.transpose(1, 2).contiguous()
    residual = x.flip(0).clone() if kind.startswith("add_") else None

    def call(counter: Optional[LaunchCounter]):
        leaves = [x.clone().requires_grad_()] + ([residual.clone().requires_grad_()] if residual is not None else [])
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        for p in module.parameters():
            p.grad = None
        ctx = counter if counter is not None else contextlib.nullcontext()
        with ctx:
            out = module(*leaves, padding_mask=mask)
        fwd = Counter(counter.ops) if counter is not None else None
        outs = out if isinstance(out, tuple) else (out,)
        grads = [dy] + [torch.zeros_like(o) for o in outs[1:]]   # prenorm: the sum's gradient too
        if counter is not None:
            counter.reset()
        with ctx:
            torch.autograd.backward(outs, grads)
        return fwd, (Counter(counter.ops) if counter is not None else None)

    with use_backend(backend), gpu_policy():
        call(None)
        return call(LaunchCounter())


def launch_table(dtype=torch.bfloat16, shape=(2, 5, 8), backend: str = "triton", device="cpu", param_dtype=None):
    """``[(label, forward Counter, backward Counter)]`` for :data:`MODULE_CALLS`."""
    return [(label, *module_call_launches(kind, training, kw, dtype, shape, backend, device, param_dtype))
            for label, kind, training, kw in MODULE_CALLS]


def sync_launch_table(dtype=torch.bfloat16, shape=(2, 5, 8), backend: str = "triton", device="cpu",
                      param_dtype=None):
    """``[(label, forward Counter, backward Counter)]`` for :data:`SYNC_MODULE_CALLS`, through
    :func:`sync_path` (collectives included: :func:`split_collectives` parts them)."""
    with sync_path():
        return [(label, *module_call_launches(kind, training, kw, dtype, shape, backend, device, param_dtype))
                for label, kind, training, kw in SYNC_MODULE_CALLS]
