"""``seqnorm audit``: find where padding leaks in a model (see :mod:`seqnorm.audit`).

``--hf MODEL_TYPE`` builds a Hugging Face model locally from its config class
(random weights unless ``--weights`` gives a safetensors file; nothing is
downloaded) and feeds it a synthetic padded batch of its main input
(``input_values``: a waveform; ``input_features``: feature frames ``(B, T, F)``
with ``F`` from the config, or ``(B, F, T)`` where the model takes them so;
``input_ids``: token ids) with its mask (``attention_mask``, or ``padding_mask``
where the forward takes that). An encoder–decoder model is audited through its
encoder; a model that needs a fixed input length says so in one line. ``--module pkg.mod:factory`` audits your own model:
``factory()`` returns ``(model, inputs, lengths)`` or ``(model, inputs, lengths,
forward_kwargs)``. ``--safe`` audits the model before and after
:func:`seqnorm.make_padding_safe` and reports the latter.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
from typing import Optional

import torch

from ..audit import AuditError, AuditReport, audit
from ..padding_safe import make_padding_safe
from . import CommandError

FORMATS = ("text", "markdown", "json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="MODEL_TYPE", help="an HF model type (wav2vec2, hubert, wav2vec2-conformer, "
                                                        "data2vec-audio, bert, ...), built from its config class")
    src.add_argument("--module", metavar="PKG.MOD:FACTORY",
                     help="your model: FACTORY() returns (model, inputs, lengths[, forward_kwargs])")
    p.add_argument("--config", metavar="JSON", help="--hf config settings, a JSON object (e.g. "
                                                     "'{\"num_hidden_layers\": 4}')")
    p.add_argument("--small", action="store_true", help="--hf speech models at test size (hidden 32, 2 layers)")
    p.add_argument("--weights", metavar="FILE", help="--hf weights from a local .safetensors file")
    p.add_argument("--safe", action="store_true", help="audit after seqnorm.make_padding_safe (and before)")
    p.add_argument("--train", action="store_true", help="training mode (dropout, LayerDrop, SpecAugment off)")
    p.add_argument("--batch", type=int, default=4, help="--hf: sequences in the batch (default 4)")
    p.add_argument("--length", type=int, help="--hf: steps of the longest (default: 16000 samples of audio, "
                                              "1600 with --small; 64 tokens)")
    p.add_argument("--rtol", type=float, help="the tolerance's scale (default 1e-4; 1e-2 for 16-bit models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--png", metavar="FILE", help="draw the change per layer (log scale), before and after --safe")


# ---------------------------------------------------------------------------
# The model and its input
# ---------------------------------------------------------------------------


def _json_object(text: str, option: str) -> dict:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CommandError(f"{option}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise CommandError(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


def _lengths(batch: int, steps: int) -> torch.Tensor:
    """From the full length down to 45 % of it: every sequence but the first is padded."""
    if batch < 2:
        raise CommandError(f"--batch: needs at least 2 sequences to pad, got {batch}")
    return torch.linspace(1.0, 0.45, batch).mul(steps).round().long().clamp(1, steps)


def hf_case(model_type: str, config: Optional[dict], small: bool, weights: Optional[str], batch: int,
            length: Optional[int], seed: int):
    """``(model, inputs, lengths, forward_kwargs, time_dim)`` for an HF model type; ``model`` is
    the module audited (an encoder–decoder model's encoder)."""
    try:
        import transformers
    except ImportError:
        raise CommandError("--hf needs transformers: pip install transformers") from None
    from .. import hf

    # transformers' own error lists every model type it knows (~1,000 names, 20 kB): say it shortly
    if model_type not in transformers.CONFIG_MAPPING:
        raise CommandError(f"--hf: cannot build {model_type!r}: not a model type transformers "
                           f"{transformers.__version__} knows (e.g. {', '.join(hf.SPEECH_MODELS)}, bert)")
    try:
        model = hf.build(model_type, config, small=small, seed=seed)
    except (ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CommandError(f"--hf: cannot build {model_type!r}: {first[:300]}") from None
    except TypeError as e:
        raise CommandError(f"--config: {str(e).splitlines()[0]}") from None
    if weights:
        _load_weights(model, weights)
    main = getattr(model, "main_input_name", "input_ids")
    if main in ("input_values", "input_features"):
        return _audio_case(model_type, model, main, small, batch, length, seed)
    if main != "input_ids":
        raise CommandError(f"--hf: {type(model).__name__}'s main input {main!r} is not one seqnorm audit can "
                           f"make (input_values, input_features or input_ids); use --module")
    steps = length or 64
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, max(vocab, 2), (batch, steps), generator=gen)
    lengths = _lengths(batch, steps)
    real = torch.arange(steps)[None, :] < lengths[:, None]
    return model, inputs.masked_fill(~real, 0), lengths, {"attention_mask": real.long()}, 1


def _fixed_length(message: str) -> bool:
    m = message.lower()
    return any(w in m for w in ("expects the mel input features to be of length", "max_length", "fixed length",
                                "must be of length", "expected input length"))


def _audio_case(model_type, model, main, small, batch, length, seed):
    """An audio model's batch: a waveform, or feature frames (B, T, F) with F from the config
    — (B, F, T) when the model takes them so; an encoder–decoder model through its encoder;
    the mask under the forward's own name (attention_mask or padding_mask)."""
    from .. import hf

    _lengths(batch, 2)                                     # --batch checked first
    module, how = hf.audited_module(model)
    failure = ""
    for layout in hf.LAYOUTS[main]:
        steps = length or ((1600 if small else 16000) if main == "input_values" and "F" not in layout
                           else (200 if small else 1000))
        try:
            inputs, lengths, kwargs = hf.audio_batch(module, model.config, main, batch, steps, seed, layout)
        except ValueError as e:
            failure = f"--hf: {e}"
            continue
        try:
            with torch.no_grad():
                module(**{main: inputs}, **kwargs)
        except Exception as e:
            text = str(e).strip()
            failure = f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
            if _fixed_length(failure):
                raise CommandError(f"--hf: {model_type} needs a fixed input length, so no sequence can be run "
                                   f"alone ({failure})") from None
            continue
        return module, inputs, lengths, kwargs, hf.TIME_DIM[layout]
    raise CommandError(f"--hf: {type(module).__name__}{' ' + how if how else ''} does not run on a padded batch of "
                       f"{main} ({failure})")


def _load_weights(model, path: str) -> None:
    try:
        from safetensors.torch import load_file
        state = load_file(path)
    except ImportError:
        raise CommandError("--weights needs safetensors: pip install safetensors") from None
    except Exception as e:   # missing file, not a safetensors file
        raise CommandError(f"--weights: cannot read {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CommandError(f"--weights: {path} does not fit the model: {len(missing)} tensors missing "
                           f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")


def module_case(spec: str):
    if ":" not in spec:
        raise CommandError(f"--module: expected PKG.MOD:FACTORY, got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise CommandError(f"--module: cannot import {mod_name!r}: {type(e).__name__}: {e}") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise CommandError(f"--module: {mod_name!r} has no callable {attr!r}")
    case = factory()
    if not isinstance(case, tuple) or len(case) not in (3, 4):
        raise CommandError(f"--module: {spec}() must return (model, inputs, lengths[, forward_kwargs]), got "
                           f"{type(case).__name__}")
    model, inputs, lengths = case[:3]
    kwargs = case[3] if len(case) == 4 else {}
    if not isinstance(model, torch.nn.Module) or not isinstance(kwargs, dict):
        raise CommandError(f"--module: {spec}() must return (model: nn.Module, inputs, lengths[, dict])")
    return model, inputs, torch.as_tensor(lengths), kwargs


# ---------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------


def _progress():
    """A progress line on stderr, rewritten in place, when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None

    def say(line: str) -> None:
        sys.stderr.write("\r\033[K" + line)
        sys.stderr.flush()
    return say


def _audit(model, inputs, lengths, kwargs, args, time_dim=1) -> AuditReport:
    try:
        return audit(model, inputs, lengths, time_dim=time_dim, train=args.train, rtol=args.rtol, seed=args.seed,
                     progress=_progress(), **kwargs)
    except AuditError as e:
        raise CommandError(str(e)) from None
    except Exception as e:   # the model itself failed on the batch
        first = str(e).splitlines()[0] if str(e) else ""
        raise CommandError(f"the model failed on the audit's batch: {type(e).__name__}: {first}") from None
    finally:
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K")


def draw(path: str, reports) -> None:
    """The change per layer (log scale), one line per (report, comparison)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CommandError("--png needs matplotlib: pip install 'seqnorm[explain]'") from None
    fig, ax = plt.subplots(figsize=(10, 4))
    for label, report in reports:
        for field, style in (("alone", "-"), ("padding", "--")):
            ys = [max(getattr(m, field) or 0.0, 1e-12) for m in report.modules]
            ax.plot(range(len(ys)), ys, style, label=f"{label}: Δ {field}")
        if report.first_leak is not None:
            i = next(i for i, m in enumerate(report.modules) if m.name == report.first_leak)
            ax.axvline(i, color="red", alpha=0.3)
            ax.annotate(f"first leak: {report.first_leak}", (i, 1.0), fontsize=7, rotation=90, va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("module, in execution order")
    ax.set_ylabel("largest change at a real step")
    ax.set_title(f"seqnorm audit: {reports[0][1].model} ({'train' if reports[0][1].train else 'eval'})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    if args.png:
        try:
            import matplotlib  # noqa: F401  (before anything is computed)
        except ImportError:
            raise CommandError("--png needs matplotlib: pip install 'seqnorm[explain]'") from None
    if args.module and (args.config or args.weights or args.small):
        raise CommandError("--config, --weights and --small go with --hf, not --module")
    config = _json_object(args.config, "--config") if args.config else None
    if args.hf:
        model, inputs, lengths, kwargs, time_dim = hf_case(args.hf, config, args.small, args.weights, args.batch,
                                                           args.length, args.seed)
    else:
        model, inputs, lengths, kwargs = module_case(args.module)
        time_dim = 1
    reports = []
    if args.safe:
        reports.append(("before", _audit(model, inputs, lengths, kwargs, args, time_dim)))
        model = make_padding_safe(copy.deepcopy(model))
    report = _audit(model, inputs, lengths, kwargs, args, time_dim)
    reports.append(("after --safe" if args.safe else "model", report))
    if args.png:
        draw(args.png, reports)
    before = reports[0][1] if args.safe else None
    if args.format == "json":
        out = report.to_dict()
        if before is not None:
            out["before"] = before.to_dict()
        print(json.dumps(out, indent=2))
    else:
        if before is not None:
            print(f"before --safe: {before.summary()}")
            print("after --safe:  ", end="")
        print(report.to_markdown() if args.format == "markdown" else report.to_text())
    return 0
