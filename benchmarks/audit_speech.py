"""The README's audit table: `seqnorm audit --hf MODEL` (base size: the config class's defaults,
12 layers, 768 wide, random weights; a batch of 4 waveforms of 16,000 → 7,200 samples), eval and
train, before and after make_padding_safe; wall time of each audit on this machine.

    python benchmarks/audit_speech.py [--small]
"""

import copy
import sys
import time


import seqnorm
from seqnorm import hf
from seqnorm.commands.audit import hf_case


def main():
    small = "--small" in sys.argv
    print("| model | mode | first leak (category) | leaking rows before | after `--safe` (largest counted Δ) "
          "| audit s (before / after) |")
    print("|---|---|---|---:|---|---|")
    for name in hf.SPEECH_MODELS:
        model, x, lengths, kw = hf_case(name, None, small, None, 4, None, 0)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        safe = seqnorm.make_padding_safe(copy.deepcopy(model))
        for train in (False, True):
            t0 = time.perf_counter()
            before = seqnorm.audit(model, x, lengths, train=train, **kw)
            t1 = time.perf_counter()
            after = seqnorm.audit(safe, x, lengths, train=train, **kw)
            t2 = time.perf_counter()
            row = next(r for r in before.modules if r.name == before.first_leak) if before.first_leak else None
            leak = f"`{before.first_leak}` ({row.category})" if row else "none"
            n_leaks = sum(r.leaks for r in before.modules)
            worst = max(max((r.alone or 0) if r.alone_counts else 0, r.padding or 0) for r in after.modules)
            print(f"| {name} ({params:.0f} M) | {'train' if train else 'eval'} | {leak} | {n_leaks} of "
                  f"{len(before.modules)} | {after.first_leak or 'no leak'} ({worst:.1e}) | "
                  f"{t1 - t0:.1f} / {t2 - t1:.1f} |", flush=True)


if __name__ == "__main__":
    main()
