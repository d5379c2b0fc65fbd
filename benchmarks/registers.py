"""Registers and spills of every triton-backend kernel specialization, compiled for sm_80 and sm_90
by Triton's bundled ptxas (no GPU needed): `python benchmarks/registers.py [--widths 1,64,...]
[--dtypes fp32,bf16,fp16] [--archs 80,90]`.

With --flag-variants also the lighter specializations (each boolean flag off in turn, and all off).
Prints a markdown table (one line per distinct specialization: registers per thread on each arch,
bytes of stack frame / spill stores / spill loads) and a summary line; exits 1 if anything spills.
The widths are the row widths D of the row-wise kernels, the steps T of the group-wise ones, and
set the finalize kernels' blocks; the feature-wise tile kernels do not depend on D.
"""

import argparse
import sys
import time

from seqnorm.tools.registers import ARCHS, DTYPES, WIDTHS, compile_report, flag_variants, specializations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--flag-variants", action="store_true",
                        help="also every lighter specialization (each boolean flag off in turn, and all off)")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    archs = [int(a) for a in args.archs.split(",")]
    specs = list(dict.fromkeys(s for d in widths for dt in args.dtypes.split(",") for s in specializations(d, dt)))
    if args.flag_variants:
        specs = list(dict.fromkeys(specs + flag_variants(specs)))
    start = time.perf_counter()
    reports = compile_report(specs, archs, args.workers)
    by_spec = {}
    for r in reports:
        by_spec.setdefault(r.spec, {})[r.arch] = r
    print(f"{len(specs)} specializations × sm_{'/sm_'.join(map(str, archs))}, widths {widths}, "
          f"compiled in {time.perf_counter() - start:.0f} s\n")
    print("| kernel [dtype, blocks, warps] | " + " | ".join(f"sm_{a} registers" for a in archs)
          + " | stack / spill stores / spill loads (bytes) |")
    print("|---|" + "---:|" * len(archs) + "---|")
    for spec, per_arch in by_spec.items():
        spill = "; ".join(f"sm_{a}: {r.stack}/{r.spill_stores}/{r.spill_loads}"
                          for a, r in sorted(per_arch.items()) if r.spills) or "0"
        print(f"| {spec.label} | " + " | ".join(str(per_arch[a].registers) for a in archs) + f" | {spill} |")
    spilling = sum(r.spills for r in reports)
    print(f"\n{len(reports)} compiled kernels, {spilling} with stack or local memory (spills); "
          f"most registers: {max(r.registers for r in reports)}")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
