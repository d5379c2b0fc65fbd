"""Padding-safe vs stock wav2vec2, eager and under torch.compile, on the CPU.

A base-size wav2vec2 (``Wav2Vec2Config()``'s defaults: 12 layers, hidden 768, the
group-norm feature encoder of wav2vec2-base; random weights, dropout off) runs a
padded batch the way users call it — ``model(batch, attention_mask=mask)``, no
``seqnorm.padding`` — stock and after ``seqnorm.make_padding_safe`` (whose call
hook opens the padding context from the mask), eager and compiled
(``torch.compile(model, fullgraph=True)``, inductor). Prints, per variant: graphs
and graph breaks, compile time, median forward time over ``--repeats`` runs taken
in alternation (so the machine's load drifts over all variants alike), and the
worst batched-vs-alone gap at real frames (eager), and compiled vs eager. The ratio safe / stock is the cost of
padding safety in each mode.

    python benchmarks/padding_safe_compile.py                   # batch 4, 4 s to 1.5 s of 16 kHz audio
    python benchmarks/padding_safe_compile.py --layers 2 --repeats 3   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def build(layers: int, seed: int = 0):
    import transformers

    from seqnorm import hf

    config = transformers.Wav2Vec2Config(num_hidden_layers=layers, **hf.NO_DROPOUT)
    torch.manual_seed(seed)
    return transformers.Wav2Vec2Model(config).eval()


def batch(n: int, longest: float, shortest: float, rate: int = 16000, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(longest * rate, shortest * rate, n).round().long()
    x = torch.randn(n, int(lengths[0]), generator=g)
    mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).long()
    return x * mask, mask, lengths


def alone_gap(model, x, mask, lengths) -> float:
    """Worst |batched − alone| at the real frames of each utterance."""
    with torch.no_grad():
        out = model(x, attention_mask=mask).last_hidden_state
        worst = 0.0
        for i in range(x.shape[0]):
            n = int(lengths[i])
            alone = model(x[i: i + 1, :n].clone(), attention_mask=mask[i: i + 1, :n].clone()).last_hidden_state[0]
            worst = max(worst, (out[i, : alone.shape[0]] - alone).abs().max().item())
    return worst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12, help="transformer layers (default 12: base size)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, nargs=2, default=(4.0, 1.5), metavar=("LONGEST", "SHORTEST"))
    p.add_argument("--repeats", type=int, default=7, help="timed forwards per variant (default 7)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    import seqnorm

    x, mask, lengths = batch(args.batch, *args.seconds)
    stock, safe = build(args.layers), seqnorm.make_padding_safe(build(args.layers))
    variants = {"stock eager": stock, "safe eager": safe}
    info = {name: {"graphs": "", "breaks": "", "compile_s": ""} for name in variants}
    for name, model in (("stock compiled", stock), ("safe compiled", safe)):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(x, attention_mask=mask)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(x, attention_mask=mask)
        info[name] = {"graphs": explained.graph_count, "breaks": explained.graph_break_count,
                      "compile_s": f"{time.perf_counter() - start:.1f}"}
        variants[name] = compiled
    times = {name: [] for name in variants}
    with torch.no_grad():
        for name, model in variants.items():          # warm-up
            model(x, attention_mask=mask)
        for _ in range(args.repeats):
            for name, model in variants.items():
                start = time.perf_counter()
                model(x, attention_mask=mask)
                times[name].append(time.perf_counter() - start)
    with torch.no_grad():
        eager_out = {m: variants[f"{m} eager"](x, attention_mask=mask).last_hidden_state for m in ("stock", "safe")}
        gaps = {f"{m} eager": alone_gap(variants[f"{m} eager"], x, mask, lengths) for m in ("stock", "safe")}
        for m in ("stock", "safe"):     # compiled vs eager of the same model (alone, a compiled model would recompile)
            out = variants[f"{m} compiled"](x, attention_mask=mask).last_hidden_state
            gaps[f"{m} compiled"] = (out - eager_out[m]).abs().max().item()
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"wav2vec2, {args.layers} layers, hidden 768; batch {args.batch} of "
          f"{[round(int(n) / 16000, 2) for n in lengths]} s; {torch.get_num_threads()} threads; "
          f"median of {args.repeats}; torch {torch.__version__}")
    print("| variant | graphs | graph breaks | compile s | forward ms (median) | vs stock, same mode | "
          "eager: max batched − alone; compiled: max compiled − eager |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        base = medians["stock " + name.split()[1]]
        print(f"| {name} | {info[name]['graphs']} | {info[name]['breaks']} | {info[name]['compile_s']} | "
              f"{medians[name]:.1f} | {medians[name] / base:.2f}× | {gaps[name]:.1e} |")


if __name__ == "__main__":
    main()
