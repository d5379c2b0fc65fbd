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
import contextlib
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
#: steps of the longest sequence where :data:`STEPS` is too short for the model: VibeVoice's tokenizer
#: hops 3200 samples (10 latent frames, so the 45 % sequence alone still fills its deepest kernel);
#: its decoder takes latent frames (each 3200 samples of output)
STEPS_FOR = {"vibevoice_acoustic_tokenizer": 32000, "vibevoice_acoustic_tokenizer_encoder": 32000,
             "vibevoice_acoustic_tokenizer_decoder": 20}


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
            if _runs_at(module, cfg, main, int(steps), layout):
                return f"x: it runs only at the {steps} steps its config fixes ({layout})"
    return None


def _drawn_inputs(model_type: str, module, inputs, time_dim: int) -> dict:
    """Inputs a model draws at random in its forward for the batch's shape unless given (UnivNet's
    noise, (B, T, C)): given, one draw, so each sequence alone gets its own rows of it (the audit cuts
    them with the mask); or not drawn (VibeVoice's σ-VAE noise on its latents, ``sample=False``).
    Without it batched ≠ alone by design: another shape, another draw."""
    if model_type == "univnet":
        shape = (inputs.shape[0], inputs.shape[time_dim], module.config.model_in_channels)
        return {"noise_sequence": torch.randn(shape, generator=torch.Generator().manual_seed(2))}
    if "sample" in inspect.signature(module.forward).parameters:
        return {"sample": False}
    return {}


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
        cfg = hf.fill_config_gaps(transformers.AutoConfig.for_model(model_type))
        n = _count_params_meta(cfg)
        if n > MAX_DEFAULT_PARAMS:
            raise RuntimeError(f"only the default config builds, with {n / 1e6:.0f}M parameters (not built)")
    else:
        cfg = hf.small_config(model_type, width=attempt == "small")
    torch.manual_seed(0)
    if model_type in hf.AUDIO_CLASS:
        model = getattr(transformers, hf.AUDIO_CLASS[model_type])(cfg).eval()
    else:
        model = transformers.AutoModel.from_config(cfg).eval()
    module, how = hf.audited_module(model)
    main = getattr(model, "main_input_name", "input_values")
    return model, module, main, how


def _forward(module, main, inputs, kwargs):
    with torch.no_grad():
        if main in inspect.signature(module.forward).parameters:
            return module(**{main: inputs}, **kwargs)
        return module(inputs, **kwargs)       # its forward names it otherwise (VibeVoice's hidden_states)


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
                steps = STEPS_FOR.get(model_type) or (STEPS["input_features"] if "F" in layout
                                                      else STEPS["input_values"])
                inputs, lengths, kwargs = hf.audio_batch(module, model.config, main, BATCH, steps, layout=layout)
                _forward(module, main, inputs, kwargs)
                row.update(runs=True, layout=layout)
                break
            except Exception as e:
                errors.append(f"{attempt} {layout}: {_first_line(e)}")
        if row["runs"]:
            break
    if not row["runs"]:
        if model_type in TWO_INPUTS:
            return one_end_to_end(model_type, None)
        fixed = next((e for e in errors if _is_fixed_length(e)), None) or _runs_only_at_fixed_length(model_type)
        row["note"] = (f"needs a fixed input length ({fixed.split(': ', 1)[1][:160]})" if fixed else
                       f"does not run at small size: {'; '.join(errors)[:400]}")
        if fixed:           # the audit cannot cut it: compared end to end at that length
            return one_end_to_end(model_type, row["note"])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    time_dim = hf.TIME_DIM[row["layout"]]
    mask = next(iter(kwargs), None)
    row["mask"] = mask or "none"
    kwargs.update(_drawn_inputs(model_type, module, inputs, time_dim))
    if mask is None:
        row["note"] = "its forward takes no attention_mask or padding_mask"
    stock, after = {}, {}
    for mode in ("eval", "train"):
        try:
            stock[mode] = _audit(module, inputs, lengths, kwargs, mode == "train", time_dim)
        except Exception as e:
            stock[mode] = dict(error=_first_line(e))
    if "error" in stock["eval"]:
        # the audit cannot run it though the model runs: its first layer reshapes the waveform into
        # frames (no Conv1d the audit can follow the rate through), or the audit's extra random
        # padding gives a length it refuses (Nemotron 3.5's multiple of 8): compared end to end,
        # each sequence alone cut to its length
        error = stock["eval"]["error"]
        why = (_FRAMES if "no module output has a time axis" in error else
               f"the audit's own runs fail: {error[:120]}")
        return one_end_to_end(model_type, None, dict(size=row["size"], layout=row["layout"],
                                                     steps=int(inputs.shape[time_dim]), note=row["note"], why=why))
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
# Rows compared end to end: models the module-by-module audit cannot cut
# ---------------------------------------------------------------------------
#
# The audit runs each sequence alone cut to its length. A model that runs only at the length its
# config fixes (Whisper's 3000 mel frames) is instead run with each sequence alone padded to that
# length, as its feature extractor pads every clip; a codec that takes a waveform and semantic
# features (NeuCodec, XCodec2) is cut at both inputs' rates. Each is compared at the model's outputs:
# batched vs alone at real frames, and (fixed length) zero padding vs random padding.

#: a codec's second input: ``input_features`` for its semantic encoder (w2v-BERT: 160 features per
#: frame, two 100 Hz fbank frames stacked) at one frame per this many samples of ``input_values``
TWO_INPUTS = {"neucodec": 320, "xcodec2": 320}


def _outputs(out) -> dict:
    """A model output's tensors by name (a tuple's by position)."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    items = out.items() if hasattr(out, "items") else enumerate(out)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor) and v.dim() >= 2}


def _worst(batched: dict, alone: List[dict], real_of) -> dict:
    """Per output: the largest change at a real frame batched vs alone over max(1, max|y|) (integer
    outputs: how many differ). ``real_of(name, b, tensor_b, tensor_alone)`` gives the slices to compare."""
    worst = {}
    for name, y in batched.items():
        diffs = []
        packed = y.shape[0] != len(alone)     # real frames of every sequence in one (N, ...) (Qwen3-ASR's)
        start = 0
        for b, one in enumerate(alone):
            if name not in one:
                continue
            if packed:
                n = one[name].shape[0]
                got, want, start = y[start:start + n], one[name], start + n
            else:
                got, want = real_of(name, b, y[b:b + 1], one[name])
            if got.shape != want.shape:
                continue
            if got.is_floating_point():        # relative to the output's scale, as the audit's tolerance
                scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
                diffs.append(float((got - want).abs().max()) / scale if got.numel() else 0.0)
            else:
                diffs.append(int((got != want).sum()))
        if diffs:
            worst[name] = max(diffs)
    return worst


def _cut_to_alone(name, b, y, a):
    """The real frames of a cut run: along the axis where the alone output is shorter, its length."""
    axis = next((d for d in range(1, y.dim()) if y.shape[d] != a.shape[d]), None)
    if axis is not None and a.shape[axis] < y.shape[axis]:
        y = y.narrow(axis, 0, a.shape[axis])
    return y, a


def _fixed_real(lengths, steps):
    """The real frames of a fixed-length run: an output axis 1 that is the input's steps / k (Whisper's
    1500 of 3000) keeps the first ⌈length / k⌉; other outputs (AST's patch tokens over time × mel, a
    pooled vector) are compared whole."""
    def real_of(name, b, y, a):
        if y.dim() >= 3 and steps % y.shape[1] == 0:
            k = steps // y.shape[1]
            n = -(-int(lengths[b]) // k)
            return y[:, :n], a[:, :n]
        return y, a
    return real_of


def _call(module, main, inputs: dict, rates=None):
    """``module``'s output tensors by name; ``rates``, ``[(steps, lengths)]`` (the main input's first):
    inside ``seqnorm.padding`` with the lengths at each of those numbers of steps (as the audit opens it
    for a model made padding-safe)."""
    import seqnorm

    scope = seqnorm.padding(lengths=rates[0][1]) if rates else contextlib.nullcontext()
    with torch.no_grad(), scope as table:
        for steps, lengths in rates or ():
            table.record(steps, lengths)
        if main in inspect.signature(module.forward).parameters:
            return _outputs(module(**inputs))
        first = inputs.pop(main)
        return _outputs(module(first, **inputs))


def _compare_fixed(module, main, inputs, lengths, kwargs, time_dim, safe):
    """At the fixed length: batched vs each sequence alone (padded alone to the same length), and zero
    padding vs random padding (the padding the model reads at real frames)."""
    steps = inputs.shape[time_dim]
    ctx = [(steps, lengths)] if safe else None
    batched = _call(module, main, {main: inputs, **kwargs}, ctx)
    alone = [_call(module, main, {main: inputs[b:b + 1], **{k: v[b:b + 1] for k, v in kwargs.items()}},
                   [(steps, lengths[b:b + 1])] if safe else None) for b in range(len(lengths))]
    real = torch.arange(steps)[None, :] < lengths[:, None]
    real = real.reshape(real.shape + (1,) * (inputs.dim() - 2)).movedim(1, time_dim)
    noise = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(1)) * inputs.std()
    noisy = _call(module, main, {main: torch.where(real, inputs, noise), **kwargs}, ctx)
    real_of = _fixed_real(lengths, steps)
    return dict(alone=_worst(batched, alone, real_of), padding=_worst(batched, [
        {k: v[b:b + 1] for k, v in noisy.items()} for b in range(len(lengths))], real_of))


def _compare_cut(module, main, inputs, lengths, kwargs, time_dim, safe):
    """Batched vs each sequence alone cut to its length (its mask too), at the model's outputs."""
    from seqnorm.audit import _cut

    steps = inputs.shape[time_dim]
    batched = _call(module, main, {main: inputs, **kwargs}, [(steps, lengths)] if safe else None)
    alone = []
    for b, n in enumerate(lengths.tolist()):
        cut = {k: _cut(v, b, n, steps, len(lengths)) for k, v in kwargs.items()}
        alone.append(_call(module, main, {main: inputs[b:b + 1].narrow(time_dim, 0, n), **cut},
                           [(n, lengths[b:b + 1])] if safe else None))
    return dict(alone=_worst(batched, alone, _cut_to_alone))


def _two_inputs_batch(model, rate):
    """A codec's padded batch of a waveform (B, 1, T) and its semantic features (B, T / rate, F), the
    lengths of both, and the masks under its forward's names."""
    from seqnorm import hf

    steps = STEPS["input_values"]
    frames = steps // rate
    feat = hf.feature_size(model.config)
    feat *= 2 if feat == 80 else 1
    gen = torch.Generator().manual_seed(0)
    lengths = (torch.linspace(1.0, 0.45, BATCH) * frames).round().long() * rate
    real = torch.arange(steps)[None, :] < lengths[:, None]
    real_frames = torch.arange(frames)[None, :] < (lengths // rate)[:, None]
    wave = torch.randn(BATCH, 1, steps, generator=gen) * real[:, None]
    features = torch.randn(BATCH, frames, feat, generator=gen) * real_frames[..., None]
    inputs = dict(input_values=wave, input_features=features, padding_mask=real.long(),
                  input_features_mask=real_frames.long())
    return inputs, lengths


def _compare_two_inputs(module, inputs, lengths, rate, safe):
    """Batched vs each sequence alone, both inputs (and masks) cut to its length at their rates."""
    def rates(lens, wave):
        return [(wave.shape[-1], lens), (wave.shape[-1] // rate, lens // rate)] if safe else None

    batched = _call(module, "input_values", dict(inputs), rates(lengths, inputs["input_values"]))
    alone = []
    for b, n in enumerate(lengths.tolist()):
        cut = {k: (v[b:b + 1, :n // rate] if k.startswith("input_features") else v[b:b + 1, ..., :n])
               for k, v in inputs.items()}
        alone.append(_call(module, "input_values", cut, rates(lengths[b:b + 1], cut["input_values"])))
    return dict(alone=_worst(batched, alone, _cut_to_alone))


def one_end_to_end(model_type: str, fixed: Optional[str], cut: Optional[dict] = None) -> dict:
    """The row of a model compared end to end: at its fixed length (``fixed``: the note saying so),
    with its two inputs (:data:`TWO_INPUTS`), or (``cut``: the row that ran, whose modules the audit
    found no time axis in) each sequence alone cut to its length; stock, after
    ``make_padding_safe(attention=False)`` and after ``make_padding_safe(model)``, in eval."""
    import seqnorm
    from seqnorm import hf

    t0 = time.perf_counter()
    row = dict(model_type=model_type, builds=False, runs=False, size=None, how="", note=fixed or "")
    try:
        model, module, main, how = _build(model_type, cut["size"] if cut else "small")
    except Exception as e:
        row["note"] = f"does not build at small size: {_first_line(e)}"
        return row
    row.update(builds=True, size=cut["size"] if cut else "small", how=how, main_input=main,
               cls=type(model).__name__, params=sum(p.numel() for p in model.parameters()))
    results, error = {}, None
    if cut:
        layout, steps = cut["layout"], cut["steps"]
        inputs, lengths, kwargs = hf.audio_batch(module, model.config, main, BATCH, steps, layout=layout)
        row.update(layout=layout, mask=next(iter(kwargs), None) or "none", check="cut", steps=steps,
                   note=cut.get("note", ""), cut_why=cut.get("why", _FRAMES))
        compare = lambda m, safe: _compare_cut(hf.audited_module(m)[0], main, inputs, lengths, kwargs,
                                               hf.TIME_DIM[layout], safe)
    elif model_type in TWO_INPUTS:
        rate = TWO_INPUTS[model_type]
        inputs, lengths = _two_inputs_batch(model, rate)
        row.update(layout="(B, 1, T) + (B, T / %d, F)" % rate, mask="padding_mask, input_features_mask",
                   check="two inputs")
        compare = lambda m, safe: _compare_two_inputs(hf.audited_module(m)[0], inputs, lengths, rate, safe)
    else:
        steps, layout = _fixed_steps(model_type)
        inputs, lengths, kwargs = hf.audio_batch(module, model.config, main, BATCH, steps, layout=layout)
        try:
            _forward(module, main, inputs, kwargs)
        except Exception:       # a mask over its tokens, not its frames (AST's patches): none given
            kwargs = {}
        row.update(layout=layout, mask=next(iter(kwargs), None) or "none", check="fixed length", steps=steps)
        compare = lambda m, safe: _compare_fixed(hf.audited_module(m)[0], main, inputs, lengths, kwargs,
                                                 hf.TIME_DIM[layout], safe)
    for name, make in (("stock", None), ("after", dict(attention=False)), ("attention", dict(attention=True))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = model if make is None else seqnorm.make_padding_safe(copy.deepcopy(model), **make)
                results[name] = compare(m, make is not None)
        except Exception as e:
            results[name] = dict(error=_first_line(e))
            error = error or _first_line(e)
    row.update(runs="error" not in results.get("stock", {}), compared=results, lengths=lengths.tolist())
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _fixed_steps(model_type: str):
    """``(steps, layout)``: the input length the small model's config fixes and the layout it runs in."""
    from seqnorm import hf

    model, module, main, _ = _build(model_type, "small")
    cfg = model.config
    for sub in hf._sub_configs(cfg):
        for steps in (getattr(sub, "max_length", None), 2 * (getattr(sub, "max_source_positions", 0) or 0)):
            if not steps:
                continue
            for layout in hf.LAYOUTS[main]:
                if _runs_at(module, cfg, main, int(steps), layout):
                    return int(steps), layout
    raise RuntimeError("no fixed length in its config that it runs at")


def _runs_at(module, cfg, main, steps: int, layout: str) -> bool:
    """Whether ``module`` runs on a batch of ``steps`` in ``layout``: with its mask, or with none (a
    mask its attention takes as it is, not as 0 / 1 per frame: Qwen2-Audio's, Voxtral's encoder)."""
    from seqnorm import hf

    try:
        inputs, _, kwargs = hf.audio_batch(module, cfg, main, BATCH, steps, layout=layout)
    except Exception:
        return False
    for given in ({k: torch.ones_like(v) for k, v in kwargs.items()}, {}):
        try:
            _forward(module, main, inputs, given)
            return True
        except Exception:
            continue
    return False


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


#: a change above this (relative to max(1, max|y|), as the audit's) or any integer code that differs
E2E_TOL = 1e-4
#: why a model is not batched = alone after make_padding_safe(model), or does not run here: one
#: sentence each, from looking at the model (measured in the zoo's rerun; see docs/zoo.md)
WHY = {
    "neucodec": "codes batched = alone; the decoded waveform's last (n_fft − hop) / 2 samples differ: its ISTFT head "
                "overlap-adds (F.fold) the frames decoded past the clip's end and divides by the batch's window "
                "envelope, where a clip alone has neither (no time layer seqnorm follows)",
    "xcodec2": "codes batched = alone; the decoded waveform's last (n_fft − hop) / 2 samples differ: its ISTFT head "
               "overlap-adds (F.fold) the frames decoded past the clip's end and divides by the batch's window "
               "envelope, where a clip alone has neither (no time layer seqnorm follows)",
    "wavtokenizer": "its encoder and codes are batched = alone (wavtokenizer_encoder; tests/test_codecs.py); its "
                    "decoder's backbone has a self-attention block (AttnBlock: bmm and softmax over every frame) "
                    "that takes no mask, which attention fixing (Hugging Face attention modules) does not reach, "
                    "and an ISTFT head",
    "xcodec": "batched = alone with zero padding (codes too: tests/test_codecs.py), not with random padding: it pads "
              "the waveform in its top-level encode for its semantic model and, when the two encoders' frame "
              "counts differ at the batch's length, for its acoustic encoder too — a choice made from the batch's "
              "length, at rates seqnorm does not follow",
    "higgs_audio_v2_tokenizer": "needs torchaudio, which has no build for the installed torch 2.13 (not run here)",
    "pe_audio_video_encoder": "needs timm (and torchvision), not installed here; its video tower is an image "
                              "model",
    "voxtral_realtime_text": "Voxtral Realtime's text decoder: transformers maps the type to a class it does not "
                             "export, and it takes no audio",
}


def e2e_batched_alone(result: Optional[dict]) -> Optional[bool]:
    """Whether an end-to-end comparison found batched = alone (None: it did not run)."""
    if not result or "error" in result:
        return None
    return all((v <= E2E_TOL) if isinstance(v, float) else v == 0 for v in result["alone"].values())


def _fmt_e2e(result: Optional[dict]) -> str:
    if not result:
        return "—"
    if "error" in result:
        return f"raises: {result['error'][:80]}"
    parts = ", ".join(f"{k} {v:.0e}" if isinstance(v, float) else f"{k}: {v} differ"
                      for k, v in result["alone"].items())
    text = ("batched = alone" if e2e_batched_alone(result) else "batched ≠ alone") + f" ({parts})"
    if "padding" in result:
        worst = max(result["padding"].values(), default=0.0)
        text += f"; random padding moves real frames by {worst:.0e}"
    return text


#: why the audit cannot cut most models compared end to end "cut"
_FRAMES = "its first layer frames the input, no module output the audit can follow the rate through"


def _how_e2e(r: dict) -> str:
    return {"fixed length": f"compared end to end at the {r.get('steps')} steps its config fixes, each sequence "
                            f"alone padded to them too (as its feature extractor pads)",
            "two inputs": "compared end to end: a waveform and its semantic features, each sequence alone cut "
                          "at both rates",
            "cut": "compared end to end, each sequence alone cut to its length (the module-by-module audit "
                   f"cannot run it: {r.get('cut_why', _FRAMES)})"}[r["check"]]


def _e2e_row(r: dict) -> str:
    c = r.get("compared", {})
    how = (f"{r['cls']}" + (f" {r['how']}" if r.get('how') else "") + f", {r['size']} config, mask: {r['mask']}, "
           f"input {r.get('layout', '')}; {_how_e2e(r)}")
    ok = e2e_batched_alone(c.get("attention"))
    verdict = "yes" if ok else (f"error: {c['attention']['error'][:120]}" if ok is None else "no")
    why = "" if ok else WHY.get(r["model_type"], "")
    return (f"| {r['model_type']} | yes ({how}) | {_fmt_e2e(c.get('stock'))} | — | {_fmt_e2e(c.get('after'))} | — | "
            f"{why} | {verdict} | {r.get('seconds', '')} |")


def _remains(r: dict) -> str:
    """An audited row's "what remains and why": the first leak after the call (from its category), and
    the model's own reason where :data:`WHY` has one and it is not batched = alone with attention fixing."""
    why = WHY.get(r["model_type"]) if r.get("attention") != "yes" else None
    return "; ".join(p for p in (why and f"**why:** {why}", r.get("remains", "")) if p)


def totals(rows: List[dict]) -> dict:
    """The zoo's counts: types that run, and batched = alone in eval stock and after make_padding_safe(model)."""
    ran = [r for r in rows if r.get("runs")]
    audited = [r for r in ran if "check" not in r]
    e2e = [r for r in ran if "check" in r]
    blind = [r for r in audited if any("error" in r["stock"][m] for m in ("eval", "train"))]

    def stock_ok(r):
        if "check" in r:
            return e2e_batched_alone(r["compared"].get("stock"))
        s = r["stock"]["eval"]
        return None if "error" in s else not s.get("first_leak")

    def after_ok(r):
        if "check" in r:
            return e2e_batched_alone(r["compared"].get("attention"))
        return None if r in blind else r.get("attention") == "yes"

    comparable = [r for r in ran if stock_ok(r) is not None]
    return dict(types=len(rows), ran=len(ran), audited=len(audited), e2e=len(e2e), blind=len(blind),
                comparable=len(comparable), stock_alone=sum(bool(stock_ok(r)) for r in comparable),
                after_alone=sum(bool(after_ok(r)) for r in comparable),
                leak=[r for r in audited if r.get("leaks_stock")])


def markdown(rows: List[dict], seconds: float) -> str:
    import transformers

    t = totals(rows)
    audited = [r for r in rows if r.get("runs") and "check" not in r]
    leak = t["leak"]
    safe = [r for r in leak if r.get("safe_after")]
    harm = [r for r in audited if r.get("raises_after")]
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
        f"in eval after `make_padding_safe(model)` (attention key masks fixed too: the last column). A leak: a "
        f"change at a real step above 1e-4 × max(1, max|y|). A model the module-by-module audit cannot cut "
        f"(one that runs only at the length its config fixes, a codec with a waveform and semantic features, "
        f"one whose first layer frames the waveform) is compared end to end in eval at its outputs, batched vs "
        f"each sequence alone, with the same tolerance (integer codes: any that differs). Written by "
        f"`python benchmarks/zoo.py` in {seconds:.0f} s on a 2-core CPU VM shared with other jobs.",
        "",
        f"**Totals:** {t['ran']} of {t['types']} model types build and run ({t['audited']} audited module by "
        f"module at small size, {t['blind']} of them not auditable: the audit's own run fails stock too, e.g. a "
        f"sequence alone too short for a kernel; {t['e2e']} compared end to end). Batched = alone in eval: "
        f"{t['stock_alone']} of the {t['comparable']} that can be compared stock, {t['after_alone']} after "
        f"`make_padding_safe(model)`. Of the audited, {len(leak)} leak padding stock; {len(safe)} of those are "
        f"padding-safe after one `make_padding_safe(model, attention=False)` call (eval and train); "
        f"{len(harm)} raise after it that ran stock; with attention fixing, {len(with_attention)} of the "
        f"{len(leak)} are batched = alone in eval.",
        "",
        "| model type | builds / runs | stock eval | stock train | after eval | after train | what remains and why "
        "| batched = alone with attention fixing | s |",
        "|---|---|---|---|---|---|---|---|---:|",
    ]
    for r in rows:
        if r.get("runs") and "check" in r:
            lines.append(_e2e_row(r))
            continue
        if not r.get("runs"):
            runs = "no" if not r.get("builds") else "builds, does not run"
            lines.append(f"| {r['model_type']} | {runs}: {r.get('note', '')} | | | | | {WHY.get(r['model_type'], '')} "
                         f"| | {r.get('seconds', '')} |")
            continue
        s, a = r.get("stock", {}), r.get("after", {})
        how = (f"{r['cls']}" + (f" {r['how']}" if r['how'] else "") + f", {r['size']} config, mask: {r['mask']}"
               + f", input {r.get('layout', '')}")
        lines.append(f"| {r['model_type']} | yes ({how}) | {_fmt(s.get('eval'))} | {_fmt(s.get('train'))} | "
                     f"{_fmt(a.get('eval'))} | {_fmt(a.get('train'))} | {_remains(r)} | "
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
