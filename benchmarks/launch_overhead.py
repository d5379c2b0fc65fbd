"""Host µs per Triton launch on a GPU: the cached handles (seqnorm.backends.triton_kernels.launch) against
``kernel[grid]`` (Triton's own run), and host µs per module call on the CUDA path (issue 27).

    python benchmarks/launch_overhead.py [--calls 2000] [--markdown FILE]

Needs a CUDA device (prints why not and exits 0 without one). For each kernel launch measured, the same
arguments are launched ``--calls`` times both ways, alternating in rounds: the CPU time per launch
(``time.thread_time``; the GPU runs behind, so what is timed is the host's part) and the GPU time per
kernel (CUDA events around the whole round, divided by the launches). Then the module calls of every
kind on a small ``(2, 8, 64)`` float32 CUDA input, forward with autograd recording: host µs per call with
the cached handles, with every launch through Triton's own run (``CachedKernel.enabled = False``), and
torch's own module on the same input.
"""

import argparse
import statistics
import sys
import time

import torch


def _rounds(fns, calls: int, rounds: int = 7):
    """``{name: (host µs per call, GPU µs per call)}``: medians over interleaved rounds."""
    host = {k: [] for k in fns}
    gpu = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(50):
            fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            host[name].append((time.thread_time() - t0) / calls * 1e6)
            end.record()
            end.synchronize()
            gpu[name].append(start.elapsed_time(end) / calls * 1e3)
    return {k: (statistics.median(host[k]), statistics.median(gpu[k])) for k in fns}


def launch_rows(calls: int):
    """One row-wise forward launch, LayerNorm of a (16, 64) and a (16·512, 1024) bf16 input, both ways."""
    from seqnorm.backends import triton as tb

    rows = []
    for shape in ((16, 64), (16 * 512, 1024)):
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        w, b = torch.ones(shape[1], device="cuda"), torch.zeros(shape[1], device="cuda")
        pad = torch.zeros(shape[0], dtype=torch.bool, device="cuda")
        y, stats = torch.empty_like(x), x.new_empty((shape[0], 3), dtype=torch.float32)
        block, warps = tb._block_d(shape[1])
        d = shape[1]
        args = (x, x, y, x, w, b, pad.view(torch.uint8), stats, d, d, d, d, d, 1e-5)
        kw = dict(HAS_RES=False, WRITE_S=False, HAS_W=True, HAS_B=True, HAS_PAD=True, CENTER=True,
                  num_warps=warps, BLOCK_D=block)
        spec = tb._rowwise_fwd_kernel(d, False, False, True, True, True, True)   # as the module's call site keeps it
        raw = tb.rk.rowwise_fwd.fn
        grid = (shape[0],)
        res = _rounds({"cached handle": lambda: spec(grid, *args),
                       "kernel[grid]": lambda: raw[grid](*args, **kw)}, calls)
        rows.append((f"rowwise_fwd {shape} bf16", res))
    return rows


def module_rows(calls: int):
    """Host µs per module call (forward, autograd recording) on the CUDA path, cached vs kernel[grid]."""
    from torch import nn

    import seqnorm
    from seqnorm.backends.triton_kernels.launch import CachedKernel

    dev = "cuda"
    x = torch.randn(2, 8, 64, device=dev)
    xt = x.transpose(1, 2).contiguous()
    mask = torch.zeros(2, 8, dtype=torch.bool, device=dev)
    mask[1, 5:] = True
    r = x.flip(0).contiguous()
    cases = [
        ("LayerNorm", seqnorm.LayerNorm(64).to(dev), lambda m: m(x, padding_mask=mask), nn.LayerNorm(64).to(dev),
         lambda m: m(x)),
        ("RMSNorm", seqnorm.RMSNorm(64).to(dev), lambda m: m(x, padding_mask=mask), nn.RMSNorm(64).to(dev),
         lambda m: m(x)),
        ("AddNorm", seqnorm.AddNorm(64).to(dev), lambda m: m(x, r, padding_mask=mask), nn.LayerNorm(64).to(dev),
         lambda m: m(x + r)),
        ("SeqBatchNorm train", seqnorm.SeqBatchNorm(64).to(dev), lambda m: m(x, padding_mask=mask),
         nn.BatchNorm1d(64).to(dev), lambda m: m(xt)),
        ("SeqBatchNorm eval", seqnorm.SeqBatchNorm(64).to(dev).eval(), lambda m: m(x, padding_mask=mask),
         nn.BatchNorm1d(64).to(dev).eval(), lambda m: m(xt)),
        ("PowerNorm train", seqnorm.PowerNorm(64).to(dev), lambda m: m(x, padding_mask=mask),
         nn.BatchNorm1d(64).to(dev), lambda m: m(xt)),
        ("GroupNorm", seqnorm.GroupNorm(4, 64).to(dev), lambda m: m(xt, padding_mask=mask),
         nn.GroupNorm(4, 64).to(dev), lambda m: m(xt)),
        ("InstanceNorm1d", seqnorm.InstanceNorm1d(64).to(dev), lambda m: m(xt, padding_mask=mask),
         nn.InstanceNorm1d(64).to(dev), lambda m: m(xt)),
    ]
    rows = []
    with seqnorm.use_backend("triton"):
        for name, ours, call, theirs, tcall in cases:
            def uncached(ours=ours, call=call):
                CachedKernel.enabled = False
                try:
                    return call(ours)
                finally:
                    CachedKernel.enabled = True
            res = _rounds({"cached": lambda: call(ours), "kernel[grid]": uncached,
                           "torch": lambda: tcall(theirs)}, max(calls // 10, 50))
            rows.append((name, res))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_overhead: no CUDA device; nothing measured")
        return 0
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
             f"{__import__('triton').__version__}; host µs = CPU time per call, GPU µs = CUDA events", "",
             "| launch | cached: host µs | GPU µs | kernel[grid]: host µs | GPU µs |", "|---|---:|---:|---:|---:|"]
    for name, res in launch_rows(args.calls):
        (ch, cg), (kh, kg) = res["cached handle"], res["kernel[grid]"]
        lines.append(f"| {name} | {ch:.2f} | {cg:.2f} | {kh:.2f} | {kg:.2f} |")
    lines += ["", "| module call (2, 8, 64) fp32, forward with grad | cached: host µs | kernel[grid]: host µs "
              "| torch module: host µs | cached × torch |", "|---|---:|---:|---:|---:|"]
    for name, res in module_rows(args.calls):
        c, k, t = res["cached"][0], res["kernel[grid]"][0], res["torch"][0]
        lines.append(f"| {name} | {c:.1f} | {k:.1f} | {t:.1f} | {c / t:.2f}× |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
