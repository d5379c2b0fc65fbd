r"""``seqnorm.audit``: which layer mixes padding into real steps?

The note asks it of one Transformer; this answers it for any model, without
editing its source. The model runs three ways, with a forward hook on every
submodule:

1. **batched** — the batch as given;
2. **alone** — each sequence by itself, cut to its length;
3. **padded** — the same batch with extra padding, every padded step filled
   with random values.

For every module whose output has the time axis, the largest change at *real*
steps is recorded — batched vs alone, batched vs padded — in execution order.
A module **leaks** when a change exceeds the tolerance ``rtol·max(1, max|y|)``
(``max|y|`` over its real outputs; ``rtol`` = 1e-4 for float32 outputs, 1e-2
for 16-bit: batched and alone differ by float rounding, since matrix products
of other shapes add in another order). ``first_leak`` is the first leaking
module — inner modules finish before the modules that contain them, so it is
the innermost one.

Time axes and per-layer lengths are found as :func:`seqnorm.make_padding_safe`
finds them: the lengths hold at the input's number of steps, and every
``Conv1d``/``ConvTranspose1d``/``MaxPool1d``/``AvgPool1d`` records the lengths
at its output rate, as do the 2-d front ends (``Conv2d``, ``MaxPool2d``,
``AvgPool2d`` on ``(B, C, T, F)``; :mod:`seqnorm.time_layers`). An axis
(after the batch axis) whose size is a known number of steps is a time axis;
every axis of that size is cut to the real steps (attention weights
``(B, H, T, T)`` too).

In training (``train=True``) dropout, LayerDrop and SpecAugment are switched off
for the audit, and the model's parameters and buffers are restored afterwards.
A BatchNorm in training normalizes with the batch's statistics, so batched ≠
alone by design: from the first such module on, only the padding comparison
counts.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .attention_safe import attention_report
from .masks import PaddingContext, padding
from .modules import FeaturewiseNorm, GroupNorm, InstanceNorm1d
from . import time_layers as tl
from .padding_safe import TIME_LAYERS, is_padding_safe, unfollowed

__all__ = ["audit", "AuditReport", "ModuleRow", "AuditError", "CATEGORIES"]

Tensor = torch.Tensor

CATEGORIES = ("norm pooling over time", "batch statistics", "convolution across the sequence end",
              "attention over padded keys", "other")


class AuditError(ValueError):
    """The audit cannot run on this model or input (the message says why, in one line)."""


@dataclass
class ModuleRow:
    """One module's result. ``alone`` / ``padding``: the largest change at a real
    step, batched vs alone and batched vs padded (None: not compared)."""

    name: str
    type: str
    category: str
    call: int = 1                 #: which call of the module (a module used twice has two rows)
    alone: Optional[float] = None
    padding: Optional[float] = None
    scale: float = 0.0            #: max |y| at real steps, batched
    alone_counts: bool = True     #: False downstream of a training BatchNorm
    leaks: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AuditReport:
    """What :func:`audit` found. ``first_leak`` is a module name or None."""

    modules: List[ModuleRow]
    first_leak: Optional[str]
    rtol: float
    train: bool
    lengths: List[int]
    steps: int
    extra_padding: int
    model: str = ""
    notes: List[str] = field(default_factory=list)

    @property
    def tolerance(self) -> str:
        return f"{self.rtol:g} × max(1, max|y| at real steps)"

    def to_dict(self) -> dict:
        return dict(model=self.model, first_leak=self.first_leak, tolerance=self.tolerance, rtol=self.rtol,
                    train=self.train, lengths=self.lengths, steps=self.steps, extra_padding=self.extra_padding,
                    notes=self.notes, modules=[m.to_dict() for m in self.modules])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _rows(self):
        for m in self.modules:
            yield (m.name + (f" (call {m.call})" if m.call > 1 else ""), m.type, m.category, _fmt(m.alone) + ("" if m.alone_counts else " *"),
                   _fmt(m.padding), "LEAK" if m.leaks else "")

    def summary(self) -> str:
        where = f"first leak: {self.first_leak}" if self.first_leak else "no leak"
        return (f"{where} ({self.model or 'model'}, {'train' if self.train else 'eval'} mode, lengths "
                f"{self.lengths} of {self.steps} steps, +{self.extra_padding} steps of random padding; "
                f"tolerance {self.tolerance})")

    def to_text(self) -> str:
        head = ("module", "type", "category", "Δ alone", "Δ padding", "")
        rows = [head] + list(self._rows())
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [self.summary(), ""]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        lines += [f"* {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = [f"**{self.summary()}**", "", "| module | type | category | Δ alone | Δ padding | |",
                 "|---|---|---|---:|---:|---|"]
        lines += ["| " + " | ".join(f"`{r[0]}`" if i == 0 else r[i] for i in range(6)) + " |" for r in self._rows()]
        lines += ["", *[f"\\* {n}" for n in self.notes]]
        return "\n".join(lines)


def _fmt(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.2e}"


def category(module: nn.Module) -> str:
    """What kind of mixing a module can do (:data:`CATEGORIES`)."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, FeaturewiseNorm)):
        return "batch statistics"
    if isinstance(module, (nn.GroupNorm, nn.InstanceNorm1d, GroupNorm, InstanceNorm1d)):
        return "norm pooling over time"
    if isinstance(module, TIME_LAYERS):
        return "convolution across the sequence end"
    if "attention" in type(module).__name__.lower():
        return "attention over padded keys"
    return "other"


# ---------------------------------------------------------------------------
# Running the model three ways
# ---------------------------------------------------------------------------


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _time_axes(y: Tensor, batch: int, table: PaddingContext) -> Tuple[int, ...]:
    """The axes of ``y`` (after the batch axis) of the size of its first axis whose size is a known rate."""
    if y.dim() < 2 or y.shape[0] != batch or not y.is_floating_point():
        return ()
    known = set(table.known_steps())
    for axis in range(1, y.dim()):
        if y.shape[axis] in known:
            return tuple(a for a in range(1, y.dim()) if y.shape[a] == y.shape[axis])
    return ()


def _real(y: Tensor, axes: Tuple[int, ...], n: int) -> Tensor:
    for a in axes:
        y = y.narrow(a, 0, min(n, y.shape[a]))
    return y


@contextlib.contextmanager
def _quiet(model: nn.Module):
    """Dropout, LayerDrop and SpecAugment off (HF models keep probabilities in their
    config and in float attributes), restored afterwards."""
    saved = []
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None}
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            saved.append((m, "p", m.p))
            m.p = 0.0
        for key, value in list(vars(m).items()):
            if isinstance(value, float) and not isinstance(value, bool) and \
                    ("dropout" in key or "layerdrop" in key) and value > 0:
                saved.append((m, key, value))
                setattr(m, key, 0.0)
    for cfg in configs.values():
        for key in list(vars(cfg)):
            value = getattr(cfg, key)
            if isinstance(value, float) and value > 0 and ("dropout" in key or "layerdrop" in key
                                                          or key in ("mask_time_prob", "mask_feature_prob")):
                saved.append((cfg, key, value))
                setattr(cfg, key, 0.0)
    try:
        yield
    finally:
        for obj, key, value in reversed(saved):
            setattr(obj, key, value)


class _Recorder:
    """Forward hooks on every submodule: record the batched run's outputs, or compare
    a later run's outputs with them."""

    def __init__(self, model: nn.Module, batch: int):
        self.model, self.batch = model, batch
        self.names = {m: n for n, m in model.named_modules()}
        self.order: List[Tuple[str, int]] = []             # (module, call), in execution order
        self.rows: Dict[Tuple[str, int], ModuleRow] = {}
        self.stored: Dict[Tuple[str, int], Tuple[Tensor, Tuple[int, ...], Tensor]] = {}
        self.mode = "batched"
        self.table: Optional[PaddingContext] = None
        self.sequence = 0                                 # the alone run's sequence
        self.calls: Dict[str, int] = {}
        self.handles = []

    def __enter__(self):
        for m in self.model.modules():
            if tl.is_time_layer(m):
                self.handles.append(m.register_forward_hook(self._track))
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def start(self, mode: str, table: PaddingContext, sequence: int = 0) -> None:
        self.mode, self.table, self.sequence, self.calls = mode, table, sequence, {}

    def _track(self, layer, args, output):
        """Lengths at the layer's output rate (what make_padding_safe's hooks record)."""
        x, out = (args[0] if args else None), _first_tensor(output)
        axis = tl.time_axis(layer, x, self.table.known_steps()) if out is not None else None
        if axis is not None:
            lengths = tl.output_lengths(tl.geometry(layer, axis - 2), self.table.lengths_at(x.shape[axis]))
            self.table.record(out.shape[axis], lengths)

    def _hook(self, module, args, output):
        name = self.names.get(module)
        if name is None or name == "":
            return
        k = self.calls.get(name, 0)
        self.calls[name] = k + 1
        y = _first_tensor(output)
        if y is None:
            return
        rows = self.batch if self.mode != "alone" else 1
        axes = _time_axes(y, rows, self.table)
        if not axes:
            return
        lengths = self.table.lengths_at(y.shape[axes[0]]).tolist()
        y = y.detach()
        if self.mode == "batched":
            row = ModuleRow(name, type(module).__name__, category(module), call=k + 1)
            self.order.append((name, k))
            self.rows[(name, k)] = row
            row.scale = max((_real(y[b], tuple(a - 1 for a in axes), n).abs().max().item()
                             for b, n in enumerate(lengths) if n > 0), default=0.0)
            # a copy: the model may change this output in place after the hook (Gemma 4's
            # feed-forward scales its norm's output with *=), and the alone runs compare with it
            self.stored[(name, k)] = (y.float().clone(), axes, torch.tensor(lengths))
            return
        ref = self.stored.get((name, k))
        if ref is None:
            return
        y_ref, axes_ref, lengths_ref = ref
        row = self.rows[(name, k)]
        pairs = [(self.sequence, 0)] if self.mode == "alone" else [(b, b) for b in range(self.batch)]
        worst = 0.0
        for b_ref, b in pairs:
            n = min(int(lengths_ref[b_ref]), lengths[b])
            if n <= 0:
                continue
            a = _real(y_ref[b_ref], tuple(ax - 1 for ax in axes_ref), n)
            c = _real(y[b].float(), tuple(ax - 1 for ax in axes), n)
            if a.shape != c.shape:
                continue
            diff = (a - c).abs()
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
            if diff.isnan().any():
                worst = float("inf")
        field_name = "alone" if self.mode == "alone" else "padding"
        setattr(row, field_name, max(getattr(row, field_name) or 0.0, worst))


def _cut(value, b: int, n: int, steps: int, batch: int):
    """A forward argument for sequence ``b`` alone: ``(B, T, ...)`` tensors cut to its ``n`` steps."""
    if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        value = value[b:b + 1]
        if value.dim() >= 2 and value.shape[1] == steps:
            value = value[:, :n]
    return value


def _extend(value, extra: int, steps: int, batch: int, pad_at):
    """A forward argument with ``extra`` more steps, filled with its value at a padded
    step ``pad_at = (b, t)`` (an attention mask's 0, a padding mask's True)."""
    if not (isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == batch and value.shape[1] == steps):
        return value
    fill = value[pad_at[0], pad_at[1]]
    tail = fill.expand((batch, extra) + tuple(fill.shape))
    return torch.cat([value, tail.to(value.dtype)], dim=1)


def _padded_input(inputs: Tensor, lengths: Tensor, extra: int, gen: torch.Generator) -> Tensor:
    """``inputs`` with ``extra`` more steps, every padded step random: normal values of
    the input's spread, or random ids below the largest one + 1."""
    batch, steps = inputs.shape[:2]
    shape = (batch, steps + extra) + tuple(inputs.shape[2:])
    if inputs.is_floating_point():
        noise = torch.randn(shape, generator=gen) * inputs.float().std().clamp_min(1e-3).cpu()
    else:
        noise = torch.randint(0, max(int(inputs.max()) + 1, 2), shape, generator=gen)
    noise = noise.to(inputs.device, inputs.dtype)
    base = torch.cat([inputs, noise[:, steps:]], dim=1)
    real = (torch.arange(steps + extra)[None, :] < lengths[:, None]).to(inputs.device)
    return torch.where(real.reshape(real.shape + (1,) * (inputs.dim() - 2)), base, noise)


def audit(model: nn.Module, inputs: Tensor, lengths, *, time_dim: int = 1, train: bool = False,
          extra_padding: Optional[int] = None, rtol: Optional[float] = None, seed: int = 0,
          padding_context: Optional[bool] = None, progress: Optional[Callable[[str], None]] = None,
          **forward_kwargs) -> AuditReport:
    """Find where padding leaks into real steps of ``model`` (see the module docstring).

    Args:
        model: any ``nn.Module``; called as ``model(inputs, **forward_kwargs)``.
        inputs: ``(B, T, ...)``: the padded batch (a waveform ``(B, T)``, token ids, features).
        lengths: ``(B,)`` real steps of each sequence (at least one shorter than ``T``).
        time_dim: the input's time axis: 1, or 2 for a channels-first ``(B, C, T)``.
        train: audit in training mode (dropout, LayerDrop, SpecAugment off; the model's
            parameters, buffers and mode are restored afterwards). Default: eval.
        extra_padding: steps of random padding added for the padding comparison.
            Default: ``T // 2``.
        rtol: the tolerance's scale. Default: 1e-4 (1e-2 for a 16-bit model).
        padding_context: run inside ``seqnorm.padding(lengths=...)``, as a model made
            padding-safe needs. Default: when :func:`~seqnorm.make_padding_safe` hooked it.
        progress: called with a short line before each run.
        forward_kwargs: passed on; ``(B, T, ...)`` tensors among them (an
            ``attention_mask``) are cut for the alone runs and extended with their
            padding value for the padded run.

    Returns:
        :class:`AuditReport`: ``first_leak`` and one :class:`ModuleRow` per module.

    Raises:
        AuditError: no padding in ``lengths``, lengths that do not fit ``inputs``, or
            no module output with the time axis.

    Example::

        >>> from seqnorm.models import Encoder
        >>> enc = Encoder(vocab_size=11, d_model=16, n_heads=2, d_ff=32, norm="pooled_batch")
        >>> tokens, lengths = torch.randint(1, 11, (3, 8)), torch.tensor([8, 5, 3])
        >>> mask = torch.arange(8)[None, :] >= lengths[:, None]
        >>> audit(enc, tokens, lengths, train=True, padding_mask=mask).first_leak
        'layers.0.norm1.norm'
    """
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        raise AuditError(f"inputs must be a (B, T, ...) tensor, got {getattr(inputs, 'shape', type(inputs))}")
    if not 1 <= time_dim < inputs.dim():
        raise AuditError(f"time_dim must be an axis of the input after the batch axis, got {time_dim}")
    batch, steps = int(inputs.shape[0]), int(inputs.shape[time_dim])
    lengths = torch.as_tensor(lengths).long().cpu()
    if lengths.shape != (batch,):
        raise AuditError(f"lengths must have shape (B,) = ({batch},), got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
        raise AuditError(f"lengths must lie in [1, {steps}] (the input's {steps} steps), got {lengths.tolist()}")
    if bool((lengths == steps).all()):
        raise AuditError(f"the inputs have no padding (every length is {steps}): nothing to audit; pad a "
                         f"batch of different lengths")
    extra = max(1, steps // 2) if extra_padding is None else int(extra_padding)
    params = [p for p in model.parameters()]
    low = bool(params) and params[0].dtype in (torch.float16, torch.bfloat16)
    rtol = (1e-2 if low else 1e-4) if rtol is None else float(rtol)
    use_context = is_padding_safe(model) if padding_context is None else padding_context
    say = progress or (lambda line: None)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = {m: m.training for m in model.modules()}
    gen = torch.Generator().manual_seed(seed)
    pad_at = next((b, steps - 1) for b in range(batch) if int(lengths[b]) < steps)

    def run(mode: str, x, run_lengths, kwargs, sequence=0):
        say(f"audit: {mode}" + (f" {sequence + 1}/{batch}" if mode == "alone" else ""))
        dev_lengths = run_lengths.to(x.device)
        scope = padding(lengths=dev_lengths) if use_context else contextlib.nullcontext(
            PaddingContext(None, dev_lengths, True))
        with scope as table, torch.no_grad():
            table.record(x.shape[time_dim], dev_lengths)
            recorder.start(mode, table, sequence)
            torch.manual_seed(seed)
            model(x, **kwargs)

    model.train(train)
    try:
        with _quiet(model), _Recorder(model, batch) as recorder:
            run("batched", inputs, lengths, forward_kwargs)
            if not recorder.rows:
                raise AuditError(f"no module output has a time axis of the input's {steps} steps (or of a rate "
                                 f"a Conv1d makes of it): is the time axis the input's second?")
            for b in range(batch):
                n = int(lengths[b])
                x = inputs[b:b + 1].narrow(time_dim, 0, n)
                kwargs = {k: _cut(v, b, n, steps, batch) for k, v in forward_kwargs.items()}
                run("alone", x, lengths[b:b + 1], kwargs, b)
            x = _padded_input(inputs.movedim(time_dim, 1), lengths, extra, gen).movedim(1, time_dim)
            kwargs = {k: _extend(v, extra, steps, batch, pad_at) for k, v in forward_kwargs.items()}
            run("padded", x, lengths, kwargs)
    finally:
        model.load_state_dict(state)
        for m, mode in was_training.items():
            m.train(mode)
    rows = [recorder.rows[key] for key in recorder.order]
    batch_stats_from = next((i for i, r in enumerate(rows) if train and r.category == "batch statistics"), None)
    first = None
    for i, r in enumerate(rows):
        r.alone_counts = batch_stats_from is None or i < batch_stats_from
        tol = rtol * max(1.0, r.scale)
        moved = (r.padding or 0.0) > tol or (r.alone_counts and (r.alone or 0.0) > tol)
        r.leaks = bool(moved)
        if moved and first is None:
            first = r.name
    notes = [f"{name} acts as torch's module (make_padding_safe could not follow it): {why}"
             for name, why in unfollowed(model).items()]
    if batch_stats_from is not None:
        notes.append(f"from {rows[batch_stats_from].name} on (a BatchNorm in training: batched ≠ alone by "
                     f"design), only the padding comparison counts")
    notes += attention_report(model, first, [r.name for r in rows if r.leaks])
    return AuditReport(rows, first, rtol, train, lengths.tolist(), steps, extra, type(model).__name__, notes)
