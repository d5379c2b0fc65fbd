"""``seqnorm bench``: seqnorm's kernels against torch, measured in one process.

On the CPU (default) seqnorm runs its fused Numba kernels; with ``--device
cuda`` its Triton kernels, *with* the padding mask (lengths drawn from
[T/4, T], about 40 % padding), against torch's native unmasked ops, seqnorm's
own composite-torch path (``seqnorm[torch]``) and Liger-Kernel's Triton norms
when Liger is installed. On CUDA, "% copy" counts the bytes of the real rows
only (a padded row is never read by the kernels).

For every op, shape, dtype and mode (forward, forward+backward) each provider
is first checked against the others for correctness, then timed in
interleaved rounds (so that drifts of a shared machine hit every provider
alike); the table reports the median. Ratios are against torch eager measured
in the same process. The machine's memory-copy bandwidth (``dst.copy_(src)`` of
one x-sized tensor into a reused buffer, bytes read + written per second) is
timed in the same rounds as the providers — on a shared machine it drifts —
and is the physical limit of a memory-bound op; "% copy" is the op's
bytes-moved model (``MODEL`` below, in x-sized tensors) over its time, as a
fraction of that bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as TF

from .. import __version__, functional as F, kinds, use_backend
from ..masks import lengths_to_padding_mask
from . import CommandError

SHAPES = [(8, 128, 512), (16, 512, 1024), (4, 2048, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the functional ops of every kind that has one (:mod:`seqnorm.kinds`)
OPS = [k.op for k in kinds.KINDS.values() if k.op]
#: the channels-first ops: a shape ``B,T,C`` is timed on x of shape ``(B, C, T)``
#: (``--shapes 8,8000,512`` is torch's ``(8, 512, 8000)``), GroupNorm in :data:`GROUPS` groups
CHANNELS_FIRST = [k.op for k in kinds.KINDS.values() if k.op and k.channels_first]
GROUPS = 32


def _groups(c: int) -> int:
    """GroupNorm's groups for ``c`` channels: :data:`GROUPS` where it divides ``c``, else one."""
    return GROUPS if c % GROUPS == 0 else 1

# Bytes moved by the fused kernels, in units of one tensor of x's size:
# (forward, forward + backward). Row-wise: read x, write y; backward reads dy
# and x, writes dx. Add & Norm (post-norm, as timed here) also reads the
# residual; under autograd it writes the sum for the backward (4, then 3 in the
# backward), without autograd it does not (3).
# BatchNorm reads x twice (statistics, normalize); its backward reads dy and x
# twice (sums, then dx). PowerNorm fuses its statistic into the normalize pass.
MODEL = {
    "layer_norm": (2, 5), "rms_norm": (2, 5),
    "add_layer_norm": (3, 7), "add_rms_norm": (3, 7),
    "seq_batch_norm": (3, 8), "power_norm": (2, 5),
    # GroupNorm/InstanceNorm: statistics, then normalize (x twice); backward: sums, then dx
    "group_norm": (3, 8), "instance_norm": (3, 8),
}


@dataclass
class Row:
    op: str
    shape: tuple
    dtype: str
    mode: str
    provider: str
    ms: float
    ratio: Optional[float]
    pct_copy: Optional[float]
    copy_gbs: float


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 64 << 20, repeats: int = 30, device: str = "cpu") -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` (reused buffers)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def _lengths_mask(b: int, t: int, gen: torch.Generator, shortest: float = 0.5) -> torch.Tensor:
    """Lengths uniform in [shortest·T, T]: about a quarter of the positions are
    padding for 1/2 (the CPU tables), about 40 % for 1/4 (the GPU tables)."""
    lengths = torch.randint(int(t * shortest), t + 1, (b,), generator=gen)
    return lengths_to_padding_mask(lengths, t)


def _gather_bn(x, mask, w, b, rm, rv):
    """Masked BatchNorm the way one does it with torch today: gather the real
    tokens, run F.batch_norm on them, scatter back."""
    real = ~mask
    y = torch.zeros_like(x)
    y[real] = TF.batch_norm(x[real], rm, rv, w, b, training=True)
    return y


def op_shape(op: str, shape) -> tuple:
    """The shape of ``op``'s input for a ``B,T,D`` shape: ``(B, D, T)`` channels first."""
    b_, t_, d = shape
    return (b_, d, t_) if op in CHANNELS_FIRST else tuple(shape)


def make_inputs(shape, dtype, gen: torch.Generator, device: str = "cpu", gpu_style: bool = False,
                op: str = "") -> dict:
    """One set of inputs shared by every provider of an (op, shape, dtype);
    ``gpu_style``: the GPU tables' padding (lengths from [T/4, T])."""
    b_, t_, d = shape
    return dict(
        x=torch.randn(op_shape(op, shape), generator=gen).to(device, dtype).requires_grad_(),
        r=torch.randn(shape, generator=gen).to(device, dtype),
        w=torch.randn(d, generator=gen).to(device, dtype).requires_grad_(),
        bias=torch.randn(d, generator=gen).to(device, dtype).requires_grad_(),
        mask=_lengths_mask(b_, t_, gen, 0.25 if gpu_style else 0.5).to(device),
        gpu_style=gpu_style,
    )


def _liger(op: str):
    """Liger-Kernel's Triton function for ``op``, or None (not installed / no such op)."""
    try:
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            return lambda x, r, w, b, d: LigerLayerNormFunction.apply(x, w, b, 1e-5)
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda x, r, w, b, d: LigerRMSNormFunction.apply(x, w, 1e-6)
        if op == "add_rms_norm":
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
            return lambda x, r, w, b, d: LigerFusedAddRMSNormFunction.apply(x, r, w, 1e-6)[0]
    except ImportError:
        return None
    return None


def setup(op: str, provider: str, tensors: dict, compiled: Dict):
    """Returns ``(fn, inputs)``: ``fn()`` computes the op on fresh outputs;
    ``inputs`` are the tensors to differentiate."""
    x, r, w, bias, mask, gpu_style = (tensors[k] for k in ("x", "r", "w", "bias", "mask", "gpu_style"))
    shape, dtype, d, dev = tuple(x.shape), x.dtype, x.shape[-1], x.device
    if op in CHANNELS_FIRST:
        d = x.shape[1]
        groups = _groups(d)
    rm, rv = torch.zeros(d, device=dev), torch.ones(d, device=dev)   # fresh running statistics per provider
    phi = torch.ones(d, device=dev)
    inputs = [x, w] if op in ("rms_norm", "add_rms_norm") else [x, w, bias]
    # on the GPU seqnorm's row-wise norms get the mask too (the case it is built for)
    rows_mask = mask if gpu_style else None

    if provider in ("seqnorm", "seqnorm[torch]"):
        backend = ("triton" if gpu_style else "fused") if provider == "seqnorm" else "torch"

        def run(fn):
            def call():
                with use_backend(backend):
                    return fn()
            return call

        fns = {
            "layer_norm": lambda: F.layer_norm(x, d, w, bias, padding_mask=rows_mask),
            "rms_norm": lambda: F.rms_norm(x, d, w, 1e-6, padding_mask=rows_mask),
            "add_layer_norm": lambda: F.add_layer_norm(x, r, d, w, bias, padding_mask=rows_mask),
            "add_rms_norm": lambda: F.add_rms_norm(x, r, d, w, 1e-6, padding_mask=rows_mask),
            "seq_batch_norm": lambda: F.seq_batch_norm(x, rm, rv, w, bias, training=True, padding_mask=mask),
            "power_norm": lambda: F.power_norm(x, phi, None, w, bias, training=True, padding_mask=mask),
            "group_norm": lambda: F.group_norm(x, groups, w, bias, padding_mask=mask),
            "instance_norm": lambda: F.instance_norm(x, weight=w, bias=bias, padding_mask=mask),
        }
        return run(fns[op]), inputs

    rm_t, rv_t = torch.zeros(d, dtype=dtype, device=dev), torch.ones(d, dtype=dtype, device=dev)
    torch_fns = {
        "layer_norm": lambda: TF.layer_norm(x, (d,), w, bias),
        "rms_norm": lambda: TF.rms_norm(x, (d,), w, 1e-6),
        "add_layer_norm": lambda: TF.layer_norm(x + r, (d,), w, bias),
        "add_rms_norm": lambda: TF.rms_norm(x + r, (d,), w, 1e-6),
        # BatchNorm1d wants (N, C, L): the transposed tensor, no mask
        "seq_batch_norm": lambda: TF.batch_norm(x.transpose(1, 2), rm_t, rv_t, w, bias, training=True).transpose(1, 2),
        # unmasked: padding pooled into the statistics (what seqnorm's masked ops replace)
        "group_norm": lambda: TF.group_norm(x, groups, w, bias),
        "instance_norm": lambda: TF.instance_norm(x, weight=w, bias=bias),
    }
    if provider == "torch":
        return torch_fns[op], inputs
    if provider == "gather":
        return (lambda: _gather_bn(x, mask, w, bias, rm_t, rv_t)), inputs
    if provider == "liger":
        fn = _liger(op)
        return (lambda: fn(x, r, w, bias, d)), inputs
    if provider == "torch.compile":
        key = (op, shape, dtype)
        if key not in compiled:
            compiled[key] = torch.compile(_as_function(op, d))
        fn = compiled[key]
        if op in ("add_layer_norm", "add_rms_norm"):
            return (lambda: fn(x, r, w, bias)), inputs
        if op == "seq_batch_norm":
            return (lambda: fn(x, rm_t, rv_t, w, bias)), inputs
        return (lambda: fn(x, w, bias)), inputs
    raise ValueError(provider)


def _as_function(op: str, d: int) -> Callable:
    """The torch code of ``op`` as a plain function of its tensors (for torch.compile)."""
    if op == "layer_norm":
        return lambda x, w, b: TF.layer_norm(x, (d,), w, b)
    if op == "rms_norm":
        return lambda x, w, b: TF.rms_norm(x, (d,), w)
    if op == "add_layer_norm":
        return lambda x, r, w, b: TF.layer_norm(x + r, (d,), w, b)
    if op == "add_rms_norm":
        return lambda x, r, w, b: TF.rms_norm(x + r, (d,), w)
    if op == "group_norm":
        return lambda x, w, b: TF.group_norm(x, _groups(x.shape[1]), w, b)
    if op == "instance_norm":
        return lambda x, w, b: TF.instance_norm(x, weight=w, bias=b)
    return lambda x, rm, rv, w, b: TF.batch_norm(x.transpose(1, 2), rm, rv, w, b, training=True).transpose(1, 2)


def providers_for(op: str, with_compile: bool, gpu_style: bool = False) -> List[str]:
    if op == "power_norm":  # torch has no PowerNorm: seqnorm's own torch backend is the baseline
        return ["seqnorm", "seqnorm[torch]"]
    names = ["seqnorm", "torch"]
    if op == "seq_batch_norm":
        names.append("gather")
    if gpu_style:
        names.append("seqnorm[torch]")   # the composite path the Triton kernels replace
        if _liger(op) is not None:
            names.append("liger")
    if with_compile:
        names.append("torch.compile")
    return names


def _step(fn, inputs, mode, dy):
    y = fn()
    if mode == "fwd+bwd":
        torch.autograd.grad(y, inputs, dy)
    return y


def time_round_robin(calls: Dict[str, Callable[[], object]], budget_s: float, min_reps: int = 10,
                     max_reps: int = 50, device: str = "cpu") -> Dict[str, float]:
    """Median seconds per call, providers interleaved round by round. On CUDA
    each sample is ``inner`` back-to-back calls between two synchronizations
    (so that the launch and the synchronization are not what is measured)."""
    inner = 10 if device == "cuda" else 1
    for fn in calls.values():  # warm-up (JIT, caches, first-touch of weights)
        fn()
        fn()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in calls}
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
        for name, fn in calls.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t) / inner)
        reps += 1
    return {k: statistics.median(v) for k, v in times.items()}


def check(outputs: Dict[str, torch.Tensor], op: str, dtype, real: Optional[torch.Tensor] = None) -> None:
    """Every provider must agree with seqnorm before anything is timed (at the
    real tokens ``real`` when seqnorm's row-wise norms were given the mask)."""
    ref = outputs["seqnorm"].float()
    tol = {torch.bfloat16: 5e-2, torch.float16: 1e-2}.get(dtype, 2e-4)
    for name, y in outputs.items():
        if name in ("seqnorm",) or (op in ("seq_batch_norm", *CHANNELS_FIRST) and name in ("torch", "torch.compile")):
            continue  # unmasked BatchNorm/GroupNorm computes a different (padding-polluted) thing
        diff = (y.float() - ref).abs()
        err = (diff[real] if real is not None else diff).max().item()
        if not err <= tol * max(1.0, ref.abs().max().item()):
            raise AssertionError(f"{op}: {name} differs from seqnorm by {err:.3g}")


def bench(shapes, dtypes, ops, modes, with_compile=False, budget_s=0.3, out=None, device="cpu",
          gpu_style: Optional[bool] = None, min_reps: int = 10) -> List[Row]:
    """The table. ``gpu_style`` (default: ``device == "cuda"``) times the Triton
    kernels with the mask against the GPU baselines — on a CPU too, through
    Triton's interpreter (slow: a dry run of the GPU bench, for its tests, with
    ``min_reps=1``)."""
    out = out or sys.stdout  # looked up per call, so that redirected stdout is honoured
    gpu_style = device == "cuda" if gpu_style is None else gpu_style
    gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth(device=device)
    print(f"copy bandwidth at start (dst.copy_(src), 64 MiB, read+write): {bw / 1e9:.1f} GB/s; each "
          f"group below also times the copy of one x in its own rounds", file=out)
    rows: List[Row] = []
    compiled: Dict = {}
    for shape in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for op in ops:
                provs = providers_for(op, with_compile, gpu_style)
                tensors = make_inputs(shape, dtype, gen, device, gpu_style, op)
                setups = {p: setup(op, p, tensors, compiled) for p in provs}
                real = ~tensors["mask"] if gpu_style else None
                if real is not None and op in CHANNELS_FIRST:
                    real = real.unsqueeze(1).expand(tensors["x"].shape)
                with torch.no_grad():
                    check({p: fn() for p, (fn, _) in setups.items()}, op, dtype, real)
                # (a CPU dry run through the interpreter: once per op, the interpreter is slow)
                if gpu_style and "seqnorm" in setups and (device == "cuda" or dname == dtypes[0]):
                    print(kernel_line(op, *setups["seqnorm"], dy_like=op_shape(op, shape), dtype=dtype,
                                      device=device), file=out, flush=True)
                # the bytes a masked kernel moves: the real rows' (on CUDA, where seqnorm gets the mask)
                real_frac = float(real.float().mean()) if real is not None else 1.0
                for mode in modes:
                    dy = torch.randn(op_shape(op, shape), generator=gen).to(device, dtype)
                    calls = {}
                    for p, (fn, inputs) in setups.items():
                        if mode == "fwd":
                            calls[p] = (lambda fn=fn: _no_grad(fn))
                        else:
                            calls[p] = (lambda fn=fn, inputs=inputs: _step(fn, inputs, mode, dy))
                    # The copy of one x-sized tensor, timed in the same rounds: the
                    # bandwidth the op could reach right now on this (shared) machine.
                    src = tensors["x"].detach()
                    dst = torch.empty_like(src)
                    calls["copy"] = lambda: dst.copy_(src)
                    med = time_round_robin(calls, budget_s, min_reps=min_reps, device=device)
                    copy_s = med.pop("copy")
                    group_bw = 2 * src.numel() * src.element_size() / copy_s
                    base = med.get("torch", med.get("seqnorm[torch]"))
                    nbytes = MODEL[op][0 if mode == "fwd" else 1] * src.numel() * src.element_size() * real_frac
                    for p, s in med.items():
                        pct = 100 * nbytes / s / group_bw if p == "seqnorm" else None
                        rows.append(Row(op, shape, dname, mode, p, s * 1e3, base / s, pct, group_bw / 1e9))
                    _print_group(rows[-len(med):], out)
    return rows


def kernel_line(op: str, fn, inputs, dy_like, dtype, device) -> str:
    """``op``'s launches per call (forward; forward + backward) on the triton
    backend and, on a GPU, each kernel's registers and spills as the driver loaded
    them — printed beside the timings (issue 16: a launch costs µs whatever the size;
    a spill puts local memory in a kernel's inner loop)."""
    from ..tools.launches import LaunchCounter, gpu_policy
    from ..tools.registers import loaded_registers

    counter = LaunchCounter()
    dy = torch.zeros(dy_like, dtype=dtype, device=device)
    # a CPU dry run (the interpreter) counts with the running-statistics policy a GPU gets
    with gpu_policy() if device != "cuda" else contextlib.nullcontext():
        with counter:
            _no_grad(fn)
        fwd = counter.total
        counter.reset()
        with counter:
            _step(fn, inputs, "fwd+bwd", dy)
    kernels = sorted({k[len("triton:"):] for k in counter.ops if k.startswith("triton:")})
    regs = loaded_registers()
    detail = ", ".join(f"{k} {regs[k][0]} regs" + (f" SPILLS {regs[k][1]} B" if regs[k][1] else "")
                       for k in kernels if k in regs) or "registers n/a (not compiled for a GPU here)"
    return f"  {op}: launches fwd {fwd}, fwd+bwd {counter.total} — {detail}"


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _print_group(rows: List[Row], out) -> None:
    for r in rows:
        pct = f"{r.pct_copy:5.0f}%" if r.pct_copy is not None else "     "
        print(f"{r.op:15s} {str(r.shape):17s} {r.dtype:4s} {r.mode:7s} {r.provider:14s} "
              f"{r.ms:9.3f} ms  {r.ratio:6.2f}x  {pct}  (copy {r.copy_gbs:.1f} GB/s)", file=out, flush=True)


def allocator() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        return f"jemalloc (LD_PRELOAD, MALLOC_CONF={os.environ.get('MALLOC_CONF', '')!r}): freed outputs are reused"
    return ("glibc default: an output above glibc's mmap threshold is a new mmap that page-faults; the "
            "threshold starts at 128 KiB and rises to the size of a freed mapped block, up to 32 MiB, so "
            "outputs under 32 MiB come from the reused heap once one was freed (ratios: compare within a group)")


def machine(device: str = "cpu") -> str:
    import numba

    if device == "cuda":
        import triton

        return (f"{torch.cuda.get_device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
                f"triton {triton.__version__}; Python {platform.python_version()}; seqnorm {__version__}")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} CPUs; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"numba {numba.__version__} ({numba.threading_layer() if _numba_ran() else 'layer n/a'}); "
            f"Python {platform.python_version()}; seqnorm {__version__}")


def _numba_ran() -> bool:
    import numba

    try:
        numba.threading_layer()
        return True
    except ValueError:
        return False


def markdown(rows: List[Row]) -> str:
    out = ["| op | shape | dtype | mode | provider | median ms | × torch eager | % copy bw | copy GB/s |",
           "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        pct = f"{r.pct_copy:.0f}%" if r.pct_copy is not None else ""
        out.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {r.ms:.3f} | {r.ratio:.2f} | "
                   f"{pct} | {r.copy_gbs:.1f} |")
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES),
                   help="B,T,D;B,T,D;... (default: the three standard shapes)")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32,bf16 (and fp16)")
    p.add_argument("--ops", default=",".join(OPS), help=",".join(OPS))
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd,fwd+bwd")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the torch code "
                                                           "(adds ~10-20 s of compilation per op)")
    p.add_argument("--budget", type=float, default=0.3, help="seconds of timing per provider (default 0.3)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as markdown to FILE")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the fused Numba kernels (default); cuda: the Triton kernels")


def run(args) -> int:
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    except ValueError:
        raise CommandError(f"--shapes: expected B,T,D;B,T,D, got {args.shapes!r}") from None
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise CommandError(f"--shapes: each shape is three positive integers B,T,D, got {args.shapes!r}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    ops = [o for o in args.ops.split(",") if o]
    modes = [m for m in args.modes.split(",") if m]
    for name, values, allowed in (("--dtypes", dtypes, DTYPES), ("--ops", ops, OPS),
                                  ("--modes", modes, ("fwd", "fwd+bwd"))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise CommandError(f"{name}: unknown {bad or values}; choose from {', '.join(allowed)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available")
    print(f"machine: {machine(args.device)}")
    print(f"allocator: {allocator()}")
    print(f"{'op':15s} {'shape':17s} {'dt':4s} {'mode':7s} {'provider':14s} {'median':>12s}  "
          f"{'×torch':>7s}  {'%copy':>6s}")
    t0 = time.perf_counter()
    rows = bench(shapes, dtypes, ops, modes, args.compile, args.budget, device=args.device)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(f"machine: {machine(args.device)}\n\nallocator: {allocator()}\n\n{markdown(rows)}\n")
    return 0
