"""The zoo: make_padding_safe on every audio model type of the installed transformers.

For every model type whose main input is ``input_values`` or ``input_features``
(the model class ``AutoModel`` builds for it), build it small from its config
class (random weights, dropout off; encoder–decoder models through their
encoder), audit it (:func:`seqnorm.audit`: batched vs alone, and more random
padding) stock and after ``make_padding_safe``, in eval and in train, and write
``docs/zoo.md`` and ``docs/zoo.json``. One row per model type, none left out: a
model that cannot be built or run at small size, or needs a fixed input length,
gets a row saying so. Each model runs in its own process (a time limit each).

    python benchmarks/zoo.py                      # every audio model type → docs/zoo.md, docs/zoo.json
    python benchmarks/zoo.py --only parakeet_encoder sew-d --out /tmp/zoo
    python benchmarks/zoo.py --one parakeet_encoder   # one row as JSON (what the runner calls)
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import subprocess
import sys
import time
import warnings
from typing import List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_INPUTS = ("input_values", "input_features")
STEPS = {"input_values": 3200, "input_features": 200}   # samples / feature frames of the longest sequence
BATCH = 2
#: a default config above this many parameters is not built (only a small one would be)
MAX_DEFAULT_PARAMS = 150_000_000


def audio_model_types():
    """``[(model_type, class name, main input or error)]`` of every AutoModel whose main input is audio."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    rows = []
    for model_type, name in sorted(MODEL_MAPPING_NAMES.items()):
        name = name[0] if isinstance(name, (tuple, list)) else name
        try:
            main = getattr(getattr(transformers, name), "main_input_name", None)
        except Exception as e:      # a class that needs a missing backend (torchaudio), or is not exported
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            rows.append((model_type, name, f"cannot inspect: {first[:120]}"))
            continue
        if main in MAIN_INPUTS:
            rows.append((model_type, name, main))
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _is_fixed_length(message: str) -> bool:
    m = message.lower()
    return any(w in m for w in ("expects the mel input features to be of length", "max_length", "fixed length",
                                "must be of length", "expected input length"))


def _runs_only_at_fixed_length(model_type: str) -> Optional[str]:
    """``"... N steps"`` when the small model runs at the input length its config fixes
    (``max_length``, ``2 × max_source_positions``) and not at others, else None."""
    from seqnorm import hf

    try:
        model, module, main, _ = _build(model_type, "small")
    except Exception:
        return None
    cfg = model.config
    for steps in {getattr(cfg, "max_length", None), 2 * (getattr(cfg, "max_source_positions", 0) or 0)} - {None, 0}:
        for layout in hf.LAYOUTS[main]:
            try:
                inputs, _, kwargs = hf.audio_batch(module, cfg, main, BATCH, int(steps), layout=layout)
                _forward(module, main, inputs, {k: torch.ones_like(v) for k, v in kwargs.items()})
                return f"x: it runs only at the {steps} steps its config fixes ({layout})"
            except Exception:
                continue
    return None


def _count_params_meta(cfg) -> int:
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModel.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _build(model_type: str, attempt: str):
    """``(model, audited module, main input, how)`` for one build attempt."""
    import transformers
    from seqnorm import hf

    if attempt == "default":
        cfg = transformers.AutoConfig.for_model(model_type)
        n = _count_params_meta(cfg)
        if n > MAX_DEFAULT_PARAMS:
            raise RuntimeError(f"only the default config builds, with {n / 1e6:.0f}M parameters (not built)")
    else:
        cfg = hf.small_config(model_type, width=attempt == "small")
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg).eval()
    module, how = hf.audited_module(model)
    main = getattr(model, "main_input_name", "input_values")
    return model, module, main, how


def _forward(module, main, inputs, kwargs):
    with torch.no_grad():
        return module(**{main: inputs}, **kwargs)


def _audit(module, inputs, lengths, kwargs, train, time_dim=1):
    import seqnorm

    report = seqnorm.audit(module, inputs, lengths, train=train, time_dim=time_dim, **kwargs)
    worst_alone = max((r.alone or 0.0 for r in report.modules if r.alone_counts), default=0.0)
    worst_padding = max((r.padding or 0.0 for r in report.modules), default=0.0)
    leak = next((r for r in report.modules if r.name == report.first_leak), None)
    return dict(first_leak=report.first_leak, type=leak.type if leak else None,
                category=leak.category if leak else None, alone=worst_alone, padding=worst_padding)


def _why(after: dict, unfollowed: dict) -> str:
    """What remains after make_padding_safe, and why (from the first leak's category)."""
    parts = []
    for mode in ("eval", "train"):
        a = after.get(mode) or {}
        if not a.get("first_leak"):
            continue
        cat = a["category"]
        if cat == "other" and any(w in a["first_leak"].lower() for w in ("attn", "attention")):
            cat = "attention over padded keys"      # the projection after the attention is the first row that moves
        why = {"attention over padded keys": "attention reads padded keys where the model's own attention "
                                             "mask does not reach (or is wrong at this rate)",
               "convolution across the sequence end": "a convolution reads past the end at a rate seqnorm "
                                                      "did not follow",
               "norm pooling over time": "a norm pools over time at a rate seqnorm did not follow",
               "batch statistics": "batch statistics at a rate seqnorm did not follow"}.get(
            cat, "a layer seqnorm does not follow mixes time steps")
        parts.append(f"{mode}: `{a['first_leak']}` ({a['type']}): {why}")
    if unfollowed:
        names = ", ".join(f"`{k}`" for k in list(unfollowed)[:3]) + (" …" if len(unfollowed) > 3 else "")
        parts.append(f"acts as torch's (warned): {names} — {list(unfollowed.values())[0][:120]}")
    return "; ".join(parts)


def one(model_type: str) -> dict:
    """The zoo's row for one model type."""
    import seqnorm
    from seqnorm import hf
    from seqnorm.padding_safe import unfollowed

    t0 = time.perf_counter()
    row = dict(model_type=model_type, builds=False, runs=False, size=None, how="", note="")
    errors = []
    for attempt in ("small", "layers", "default"):
        try:
            model, module, main, how = _build(model_type, attempt)
        except Exception as e:
            errors.append(f"{attempt}: {_first_line(e)}")
            continue
        row.update(builds=True, size=attempt, how=how, main_input=main, cls=type(model).__name__,
                   params=sum(p.numel() for p in model.parameters()))
        for layout in hf.LAYOUTS[main]:
            try:
                steps = STEPS["input_features"] if "F" in layout else STEPS["input_values"]
                inputs, lengths, kwargs = hf.audio_batch(module, model.config, main, BATCH, steps, layout=layout)
                _forward(module, main, inputs, kwargs)
                row.update(runs=True, layout=layout)
                break
            except Exception as e:
                errors.append(f"{attempt} {layout}: {_first_line(e)}")
        if row["runs"]:
            break
    if not row["runs"]:
        fixed = next((e for e in errors if _is_fixed_length(e)), None) or _runs_only_at_fixed_length(model_type)
        row["note"] = (f"needs a fixed input length ({fixed.split(': ', 1)[1][:160]})" if fixed else
                       f"does not run at small size: {'; '.join(errors)[:400]}")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    time_dim = hf.TIME_DIM[row["layout"]]
    mask = next(iter(kwargs), None)
    row["mask"] = mask or "none"
    if mask is None:
        row["note"] = "its forward takes no attention_mask or padding_mask"
    stock, after = {}, {}
    for mode in ("eval", "train"):
        try:
            stock[mode] = _audit(module, inputs, lengths, kwargs, mode == "train", time_dim)
        except Exception as e:
            stock[mode] = dict(error=_first_line(e))
    safe_model = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seqnorm.make_padding_safe(safe_model, **_norms_and_time_layers_only())
        safe_module, _ = hf.audited_module(safe_model)
        for mode in ("eval", "train"):
            try:
                after[mode] = _audit(safe_module, inputs, lengths, kwargs, mode == "train", time_dim)
            except Exception as e:          # harm: a model that ran stock raises after the call
                after[mode] = dict(error=_first_line(e))
    row["unfollowed"] = unfollowed(safe_model)
    row["warnings"] = sorted({str(w.message)[:200] for w in caught
                              if issubclass(w.category, seqnorm.ConversionWarning)})[:5]
    row["stock"], row["after"] = stock, after
    row["leaks_stock"] = any(stock[m].get("first_leak") for m in stock)
    row["raises_after"] = any("error" in after[m] for m in after) and not any("error" in stock[m] for m in stock)
    row["safe_after"] = all("error" not in after[m] and not after[m].get("first_leak") for m in after)
    row["remains"] = _why(after, row["unfollowed"])
    row["attention"] = _attention_column(model, inputs, lengths, kwargs, time_dim)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _norms_and_time_layers_only() -> dict:
    """make_padding_safe's keywords for the "after" columns: norms and time layers only
    (issue 17); attention fixing (issue 21) has a column of its own."""
    import seqnorm

    return {"attention": False} if "attention" in inspect.signature(seqnorm.make_padding_safe).parameters else {}


def _attention_column(model, inputs, lengths, kwargs, time_dim):
    """batched = alone (eval) after ``make_padding_safe(model, attention=True)``, where it exists."""
    import seqnorm
    from seqnorm import hf

    if "attention" not in inspect.signature(seqnorm.make_padding_safe).parameters:
        return "n/a (attention fixing not available)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            safe = seqnorm.make_padding_safe(copy.deepcopy(model), attention=True)
            report = _audit(hf.audited_module(safe)[0], inputs, lengths, kwargs, False, time_dim)
    except Exception as e:
        return f"error: {_first_line(e)}"
    return "yes" if not report["first_leak"] else f"no: `{report['first_leak']}` ({report['alone']:.1e})"


# ---------------------------------------------------------------------------
# Running every model type and writing the table
# ---------------------------------------------------------------------------


def _fmt(a: Optional[dict]) -> str:
    if not a:
        return "—"
    if "error" in a:
        return f"raises: {a['error'][:80]}"
    if not a["first_leak"]:
        return f"no leak ({max(a['alone'], a['padding']):.0e})"
    return f"`{a['first_leak']}` ({a['type']}, {a['category']}; Δ alone {a['alone']:.1e}, Δ padding {a['padding']:.1e})"


def markdown(rows: List[dict], seconds: float) -> str:
    import transformers

    ran = [r for r in rows if r.get("runs")]
    blind = [r for r in ran if any("error" in r["stock"][m] for m in ("eval", "train"))]
    leak = [r for r in ran if r.get("leaks_stock")]
    safe = [r for r in leak if r.get("safe_after")]
    harm = [r for r in ran if r.get("raises_after")]
    with_attention = [r for r in leak if r.get("attention") == "yes"]
    lines = [
        "# The zoo: make_padding_safe on every Hugging Face audio model type",
        "",
        f"Every model type of transformers {transformers.__version__} whose main input is `input_values` or "
        f"`input_features` ({len(rows)} types), built small from its config class (random weights, dropout "
        f"off; 2 layers; encoder–decoder models through their encoder), audited with `seqnorm.audit` on a "
        f"batch of {BATCH} (lengths 100 % and 45 % of {STEPS['input_values']} samples or "
        f"{STEPS['input_features']} feature frames, plus random padding) stock and after "
        f"`seqnorm.make_padding_safe(model, attention=False)` (norms and time layers), eval and train, and "
        f"in eval after `make_padding_safe(model)` (attention key masks fixed too: the last column). A leak: a change at a real step above "
        f"1e-4 × max(1, max|y|). Written by `python benchmarks/zoo.py` in {seconds:.0f} s on a 2-core CPU VM "
        f"shared with other jobs.",
        "",
        f"**Totals:** {len(ran)} of {len(rows)} model types build and run at small size ({len(blind)} of them "
        f"cannot be audited: the audit's own run fails stock too, e.g. a sequence alone too short for a "
        f"kernel); {len(leak)} leak padding stock; {len(safe)} of those are padding-safe after one "
        f"`make_padding_safe(model, attention=False)` call (eval and train); {len(harm)} raise after it "
        f"that ran stock; with attention fixing, {len(with_attention)} of the {len(leak)} are batched = alone "
        f"in eval.",
        "",
        "| model type | builds / runs | stock eval | stock train | after eval | after train | what remains and why "
        "| batched = alone with attention fixing | s |",
        "|---|---|---|---|---|---|---|---|---:|",
    ]
    for r in rows:
        if not r.get("runs"):
            runs = "no" if not r.get("builds") else "builds, does not run"
            lines.append(f"| {r['model_type']} | {runs}: {r.get('note', '')} | | | | | | | {r.get('seconds', '')} |")
            continue
        s, a = r.get("stock", {}), r.get("after", {})
        how = (f"{r['cls']}" + (f" {r['how']}" if r['how'] else "") + f", {r['size']} config, mask: {r['mask']}"
               + f", input {r.get('layout', '')}")
        lines.append(f"| {r['model_type']} | yes ({how}) | {_fmt(s.get('eval'))} | {_fmt(s.get('train'))} | "
                     f"{_fmt(a.get('eval'))} | {_fmt(a.get('train'))} | {r.get('remains', '')} | "
                     f"{r.get('attention', '')} | {r.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def run_all(only, out_dir: str, timeout: int, merge: bool = False) -> None:
    t0 = time.perf_counter()
    types = audio_model_types()
    if only:
        types = [t for t in types if t[0] in only]
    rows = []
    previous, previous_seconds = {}, 0.0
    if merge and os.path.exists(os.path.join(out_dir, "zoo.json")):
        with open(os.path.join(out_dir, "zoo.json")) as f:
            saved = json.load(f)
        previous = {r["model_type"]: r for r in saved["rows"]}
        previous_seconds = saved.get("full_run_seconds", saved["seconds"])
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for model_type, cls, main in types:
        start = time.perf_counter()
        if main not in MAIN_INPUTS:
            rows.append(dict(model_type=model_type, cls=cls, builds=False, runs=False, note=main, seconds=0.0))
            continue
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", model_type], env=env,
                                  capture_output=True, text=True, timeout=timeout)
            line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("{")), None)
            row = json.loads(line) if line else dict(
                model_type=model_type, builds=False, runs=False,
                note=f"the run failed: {(done.stderr.strip().splitlines() or [''])[-1][:200]}")
        except subprocess.TimeoutExpired:
            row = dict(model_type=model_type, builds=False, runs=False, note=f"over the {timeout} s time limit")
        row.setdefault("cls", cls)
        row["seconds"] = row.get("seconds") or round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{model_type}: {'runs' if row.get('runs') else row.get('note', '')[:80]} "
              f"({row['seconds']} s)", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    if previous:                      # the rows run now replace theirs; the time is the rows' sum
        previous.update({r["model_type"]: r for r in rows})
        rows = [previous[k] for k in sorted(previous)]
        seconds = previous_seconds        # the full run's time; the rerun rows are marked
    for r in rows:
        if "after" in r:
            r["remains"] = _why(r["after"], r.get("unfollowed") or {})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "zoo.json"), "w") as f:
        json.dump(dict(seconds=round(seconds, 1), full_run_seconds=round(seconds, 1), rows=rows), f, indent=1)
    with open(os.path.join(out_dir, "zoo.md"), "w") as f:
        f.write(markdown(rows, seconds))
    print(f"{len(rows)} model types in {seconds:.0f} s → {out_dir}/zoo.md", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", metavar="MODEL_TYPE", help="one model type's row as JSON on stdout")
    p.add_argument("--only", nargs="+", metavar="MODEL_TYPE", help="these model types only")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where zoo.md and zoo.json go (default docs/)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model type (default 300)")
    p.add_argument("--merge", action="store_true", help="with --only: replace those rows of the existing zoo.json")
    args = p.parse_args(argv)
    if args.one:
        torch.set_num_threads(1)
        print(json.dumps(one(args.one)))
        return 0
    run_all(args.only, args.out, args.timeout, args.merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
