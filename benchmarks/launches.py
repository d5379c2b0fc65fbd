"""Launches per module call on the CUDA path, counted without a GPU (seqnorm.tools.launches).

    TRITON_INTERPRET=1 python benchmarks/launches.py [--backend triton] [--detail]

Prints a markdown table: forward and backward launches (Triton kernels + torch ops that
start a kernel) of one masked module call, the module in bfloat16 and in float32 (input
bfloat16 both times), with the running-statistics policy a CUDA tensor gets. On a CUDA
machine (no TRITON_INTERPRET) it counts the real path on the GPU.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from seqnorm.tools.launches import (BUDGET, SYNC_BUDGET, launch_table, split_collectives,  # noqa: E402
                                       sync_launch_table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--detail", action="store_true", help="list the ops of every count")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tables = {p: launch_table(param_dtype=p, backend=args.backend, device=device)
              for p in (torch.bfloat16, torch.float32)}
    print(f"backend {args.backend}, device {device}, input bf16 (2, 5, 8) masked")
    print("| module call | fwd (bf16 module) | bwd (bf16 module) | fwd (fp32 module) | bwd (fp32 module) | budget |")
    print("|---|---:|---:|---:|---:|---|")
    for i, (label, *_) in enumerate(tables[torch.float32]):
        cells = []
        for p in (torch.bfloat16, torch.float32):
            _, f, b = tables[p][i]
            cells += [str(sum(f.values())), str(sum(b.values()))]
        fb, bb = BUDGET[label]
        print(f"| {label} | {' | '.join(cells)} | ≤ {fb} / ≤ {bb} |")
    # the Sync modules in a one-rank gloo group: local launches + collectives (one each way per rank)
    sync = {p: sync_launch_table(param_dtype=p, backend=args.backend, device=device)
            for p in (torch.bfloat16, torch.float32)}
    for i, (label, *_) in enumerate(sync[torch.float32]):
        cells = []
        for p in (torch.bfloat16, torch.float32):
            _, f, b = sync[p][i]
            (fl, fc), (bl, bc) = split_collectives(f), split_collectives(b)
            cells += [f"{sum(fl.values())} + {sum(fc.values())}", f"{sum(bl.values())} + {sum(bc.values())}"]
        fb, bb = SYNC_BUDGET[label]
        print(f"| {label} (local + collectives) | {' | '.join(cells)} | ≤ {fb} + 1 / ≤ {bb} + 1 |")
    tables.update({("sync", p): rows for p, rows in sync.items()})
    if args.detail:
        for p, rows in tables.items():
            for label, f, b in rows:
                print(f"{label} [{p}]\n  fwd {dict(f)}\n  bwd {dict(b)}")


if __name__ == "__main__":
    main()
