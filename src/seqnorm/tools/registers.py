"""Registers and spills of the Triton kernels, compiled for a GPU without one.

``triton.compile`` with a ``GPUTarget("cuda", 80 or 90, 32)`` runs Triton's
whole pipeline down to Triton's bundled ``ptxas`` — no driver, no device — and
``ptxas -v`` says what each kernel costs a thread: registers, stack frame and
spill stores/loads (local memory). A kernel that spills reads and writes local
memory in its inner loop; one that fits runs from registers.

:func:`specializations` lists what the triton backend launches for a row
width ``D`` and a dtype — each kernel with the constexpr flags it is launched
with (the heaviest: every optional input present, padding on), the block
sizes and warps its launcher picks — and :func:`compile_report` compiles them.
``benchmarks/registers.py`` prints the full report; ``tests/test_registers.py``
compiles a representative subset in CI.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["Spec", "Report", "specializations", "flag_variants", "compile_report", "loaded_registers",
           "report_in_subprocess", "WIDTHS", "DTYPES", "ARCHS"]

#: the row widths of issue 16's report
WIDTHS = (1, 64, 1000, 1024, 4096, 8192, 16384, 65536)
DTYPES = ("fp32", "bf16", "fp16")
ARCHS = (80, 90)

#: arguments that are not pointers to the data dtype (lower-case names are int32 scalars)
_POINTER_TYPES = {"PAD": "*u8", "STEPS": "*i64", "COUNT": "*i64", "NBT": "*i64", "SUMS": "*fp64"}
_FLOAT_SCALARS = {"eps", "momentum", "nu_scale", "world"}
_INT_SCALARS = {"N", "D", "R", "P", "C", "T", "CG", "G", "L", "RANK"}
#: float32 buffers (statistics, partial sums, coefficients)
_F32 = {"SHIFT", "DELTA", "RSTD", "DW_PART", "DB_PART", "STATS", "STATS_OUT", "SCALE", "MEAN", "VAR",
        "COUNT_PART", "MEAN_PART", "M2_PART", "COEF", "DG_PART", "SUMSQ_PART", "PHI_B", "FACTOR", "NU_NEW",
        "GIVEN", "GATHERED"}


@dataclass(frozen=True)
class Spec:
    """One kernel specialization: the kernel's name in its module, its constexprs, warps."""

    family: str          # module in seqnorm.backends.triton_kernels
    kernel: str
    dtype: str           # the data (and parameter) dtype
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int = 4

    @property
    def label(self) -> str:
        blocks = ",".join(f"{k}={v}" for k, v in self.constexprs if k.startswith("BLOCK"))
        return f"{self.kernel}[{self.dtype},{blocks},w{self.num_warps}]"


@dataclass
class Report:
    spec: Spec
    arch: int
    registers: int
    stack: int           # bytes of stack frame per thread
    spill_stores: int    # bytes
    spill_loads: int     # bytes

    @property
    def spills(self) -> bool:
        return bool(self.stack or self.spill_stores or self.spill_loads)


def _spec(family, kernel, dtype, num_warps=4, **constexprs) -> Spec:
    return Spec(family, kernel, dtype, tuple(sorted(constexprs.items())), num_warps)


def specializations(d: int, dtype: str = "bf16") -> List[Spec]:
    """What the triton backend compiles for rows of ``d`` features in ``dtype``
    (the launchers' choices of block and warps, flags at their heaviest)."""
    from ..backends import triton as tb

    block, warps = tb._block_d(d)
    fin = tb._finalize_block(d)
    bt = tb._block_t(d)
    gw = tb._group_warps(bt)
    row = dict(HAS_W=True, HAS_PAD=True, CENTER=True, BLOCK_D=block)
    fw = dict(HAS_PAD=True, BLOCK_N=tb.BLOCK_N, BLOCK_F=tb.BLOCK_F)
    blocked = dict(HAS_W=True, HAS_PAD=True, CENTER=True, BLOCK_C=tb.BLOCK_C)
    fwd = _spec("rowwise", "rowwise_fwd", dtype, warps, HAS_RES=True, WRITE_S=True, HAS_B=True, **row) \
        if block <= tb.MAX_BLOCK_FWD else \
        _spec("rowwise", "rowwise_fwd_blocked", dtype, warps, HAS_RES=True, WRITE_S=True, HAS_B=True, **blocked)
    bwd = _spec("rowwise", "rowwise_bwd", dtype, tb._bwd_warps(block), HAS_RES=True, HAS_DS=True, **row) \
        if block <= tb.MAX_BLOCK_BWD else \
        _spec("rowwise", "rowwise_bwd_blocked", dtype, warps, HAS_RES=True, HAS_DS=True, **blocked)
    return [
        fwd,
        bwd,
        _spec("partials", "param_grads", dtype, 4, HAS_W=True, HAS_B=True, BLOCK_F=min(1024, block)),
        _spec("featurewise", "moments_partial", dtype, BLOCK_PAD=tb.BLOCK_PAD, **fw),
        _spec("featurewise", "bn_finalize", dtype, HAS_W=True, UPDATE=True, HAS_NBT=True, CUMULATIVE=True,
              BLOCK_F=fin),
        _spec("featurewise", "bn_normalize", dtype, RUNNING=True, HAS_W=True, HAS_B=True, BLOCK_PAD=tb.BLOCK_PAD,
              **fw),
        _spec("featurewise", "grad_partial", dtype, WRITE_DX=True, **fw),
        _spec("featurewise", "bn_grad_finalize", dtype, HAS_W=True, HAS_B=True, BLOCK_F=fin),
        _spec("featurewise", "bn_input_grad", dtype, **fw),
        _spec("featurewise", "power_normalize", dtype, HAS_W=True, HAS_B=True, SUMSQ=True, **fw),
        _spec("featurewise", "power_finalize", dtype, HAS_NU=True, UPDATE=True, HAS_NBT=True, HAS_FACTOR=True,
              CUMULATIVE=True, BLOCK_F=fin),
        _spec("featurewise", "power_input_grad", dtype, HAS_W=True, HAS_NU=True, **fw),
        _spec("featurewise", "power_grad_finalize", dtype, HAS_W=True, HAS_B=True, MOVE_NU=True, BLOCK_F=fin),
        _spec("featurewise", "instance_finalize", dtype, HAS_NBT=True, CUMULATIVE=True, BLOCK_F=fin),
        # the Sync modules' finalize kernels (seqnorm.distributed, around their collectives)
        _spec("sync", "sync_bn_finalize", dtype, HAS_W=True, UPDATE=True, HAS_NBT=True, CUMULATIVE=True,
              BLOCK_F=fin),
        _spec("sync", "sync_bn_grad_sums", dtype, HAS_W=True, HAS_B=True, BLOCK_F=fin),
        _spec("sync", "sync_bn_input_grad", dtype, **fw),
        _spec("sync", "sync_power_finalize", dtype, HAS_NU=True, UPDATE=True, HAS_NBT=True, HAS_FACTOR=True,
              CUMULATIVE=True, BLOCK_F=fin),
        _spec("sync", "sync_power_grad_sums", dtype, HAS_W=True, HAS_B=True, MOVE_NU=True, BLOCK_F=fin),
        _spec("sync", "sync_nu_finalize", dtype, BLOCK_F=fin),
        # channels-first (B, C, T): the steps T take the place of D
        _spec("groupwise", "groupwise_fwd", dtype, gw, HAS_W=True, HAS_B=True, HAS_PAD=True, BLOCK_T=bt),
        _spec("groupwise", "groupwise_bwd", dtype, gw, HAS_W=True, HAS_PAD=True, BLOCK_T=bt),
    ]


def flag_variants(specs: Iterable[Spec]) -> List[Spec]:
    """Each spec with its boolean flags all off, and with each one off in turn (the
    lighter specializations a launcher also compiles: no padding, no bias, eval, ...)."""
    import dataclasses

    out = []
    for spec in specs:
        flags = [k for k, v in spec.constexprs if isinstance(v, bool)]
        for off in [set(flags)] + [{k} for k in flags]:
            out.append(dataclasses.replace(spec, constexprs=tuple(
                (k, False if k in off else v) for k, v in spec.constexprs)))
    return list(dict.fromkeys(out))


def _signature(fn, spec: Spec) -> Dict[str, str]:
    """Triton's signature of ``fn``: constexprs, int32 sizes and strides, float32
    scalars, pointers to the data dtype, to float32 statistics or to counters."""
    data = "*" + spec.dtype
    scalars = set(_INT_SCALARS) | ({"B"} if spec.kernel == "instance_finalize" else set())
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name.islower() or name in scalars:
            sig[name] = "i32"
        else:
            sig[name] = _POINTER_TYPES.get(name, "*fp32" if name in _F32 else data)
    return sig


_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_v(ptx: str, arch: int) -> str:
    """``ptxas -v``'s log of ``ptx`` (Triton's bundled ptxas, Triton's flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"],
                              capture_output=True, text=True, check=True)
    return done.stderr + done.stdout


def compile_one(spec: Spec, arch: int) -> Report:
    """Compile ``spec`` for ``sm_<arch>`` and read registers and spills from ``ptxas -v``."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    fn = getattr(importlib.import_module(f"seqnorm.backends.triton_kernels.{spec.family}"), spec.kernel)
    const = dict(spec.constexprs)
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in const]
    if missing:
        raise ValueError(f"{spec.kernel}: constexprs {missing} not given")
    src = ASTSource(fn, _signature(fn, spec), constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    log = _ptxas_v(kernel.asm["ptx"], arch)
    regs, frame = _REGS.search(log), _PTXAS_LINE.search(log)
    return Report(spec, arch, int(regs.group(1)), int(frame.group(1)), int(frame.group(2)), int(frame.group(3)))


def compile_report(specs: Iterable[Spec], archs: Sequence[int] = ARCHS, workers: Optional[int] = None
                   ) -> List[Report]:
    """Compile every distinct spec for every arch (in a few threads: most of the
    time is ptxas, a subprocess). Needs kernels defined without ``TRITON_INTERPRET``
    (the interpreter's kernels do not compile): under it, see :func:`report_in_subprocess`."""
    from ..backends.triton_kernels import rowwise

    if not hasattr(rowwise.rowwise_fwd, "params"):
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1: compile in a process without it "
                           "(seqnorm.tools.registers.report_in_subprocess)")
    jobs = list(dict.fromkeys((s, a) for s in specs for a in archs))
    with contextlib.redirect_stdout(io.StringIO()), ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
        return list(pool.map(lambda job: compile_one(*job), jobs))


def loaded_registers() -> Dict[str, Tuple[int, int]]:
    """On a GPU: kernel name → (most registers, most spill bytes) over the
    specializations this process has compiled and loaded (what the driver
    reports at load); empty where none ran compiled (the interpreter)."""
    from ..backends.triton_kernels import featurewise, groupwise, partials, rowwise

    out: Dict[str, Tuple[int, int]] = {}
    for module in (rowwise, featurewise, groupwise, partials):
        for name, fn in vars(module).items():
            for cache in getattr(fn, "device_caches", {}).values():
                kernels = cache[0] if isinstance(cache, tuple) else cache
                for kernel in getattr(kernels, "values", lambda: [])():
                    try:
                        kernel._init_handles()
                        regs, spills = int(kernel.n_regs), int(kernel.n_spills)
                    except Exception:   # not loaded on this device, or another Triton's layout
                        continue
                    old = out.get(name, (0, 0))
                    out[name] = (max(old[0], regs), max(old[1], spills))
    return out


def report_in_subprocess(specs: Sequence[Spec], archs: Sequence[int] = ARCHS, timeout: float = 600
                         ) -> List[Report]:
    """:func:`compile_report` in a fresh Python without ``TRITON_INTERPRET`` (as the
    test suite needs: its kernels run through the interpreter)."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps([[s.family, s.kernel, s.dtype, list(map(list, s.constexprs)), s.num_warps] for s in specs])
    done = subprocess.run([sys.executable, "-m", "seqnorm.tools.registers", ",".join(map(str, archs))],
                          input=payload, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"compiling the kernels failed:\n{done.stderr[-4000:]}")
    by_spec = {(s.family, s.kernel, s.dtype, s.constexprs, s.num_warps): s for s in specs}
    reports = []
    for line in done.stdout.splitlines():
        family, kernel, dtype, constexprs, warps, arch, regs, stack, stores, loads = json.loads(line)
        spec = by_spec[(family, kernel, dtype, tuple(tuple(c) for c in constexprs), warps)]
        reports.append(Report(spec, arch, regs, stack, stores, loads))
    return reports


def _main() -> None:
    """``python -m seqnorm.tools.registers 80,90`` with specs as JSON on stdin:
    one JSON line per compiled kernel on stdout."""
    import json
    import sys

    archs = [int(a) for a in sys.argv[1].split(",")]
    specs = [Spec(f, k, dt, tuple(tuple(c) for c in ce), w) for f, k, dt, ce, w in json.load(sys.stdin)]
    for r in compile_report(specs, archs):
        s = r.spec
        print(json.dumps([s.family, s.kernel, s.dtype, list(map(list, s.constexprs)), s.num_warps, r.arch,
                          r.registers, r.stack, r.spill_stores, r.spill_loads]))


if __name__ == "__main__":
    _main()
