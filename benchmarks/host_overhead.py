"""Host cost of a seqnorm module call: Python time per call, and reads back to the host per forward.

Two tables (issue 16's "host overhead", issue 20's "no host synchronization"):

* **overhead** — time per module call on a tiny input, (B, T, D) = (2, 8, 64) float32 on the CPU, one
  thread, the backend ``auto`` picks there (torch), against torch's own module in the same process: the
  median over ``--rounds`` rounds of ``--calls`` calls each, seqnorm and torch alternating round by round.
  Time is the thread's CPU time (the machine is shared). At this size the kernels take ~2 µs, so what
  is timed is the Python around them: argument checks,
  padding resolution, backend choice, the running-statistics policy — the same on every backend, so a
  GPU call pays it too.
* **reads** — values read back to the host per forward (``.item()``, ``int()``, ``bool()``, ``tolist``,
  ``nonzero``, ``torch.equal``, boolean indexing) under the running-statistics policy a CUDA tensor
  gets (forced on CPU tensors, as ``tests/test_no_host_sync.py`` does), counted by a dispatch mode. On a
  GPU each one stalls the stream until the device catches up.

    python benchmarks/host_overhead.py              # both tables, markdown
    python benchmarks/host_overhead.py overhead     # or: reads
    python benchmarks/host_overhead.py floor        # the ops of a fast-path call alone, vs torch
    python benchmarks/host_overhead.py overhead --cuda-path   # the CUDA path's host time (below)

``--cuda-path`` times the path a CUDA tensor takes, without a GPU (issue 27): backend ``triton`` (through
Triton's interpreter, ``TRITON_INTERPRET=1``, so that it takes CPU tensors), the sync-free running-statistics
policy a CUDA tensor gets forced (``seqnorm.running.sync_free``), every Triton launch replaced by a no-op —
what is left is seqnorm's Python and torch's dispatch — for every module kind, against torch's module on
the same CPU input.
"""

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections import Counter

if "--cuda-path" in sys.argv:        # before Triton is imported: its kernels become interpreted functions
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import seqnorm
from seqnorm import running

B, T, D = 2, 8, 64


# ---------------------------------------------------------------------------
# overhead: µs per call, seqnorm vs torch
# ---------------------------------------------------------------------------


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=gen)
    lengths = torch.tensor([T, T - 3])
    mask = torch.arange(T)[None, :] >= lengths[:, None]
    return x, mask, lengths


def _cases():
    """(name, seqnorm call, torch call, how the seqnorm call runs) — each call a closure over its module."""
    x, mask, lengths = _inputs()
    xt = x.transpose(1, 2).contiguous()                   # (B, D, T): BatchNorm1d's and GroupNorm's layout
    ln, tln = seqnorm.LayerNorm(D), nn.LayerNorm(D)
    rms, trms = seqnorm.RMSNorm(D), nn.RMSNorm(D)
    bn, tbn = seqnorm.SeqBatchNorm(D).train(), nn.BatchNorm1d(D).train()
    pn = seqnorm.PowerNorm(D).train()     # torch has none: against BatchNorm1d's training step
    gn, tgn = seqnorm.GroupNorm(4, D), nn.GroupNorm(4, D)
    context = seqnorm.padding(mask)
    return [
        ("LayerNorm, padding_mask", lambda: ln(x, padding_mask=mask), lambda: tln(x), None),
        ("LayerNorm, lengths", lambda: ln(x, lengths=lengths), lambda: tln(x), None),
        ("LayerNorm under seqnorm.padding", lambda: ln(x), lambda: tln(x), context),
        ("RMSNorm, padding_mask", lambda: rms(x, padding_mask=mask), lambda: trms(x), None),
        ("SeqBatchNorm train, padding_mask", lambda: bn(x, padding_mask=mask), lambda: tbn(xt), None),
        ("PowerNorm train, padding_mask", lambda: pn(x, padding_mask=mask), lambda: tbn(xt), None),
        ("GroupNorm, padding_mask", lambda: gn(xt, padding_mask=mask), lambda: tgn(xt), None),
    ]


def _cuda_cases():
    """(name, seqnorm call, torch call, None) for every module kind, masked, as a CUDA tensor's call runs
    (see :func:`cuda_path`)."""
    x, mask, lengths = _inputs()
    r = x.flip(0).contiguous()
    xt = x.transpose(1, 2).contiguous()                   # (B, D, T): the channels-first kinds' layout
    ln, tln = seqnorm.LayerNorm(D), nn.LayerNorm(D)
    rms, trms = seqnorm.RMSNorm(D), nn.RMSNorm(D)
    add = seqnorm.AddNorm(D)
    bn, tbn = seqnorm.SeqBatchNorm(D).train(), nn.BatchNorm1d(D).train()
    bne, tbne = seqnorm.SeqBatchNorm(D).eval(), nn.BatchNorm1d(D).eval()
    pn = seqnorm.PowerNorm(D).train()     # torch has none: against BatchNorm1d's training step
    gn, tgn = seqnorm.GroupNorm(4, D), nn.GroupNorm(4, D)
    inorm, tinorm = seqnorm.InstanceNorm1d(D), nn.InstanceNorm1d(D)
    return [
        ("LayerNorm, padding_mask", lambda: ln(x, padding_mask=mask), lambda: tln(x), None),
        ("RMSNorm, padding_mask", lambda: rms(x, padding_mask=mask), lambda: trms(x), None),
        ("AddNorm, padding_mask (vs LayerNorm of x + r)", lambda: add(x, r, padding_mask=mask),
         lambda: tln(x + r), None),
        ("SeqBatchNorm train, padding_mask", lambda: bn(x, padding_mask=mask), lambda: tbn(xt), None),
        ("SeqBatchNorm eval, padding_mask", lambda: bne(x, padding_mask=mask), lambda: tbne(xt), None),
        ("PowerNorm train, padding_mask (vs BatchNorm1d train)", lambda: pn(x, padding_mask=mask),
         lambda: tbn(xt), None),
        ("GroupNorm, padding_mask", lambda: gn(xt, padding_mask=mask), lambda: tgn(xt), None),
        ("InstanceNorm1d, padding_mask", lambda: inorm(xt, padding_mask=mask), lambda: tinorm(xt), None),
    ]


@contextlib.contextmanager
def cuda_path():
    """The path a CUDA tensor takes, on CPU tensors: backend ``triton`` (interpreted), the sync-free
    running-statistics policy forced, and every Triton launch a no-op — ``kernel[grid]`` (Triton's
    ``run``) and, where seqnorm has them, its cached launch handles alike."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    classes = [(interpreter.InterpretedFunction, "run"), (jit.JITFunction, "run")]
    try:      # seqnorm's cached handles (issue 27): the interpreted one stands where the launcher's call is
        from seqnorm.backends.triton_kernels import launch as cached
        classes += [(cached._Interpreted, "__call__"), (cached._Compiled, "__call__")]
    except ImportError:
        pass
    saved = [(cls, attr, getattr(cls, attr)) for cls, attr in classes]
    real = running.sync_free

    def no_launch(*args, **kwargs):
        return None

    for cls, attr, _ in saved:
        setattr(cls, attr, no_launch)
    running.sync_free = lambda t: True
    try:
        with seqnorm.use_backend("triton"):
            yield
    finally:
        running.sync_free = real
        for cls, attr, original in saved:
            setattr(cls, attr, original)


def _time(fn, calls: int) -> float:
    """µs per call of ``fn``, in CPU time of this thread: on a shared machine the time
    the thread waits for a core is not the call's cost (wall time drifted 2–3× here)."""
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e6


def overhead(rounds: int, calls: int, grad: bool, cuda: bool = False):
    """Rows ``(case, seqnorm µs, torch µs, ratio)``: medians of interleaved rounds; a
    forward with autograd recording (parameters require grad), or under ``no_grad``;
    ``cuda``: the CUDA path's cases (:func:`cuda_path`)."""
    torch.set_num_threads(1)
    rows = []
    with torch.set_grad_enabled(grad), (cuda_path() if cuda else contextlib.nullcontext()):
        for name, ours, theirs, context in (_cuda_cases() if cuda else _cases()):
            if context is not None:
                context.__enter__()
            try:
                for fn in (ours, theirs):           # warm-up: first-call imports, allocator
                    _time(fn, calls)
                a, b = [], []
                for _ in range(rounds):
                    a.append(_time(ours, calls))
                    b.append(_time(theirs, calls))
            finally:
                if context is not None:
                    context.__exit__(None, None, None)
            sa, sb = statistics.median(a), statistics.median(b)
            rows.append((name, sa, sb, sa / sb))
    return rows


def _floor_cases():
    """(name, bare ops, torch call): the torch ops a seqnorm fast-path call runs, written out with
    no Python around them (no checks, no module call) — the floor of that design — against torch's
    own module call, as in :func:`_cases`."""
    x, mask, lengths = _inputs()
    xt = x.transpose(1, 2).contiguous()
    tln, tbn = nn.LayerNorm(D), nn.BatchNorm1d(D).train()
    w, b = tln.weight, tln.bias
    bw, bb = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))
    rm, rv, nbt = torch.zeros(D), torch.ones(D), torch.tensor(0)
    col = mask.unsqueeze(-1)
    real = torch.logical_not(mask.reshape(-1)).nonzero().squeeze(1)
    shape = (D,)

    def layer_norm():      # (with autograd recording: fill the input too; see functional._host_rowwise)
        x1 = x.masked_fill(col, 0) if torch.is_grad_enabled() else x
        return torch.layer_norm(x1, shape, w, b, 1e-5).masked_fill_(col, 0)

    def batch_norm():      # backends.torch.batch_norm_train_rows with its running update
        x2 = x.view(-1, D)
        xr = x2.index_select(0, real)
        shift = xr.select(0, 0)
        stats = x2.new_zeros(2, D)
        mean, var = stats.unbind(0)
        yr = torch.native_batch_norm(xr - shift, bw, bb, mean, var, True, 1.0, 1e-5)[0]
        if math.isfinite(torch.linalg.vector_norm(stats, math.inf).item()):
            torch._foreach_lerp_([rm, rv], [mean + shift, var], 0.1)
            nbt.add_(1)
        return torch.zeros_like(x2).index_copy_(0, real, yr).view_as(x)

    return [("LayerNorm, padding_mask: its ops alone", layer_norm, lambda: tln(x)),
            ("SeqBatchNorm train, padding_mask: its ops alone", batch_norm, lambda: tbn(xt))]


def floor(rounds: int, calls: int, grad: bool):
    """Rows ``(case, ops µs, torch µs, ratio)`` as :func:`overhead`'s, for :func:`_floor_cases`."""
    torch.set_num_threads(1)
    rows = []
    with torch.set_grad_enabled(grad):
        for name, ours, theirs in _floor_cases():
            for fn in (ours, theirs):
                _time(fn, calls)
            a, b = [], []
            for _ in range(rounds):
                a.append(_time(ours, calls))
                b.append(_time(theirs, calls))
            sa, sb = statistics.median(a), statistics.median(b)
            rows.append((name, sa, sb, sa / sb))
    return rows


# ---------------------------------------------------------------------------
# reads: host reads per forward under the sync-free policy
# ---------------------------------------------------------------------------

#: aten ops that read tensor data back to the host (on CUDA: a stream synchronization)
READ_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.is_nonzero", "aten.masked_select",
            "aten._unique2", "aten.unique_consecutive", "aten.unique_dim"}


class HostReads:
    """Count host reads: aten ops that read data (seen by a dispatch mode), boolean-mask indexing
    (an implicit ``nonzero``), and ``tolist`` / ``numpy``, which read a CPU tensor without dispatch."""

    def __init__(self):
        self.counts = Counter()
        outer = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if name in READ_OPS or (name in ("aten.index", "aten.index_put", "aten.index_put_")
                                        and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                for i in (args[1] or ()) if i is not None)):
                    outer.counts[name] += 1
                return func(*args, **(kwargs or {}))

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in (torch.Tensor.tolist, torch.Tensor.numpy):
                    outer.counts[func.__name__] += 1
                return func(*args, **(kwargs or {}))

        self._modes = (_Function(), _Dispatch())

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)

    def total(self) -> int:
        return sum(self.counts.values())


def count_reads(fn) -> Counter:
    """Host reads of one call of ``fn`` under the sync-free policy forced on CPU tensors."""
    real = running.sync_free
    running.sync_free = lambda t: True
    try:
        with HostReads() as reads:
            fn()
    finally:
        running.sync_free = real
    return reads.counts


def _conv_stack():
    torch.manual_seed(0)
    return seqnorm.make_padding_safe(nn.Sequential(
        nn.Conv1d(3, 8, 5, stride=2, padding=2), nn.BatchNorm1d(8), nn.GELU(),
        nn.Conv1d(8, 8, 3, dilation=2, padding="same"), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.MaxPool1d(3, stride=2, padding=1), nn.InstanceNorm1d(8, affine=True),
        nn.AvgPool1d(2), nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1), nn.Tanh(),
        nn.Conv1d(4, 4, 4, padding=2), nn.GroupNorm(1, 4))).train()


def read_cases():
    """(case, fn) pairs: one forward each."""
    from seqnorm import kinds

    x, mask, lengths = _inputs()
    cases = []
    for kind in ("layer", "rms", "add_layer", "masked_batch", "power", "group", "instance"):
        extra = {"group": dict(num_groups=4), "instance": dict(affine=True, track_running_stats=True)}
        m = kinds.build(kind, D, **extra.get(kind, {})).train()
        xi = x.transpose(1, 2).contiguous() if kinds.kind(kind).channels_first else x
        call = (lambda m=m, xi=xi, **kw: m(xi, xi, **kw)) if kind == "add_layer" else \
            (lambda m=m, xi=xi, **kw: m(xi, **kw))
        cases.append((f"{kind}: lengths=", lambda call=call: call(lengths=lengths)))
        cases.append((f"{kind}: padding(lengths=)", lambda call=call: _in(call, lengths=lengths)))
        cases.append((f"{kind}: padding(mask)", lambda call=call: _in(call, mask)))
    stack, wave = _conv_stack(), torch.randn(2, 3, 57)
    wave_lengths = torch.tensor([57, 30])
    cases.append(("conv stack: padding(lengths=)", lambda: _in(lambda: stack(wave), lengths=wave_lengths)))
    cases.append(("conv stack: padding(mask)",
                  lambda: _in(lambda: stack(wave), torch.arange(57)[None] >= wave_lengths[:, None])))
    try:
        from seqnorm import hf
        for name in ("wav2vec2", "hubert"):
            model = seqnorm.make_padding_safe(hf.build(name))
            audio, audio_lengths = torch.randn(2, 1600), torch.tensor([1600, 1000])
            cases.append((f"HF {name} (small): padding(lengths=)",
                          lambda model=model, audio=audio, al=audio_lengths: _in(lambda: model(audio), lengths=al)))
    except ImportError:   # transformers is a test dependency
        pass
    return cases


def _in(call, mask=None, **kw):
    with torch.no_grad(), seqnorm.padding(mask, **kw):
        return call()


def reads_table():
    return [(name, count_reads(fn)) for name, fn in read_cases()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", nargs="?", choices=("overhead", "floor", "reads", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--cuda-path", action="store_true",
                        help="the CUDA path's host time: backend triton, the sync-free policy, Triton launches "
                             "as no-ops, every module kind")
    args = parser.parse_args(argv)
    if args.table in ("overhead", "both"):
        how = ("backend triton (interpreted, launches no-ops), sync-free policy" if args.cuda_path
               else "backend auto")
        print(f"host time per call, ({B}, {T}, {D}) float32, CPU, 1 thread, {how}; "
              f"median of {args.rounds} rounds × {args.calls} calls\n")
        print("| module call | forward: seqnorm µs | torch µs | × torch | no_grad: seqnorm µs | torch µs | × torch |"
              "\n|---|---:|---:|---:|---:|---:|---:|")
        for grad_row, plain_row in zip(overhead(args.rounds, args.calls, True, args.cuda_path),
                                       overhead(args.rounds, args.calls, False, args.cuda_path)):
            cells = " | ".join(f"{a:.1f} | {b:.1f} | {r:.2f}×" for _, a, b, r in (grad_row, plain_row))
            print(f"| {grad_row[0]} | {cells} |")
        print()
    if args.table == "floor":
        print(f"the ops of a fast-path call alone, ({B}, {T}, {D}) float32, CPU, 1 thread; "
              f"median of {args.rounds} rounds × {args.calls} calls\n")
        print("| ops | forward: ops µs | torch µs | × torch | no_grad: ops µs | torch µs | × torch |"
              "\n|---|---:|---:|---:|---:|---:|---:|")
        for grad_row, plain_row in zip(floor(args.rounds, args.calls, True), floor(args.rounds, args.calls, False)):
            cells = " | ".join(f"{a:.1f} | {b:.1f} | {r:.2f}×" for _, a, b, r in (grad_row, plain_row))
            print(f"| {grad_row[0]} | {cells} |")
        print()
    if args.table in ("reads", "both"):
        print("host reads per forward, sync-free policy forced on CPU\n")
        print("| case | reads | which |\n|---|---:|---|")
        for name, counts in reads_table():
            which = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "—"
            print(f"| {name} | {sum(counts.values())} | {which} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
