"""Host cost of ``make_padding_safe``'s hooks on a small speech model (issue 27, "Hooks").

A test-sized model (``hf.build``: hidden 32, 2 layers, a 3-layer conv feature encoder) does so
little arithmetic that its forward is mostly Python: what the padding-safe model adds is host
time, the hooks' and the masked norms'. Three tables:

* **ratio** — the padding-safe model (``make_padding_safe``, called as users call it:
  ``model(x, attention_mask=mask)``, whose call hook opens the padding context) against the
  stock model (a copy taken before), eval, ``no_grad``, a batch of 2 utterances of 1,600 and
  1,000 samples padded to 1,600. Thread CPU time per forward (one torch thread, so the thread
  does all the work; the machine is shared), safe and stock alternating round by round in one
  process: median and minimum over the rounds, and the ratio of the medians. Two ways to call:
  the same mask tensor every call (a padding-safe model keeps the context a mask opened for
  that mask object, as ``generate``'s steps reuse the encoder's) and a new mask tensor each
  call (a new batch: every rate's lengths and masks are made again; both models get the copy).
* **breakdown** — µs per hook call, by kind of hooked layer: each hook ``make_padding_safe``
  registered is wrapped in a timer (the timer's own cost, calibrated on an empty hook, is
  subtracted), and so is the ``forward`` of every norm (masked in the safe model, torch's in the
  stock one): what one conv time layer's pair of hooks costs, one norm's pre-hook, one
  attention module's hook, the model call's, and how much more a masked norm's forward takes
  than torch's; for both ways to call;
* **alone** — each hooked call of a kept context's forward (the same mask again) repeated in a
  loop: its pre-hook, then its forward hook, with the context and arguments the forward gave
  them; no timer inside, no model around it: the hooks' own cost, summed by kind.

    PYTHONPATH=src python benchmarks/padding_safe_host.py                 # wav2vec2 and hubert
    PYTHONPATH=src python benchmarks/padding_safe_host.py --models wav2vec2 --rounds 60
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections import defaultdict

import torch

import seqnorm
from seqnorm import hf

LONG, SHORT = 1600, 1000


def inputs():
    x = torch.randn(2, LONG, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, LONG, dtype=torch.long)
    mask[1, SHORT:] = 0
    return x, mask


def models(model_type: str):
    """(stock, padding-safe) copies of one small model."""
    stock = hf.build(model_type)
    return stock, seqnorm.make_padding_safe(copy.deepcopy(stock))


def per_forward(model, x, mask, calls: int, new_mask: bool = False) -> float:
    """Thread CPU seconds per forward, over ``calls`` forwards (``new_mask``: a copy of
    ``mask`` for each)."""
    with torch.no_grad():
        t0 = time.thread_time()
        for _ in range(calls):
            model(x, attention_mask=mask.clone() if new_mask else mask)
        return (time.thread_time() - t0) / calls


def _called(model_type: str, new_mask: bool) -> str:
    return f"{model_type}, {'new mask each call' if new_mask else 'same mask'}"


def ratio(model_type: str, rounds: int, calls: int, new_mask: bool) -> dict:
    stock, safe = models(model_type)
    x, mask = inputs()
    for _ in range(3):                     # warm-up: first-call caches, allocator
        per_forward(safe, x, mask, calls, new_mask), per_forward(stock, x, mask, calls, new_mask)
    times = {"safe": [], "stock": []}
    for r in range(rounds):                # alternate which goes first, so neither always follows the other
        order = ("safe", "stock") if r % 2 == 0 else ("stock", "safe")
        for which in order:
            times[which].append(per_forward(safe if which == "safe" else stock, x, mask, calls, new_mask))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return dict(model=_called(model_type, new_mask), safe_ms=med["safe"] * 1e3, stock_ms=med["stock"] * 1e3,
                safe_min_ms=low["safe"] * 1e3, stock_min_ms=low["stock"] * 1e3, ratio=med["safe"] / med["stock"],
                ratio_min=low["safe"] / low["stock"])


# ---------------------------------------------------------------------------
# breakdown: a timer around every hook and every norm's forward
# ---------------------------------------------------------------------------

#: hook function (its qualified name's first part) → the kind of hooked layer it serves
HOOK_KINDS = {
    "_time_pre_hook": "conv/pool time layer", "_time_hook": "conv/pool time layer",
    "_norm_pre_hook": "norm (pre-hook + undo)", "_undo_hook": "norm (pre-hook + undo)",
    "_hf_pre_hook": "attention", "_mha_pre_hook": "attention",
    "_open_hook": "model call (opens the context)", "_close_hook": "model call (opens the context)",
}


def _kind(hook) -> str:
    name = getattr(hook, "__qualname__", type(hook).__name__).split(".")[0]
    return HOOK_KINDS.get(name, name)


class Timers:
    """Thread CPU time per label: ``spent[label]`` seconds over ``calls[label]`` calls, made
    of ``timed[label]`` timed invocations (a pair of hooks is one call of two)."""

    def __init__(self):
        self.spent, self.calls, self.timed = defaultdict(float), defaultdict(int), defaultdict(int)

    def wrap(self, label: str, fn, count: bool = True):
        spent, calls, timed_, clock = self.spent, self.calls, self.timed, time.thread_time

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += clock() - t0
                timed_[label] += 1
                if count:
                    calls[label] += 1
        return timed

    def clear(self):
        self.spent.clear(), self.calls.clear(), self.timed.clear()

    def per_call(self, label: str, cost: float) -> float:
        """Seconds per call of ``label``, less ``cost`` per timed invocation (the timer's own)."""
        return (self.spent[label] - self.timed[label] * cost) / self.calls[label]


NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d, torch.nn.InstanceNorm1d, torch.nn.RMSNorm,
         seqnorm.LayerNorm, seqnorm.GroupNorm, seqnorm.InstanceNorm1d, seqnorm.RMSNorm, seqnorm.SeqBatchNorm)


def norm_labels(stock) -> dict:
    """Name → class name of each norm of the stock model (the label its masked counterpart gets too)."""
    return {name: type(m).__name__ for name, m in stock.named_modules() if isinstance(m, NORMS)}


def instrument(model, timers: Timers, hooks: bool, norms: dict) -> None:
    """Time ``model``'s hooks (``hooks``) and the forwards of its norms named in ``norms``
    (name → label: the stock class, so a masked norm is timed against the one it replaced),
    in place."""
    for name, m in model.named_modules():
        if hooks:
            for table in (m._forward_pre_hooks, m._forward_hooks):
                for key, fn in list(table.items()):
                    # a pair of hooks (pre + post) counts as one call, on the pre-hook
                    table[key] = timers.wrap(_kind(fn), fn, count=table is m._forward_pre_hooks)
        if name in norms:
            m.forward = timers.wrap(f"{norms[name]} forward", m.forward)


def timer_cost(n: int = 20000) -> float:
    """Seconds the timer adds to one wrapped call (subtracted from every timed invocation)."""
    timers = Timers()
    f = timers.wrap("empty", lambda *a: None)
    g = lambda *a: None     # noqa: E731
    best = []
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(n):
            f(1, 2)
        wrapped = time.thread_time() - t0
        t0 = time.thread_time()
        for _ in range(n):
            g(1, 2)
        best.append((wrapped - (time.thread_time() - t0)) / n)
    return statistics.median(best)


def breakdown(model_type: str, forwards: int, new_mask: bool) -> dict:
    """Per forward, interleaved, ``forwards`` each: ``hooks`` rows ``(what, calls, µs per
    call, µs per forward)``, ``norms`` rows ``(class, calls, safe µs, torch µs, extra µs
    per forward)``, and the whole forward's extra time, less the timers'."""
    stock, safe = models(model_type)
    x, mask = inputs()
    st, ss = Timers(), Timers()
    norms = norm_labels(stock)
    instrument(stock, st, hooks=False, norms=norms)
    instrument(safe, ss, hooks=True, norms=norms)
    for _ in range(5):
        per_forward(safe, x, mask, 1, new_mask), per_forward(stock, x, mask, 1, new_mask)
    st.clear(), ss.clear()
    total = {"safe": 0.0, "stock": 0.0}
    for _ in range(forwards):              # interleaved, one forward each
        total["safe"] += per_forward(safe, x, mask, 1, new_mask)
        total["stock"] += per_forward(stock, x, mask, 1, new_mask)
    cost = timer_cost()
    hooks, norms = [], []
    for label in sorted(ss.spent):
        n = ss.calls[label] / forwards
        if label.endswith(" forward"):
            safe_us, torch_us = ss.per_call(label, cost) * 1e6, st.per_call(label, cost) * 1e6
            norms.append((label[: -len(" forward")], n, safe_us, torch_us, n * (safe_us - torch_us)))
        else:
            hooks.append((label, n, ss.per_call(label, cost) * 1e6, n * ss.per_call(label, cost) * 1e6))
    extra = ((total["safe"] - sum(ss.timed.values()) * cost) - (total["stock"] - sum(st.timed.values()) * cost))
    return dict(model=_called(model_type, new_mask), hooks=hooks, norms=norms, extra_us=extra / forwards * 1e6,
                stock_us=(total["stock"] - sum(st.timed.values()) * cost) / forwards * 1e6, timer_us=cost * 1e6)


# ---------------------------------------------------------------------------
# alone: each hooked layer's hooks called in a loop, with a forward's context and arguments
# ---------------------------------------------------------------------------


def _captured_calls(model, x, mask) -> list:
    """``(kind, module name, pre, post, context)`` for each hooked call of one forward
    (a kept context's: the model was called with ``mask`` before): ``pre`` and ``post``
    are the hooks' functions bound to the arguments they got."""
    from seqnorm import masks

    calls = []

    def capture(name, table, key, fn, pre):
        def hook(*args, **kwargs):
            ctx = masks.current_padding()
            out = fn(*args, **kwargs)
            calls.append((_kind(fn), name, pre, fn, args, kwargs, ctx))
            return out
        table[key] = hook

    saved = []
    for name, m in model.named_modules():
        for table in (m._forward_pre_hooks, m._forward_hooks):
            saved.append((table, dict(table)))
            for key, fn in list(table.items()):
                capture(name, table, key, fn, table is m._forward_pre_hooks)
    with torch.no_grad():
        model(x, attention_mask=mask)       # opens the context of mask
        calls.clear()
        model(x, attention_mask=mask)       # the kept context's call: the steady state
    for table, hooks in saved:
        table.clear(), table.update(hooks)
    pairs = []
    for kind, name, pre, fn, args, kwargs, ctx in calls:
        if pre:
            post = next(((f, a, k) for kd, n, p, f, a, k, _ in calls if n == name and not p and kd == kind), None)
            pairs.append((kind, name, (fn, args, kwargs), post, ctx))
    return pairs


def alone(model_type: str, n: int = 2000, repeats: int = 7) -> list:
    """Rows ``(kind, calls per forward, µs per call)``: each hooked call of a kept
    context's forward (the same mask again) repeated alone — its pre-hook, then its
    forward hook, with the padding context the forward had — thread CPU time, the
    median of ``repeats`` loops of ``n``; summed by kind of hooked layer. No timer in
    the loop, no model around it: the hooks' own cost with warm caches."""
    from seqnorm import masks

    _, safe = models(model_type)
    x, mask = inputs()
    per_kind = defaultdict(list)
    with torch.no_grad():
        for kind, name, (fn, args, kwargs), post, ctx in _captured_calls(safe, x, mask):
            def pair():
                depth = None if ctx is None or masks.current_padding() is ctx else masks.open_padding(ctx)
                try:
                    fn(*args, **kwargs)
                    if post is not None:
                        post[0](*post[1], **post[2])
                finally:
                    if depth is not None:
                        masks.close_padding(depth)
            for _ in range(100):
                pair()
            loops = []
            for _ in range(repeats):
                t0 = time.thread_time()
                for _ in range(n):
                    pair()
                loops.append((time.thread_time() - t0) / n)
            per_kind[kind].append(statistics.median(loops) * 1e6)
    return [(kind, len(us), sum(us) / len(us)) for kind, us in sorted(per_kind.items())]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["wav2vec2", "hubert"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--calls", type=int, default=10, help="forwards per round")
    p.add_argument("--forwards", type=int, default=300, help="forwards timed for the breakdown")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}, {time.strftime('%H:%M:%S')}\n")
    print("| model, call | stock ms (min) | safe ms (min) | ratio of medians (of minimums) |")
    print("|---|---:|---:|---:|")
    for m, new_mask in ((m, n) for m in args.models for n in (False, True)):
        r = ratio(m, args.rounds, args.calls, new_mask)
        print(f"| {r['model']} | {r['stock_ms']:.3f} ({r['stock_min_ms']:.3f}) | {r['safe_ms']:.3f} ({r['safe_min_ms']:.3f}) "
              f"| **{r['ratio']:.2f}×** ({r['ratio_min']:.2f}×) |")
    for m, new_mask in ((m, n) for m in args.models for n in (False, True)):
        b = breakdown(m, args.forwards, new_mask=new_mask)
        print(f"\n{b['model']}: where the padding-safe forward's extra time goes ({b['timer_us']:.2f} µs "
              f"subtracted per timed call)\n")
        print("| what | calls per forward | µs per call | µs per forward |")
        print("|---|---:|---:|---:|")
        for label, n, per_call, total in b["hooks"]:
            print(f"| hooks: {label} | {n:g} | {per_call:.1f} | {total:.0f} |")
        for label, n, safe_us, torch_us, total in b["norms"]:
            print(f"| masked {label} forward, more than torch's {label} | {n:g} | {safe_us:.1f} vs {torch_us:.1f} | {total:.0f} |")
        attributed = sum(r[-1] for r in b["hooks"]) + sum(r[-1] for r in b["norms"])
        print(f"| not attributed (torch's dispatch of the hooks, timer error, ...) | | | {b['extra_us'] - attributed:.0f} |")
        print(f"| **safe − stock** (stock: {b['stock_us']:.0f} µs) | | | **{b['extra_us']:.0f}** |")
    for m in args.models:
        print(f"\n{m}: each hooked call alone (a kept context's forward: its pre-hook and forward hook "
              f"repeated with the context and arguments they got)\n")
        print("| hooks | calls per forward | µs per call | µs per forward |")
        print("|---|---:|---:|---:|")
        rows = alone(m)
        for kind, n, us in rows:
            print(f"| {kind} | {n} | {us:.1f} | {n * us:.0f} |")
        print(f"| **all hooks** | {sum(r[1] for r in rows)} | | **{sum(r[1] * r[2] for r in rows):.0f}** |")
    print(f"\nload average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}, {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
