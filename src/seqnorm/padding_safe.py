r"""``seqnorm.make_padding_safe``: batched = alone for a model whose source you do not edit.

A padded batch changes a sequence's output in two ways (the note's lesson, and
the speech models' bug): a norm pools statistics over time, padding included
(GroupNorm in wav2vec2's feature encoder, BatchNorm in HuBERT's and the
Conformer's convolutions), and a convolution or pooling window reads past the
end of a sequence into padding that earlier layers made non-zero. This module
fixes both, in place:

* **norms**: every ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
  ``nn.BatchNorm1d``, ``nn.BatchNorm2d`` and ``nn.InstanceNorm1d`` (these exact
  classes; a subclass may compute something else) becomes its masked seqnorm
  counterpart, parameters and buffers carried over, so without padding the
  model computes what it did. A norm over 4-d activations — ``(B, C, T, F)``
  channels first, ``(B, T, F, C)`` row-wise — is masked over ``(B, T)``;
* **time layers** (:mod:`seqnorm.time_layers`): every ``nn.Conv1d``,
  ``nn.ConvTranspose1d``, ``nn.MaxPool1d``, ``nn.AvgPool1d`` and the 2-d front
  ends ``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.AvgPool2d`` on ``(B, C, T, F)``
  (time: the axis holding the current number of steps) get two hooks. Before
  the layer runs, its input's padded steps are set to what it would see past
  the end of the sequence alone, when a real output can read there; after it
  runs, the lengths at its output rate are recorded in the
  :func:`seqnorm.padding` context (and an average pool's windows clipped at a
  sequence's end get the divisor they have alone), so every later norm and
  layer gets the mask at its own frame rate.

The padding comes from the mask the model is called with (its ``attention_mask``
or the like, at the rate of its input: :mod:`seqnorm.call_padding` opens the
:func:`seqnorm.padding` context for each call), or from a context the caller
opened, with lengths at the first padding-aware layer the input reaches (a
speech model's waveform or feature frames). Everything happens inside that
context; outside it the hooks do nothing and the norms see no padding.

* **modules that pad themselves** (:mod:`seqnorm.self_padding`): a codec's
  convolution wrapper that calls ``functional.pad`` before a ``padding=0``
  convolution, or crops a transposed convolution's output, gets each
  sequence's padding as it is alone and the lengths at the padded rate.

**Text decoders are left alone.** In an encoder–decoder model (Hugging Face's
Speech2Text, Whisper, Moonshine) the decoder's steps are text tokens, not the
input's frames: the context's lengths do not describe them, and a decoder whose
token count happened to equal a frame count would have its tokens past the
audio's length masked. A text decoder is known by its role, not its name
(:func:`seqnorm.attention_safe.is_text_decoder`: token ids in, or a token
embedding): a codec's audio decoder (DAC, EnCodec, Mimi) is a time stack and is
followed. A text decoder's norms and layers stay torch's (a row-wise norm never
mixes tokens; its real tokens' outputs are exact); its cross-attention still
masks the encoder's padded frames (:mod:`seqnorm.attention_safe`).

**Do no harm.** A norm or time layer whose input is not on a ``(B, T)`` grid the
context knows — a table with no batch or time axis, a rate no followed layer
recorded, lengths longer than its time axis — acts as torch's module does, with
one :class:`~seqnorm.ConversionWarning` per layer naming it and the reason
(:func:`unfollowed` lists them; the audit reports them). Only what torch refuses
too raises, naming the layer (channels that do not match).
"""


from __future__ import annotations

import warnings
import weakref
from typing import Dict, Optional

import torch
from torch import nn

from . import host_lengths as hl, time_layers as tl
from .call_padding import hook_model_calls, unhook_model_calls
from .attention_safe import decoder_paths, hook_attention, in_decoder, unhook_attention
from .convert import ConversionWarning, convert
from .masks import (close_padding, current_padding, host_readable, known_rates as _known, open_padding,
                    pop_in_flight as _pop, push_in_flight as _push)
from .self_padding import hook_self_padding, pads_itself
from .modules import GroupNorm, InstanceNorm1d
from .time_layers import TIME_LAYERS

__all__ = ["make_padding_safe", "conv_output_lengths", "reads_past_the_end", "is_padding_safe", "unfollowed",
           "TIME_LAYERS"]

Tensor = torch.Tensor

_ROWWISE = (nn.LayerNorm, nn.RMSNorm)
_CHANNELS_FIRST = (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d)

#: modules already given hooks → their handles (so a second call adds none)
_hooked: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
#: layers that fell back to torch's behaviour → the reason (warned once each)
_fell_back: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _one(v) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def reads_past_the_end(layer: nn.Module, axis: int = 0) -> bool:
    """Whether a real output of ``layer`` can read a step past its sequence's end
    (along spatial axis ``axis``: 0 for a 1-d layer, 0 = H / 1 = W for a 2-d one).
    See :func:`seqnorm.time_layers.reads_past_the_end` for the rule and why."""
    return tl.reads_past_the_end(tl.geometry(layer, axis))


def conv_output_lengths(layer: nn.Module, lengths: Tensor, axis: int = 0) -> Tensor:
    """The lengths after ``layer`` (a time layer of :data:`TIME_LAYERS`) of sequences of
    ``lengths`` real steps along spatial axis ``axis``, each as if it were alone
    (torch's output-size formula applied per sequence); 0 stays 0, and a sequence too
    short for the kernel gets 0 (:func:`make_padding_safe`'s hook warns)."""
    return tl.output_lengths(tl.geometry(layer, axis), lengths)


def _name(name: str, module: nn.Module) -> str:
    return f"seqnorm.make_padding_safe: layer {name!r} ({type(module).__name__})"


# ---------------------------------------------------------------------------
# Do no harm: a layer off the context's grid acts as torch's, warned once
# ---------------------------------------------------------------------------


def unfollowed(model: nn.Module) -> Dict[str, str]:
    """The layers of ``model`` that fell back to torch's behaviour so far → why."""
    return {name: _fell_back[m] for name, m in model.named_modules() if m in _fell_back}


def _fall_back(module: nn.Module, where: str, reason: str, norm: bool) -> None:
    """Warn once for ``module``; a norm then runs this call without the context."""
    if module not in _fell_back:
        _fell_back[module] = reason
        what = "no padding mask" if norm else "its padded steps are left as they are and its output rate is not recorded"
        warnings.warn(f"{where}: {reason}; it acts as torch's module does here ({what})",
                      ConversionWarning, stacklevel=2)
    if norm:
        _push(module, "context", open_padding(None))


def _undo_hook(module, args, output):
    """Undo what the pre-hook did for this call (always called, errors too)."""
    entry = _pop(module)
    if entry is None:
        return None
    what, value = entry
    if what == "context":
        close_padding(value)
        return None
    if what == "reshape" and isinstance(output, Tensor):      # (B, C, T·F) → (B, C, T, F), time back in place
        shape, axis = value
        moved = shape[:2] + (shape[axis],) + tuple(s for a, s in enumerate(shape) if a >= 2 and a != axis)
        return output.reshape(moved).movedim(2, axis)
    return None




def _lengths_at(ctx, steps: int, batch: int, device):
    """``(lengths, None)``: the context's lengths at ``steps``, checked against the layer's
    input; ``(None, reason)`` when they do not fit it. Host lengths come as a tuple of
    Python ints (:meth:`~seqnorm.masks.PaddingContext.host_lengths_at`, read once per
    rate) and are checked in Python; lengths on a device stay a tensor and are checked
    there, once per rate, by building the rate's mask
    (:meth:`~seqnorm.masks.PaddingContext.mask_at`, a device-side assert): reading them
    back would stall the device's stream at every layer."""
    lengths = ctx.host_lengths_at(steps)
    if lengths is None:
        known = _known(ctx)
        if known and steps not in known:
            return None, (f"no sequence lengths are known at {steps} time steps (known at "
                          f"{', '.join(map(str, sorted(known)))}): a layer before it changed the number of steps "
                          f"in a way seqnorm does not follow")
        lengths = ctx.lengths_at(steps)     # raises only for a padding_mask with holes: the caller's argument
        if lengths.shape != (batch,):
            return None, (f"the padding holds {tuple(lengths.shape)[0] if lengths.dim() else 0} sequences but "
                          f"the layer's input has batch size {batch}")
        host = ctx.host_lengths_at(steps)
        if host is None:        # on a device (or not integers: the mask, when built, says what is wrong)
            if not host_readable(lengths):
                ctx.mask_at(steps, device)
            elif lengths.numel() and int(lengths.max()) > steps:
                return None, _too_long(int(lengths.max()), steps)
            return lengths, None
        lengths = host
    if len(lengths) != batch:
        return None, f"the padding holds {len(lengths)} sequences but the layer's input has batch size {batch}"
    if lengths and max(lengths) > steps:
        return None, _too_long(max(lengths), steps)
    return lengths, None


def _too_long(top: int, steps: int) -> str:
    return (f"lengths up to {top} but the layer's input has only {steps} time steps (lengths must be at the "
            f"rate of the model's input)")


def _in_context(args):
    """``(context, x)`` when a padding context is active and the layer's input is a
    tensor; ``(None, None)`` otherwise."""
    ctx = current_padding()
    if ctx is None or not args or not isinstance(args[0], Tensor) or args[0].is_nested:
        return None, None
    return ctx, args[0]


# ---------------------------------------------------------------------------
# Time layers
# ---------------------------------------------------------------------------


def _first_axis(layer, x, ctx) -> Optional[int]:
    """The time axis of a 2-d layer that is the first to ask (no rate known yet): H,
    unless the lengths only fit W."""
    if ctx.lengths is None or not host_readable(ctx.lengths):
        return 2
    top = int(torch.as_tensor(ctx.lengths).max()) if torch.as_tensor(ctx.lengths).numel() else 0
    return next((a for a in (2, 3) if x.shape[a] >= top), 2)


def _time_axis(layer, x, ctx) -> Optional[int]:
    if x.dim() == 3 and tl.kind(layer).spatial == 1 and ctx.host_lengths_at(x.shape[2]) is not None:
        return 2         # a 1-d layer at a rate whose host lengths are known: no list of the known rates
    known = _known(ctx)
    if tl.kind(layer).spatial == 2 and x.dim() == 4 and not known:
        return _first_axis(layer, x, ctx)
    if not known and x.dim() == 3:
        return 2
    return tl.time_axis(layer, x, known)


#: time layer → {spatial axis: its Geometry}
_geometries: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _geometry(layer: nn.Module, axis: int) -> tl.Geometry:
    """:func:`seqnorm.time_layers.geometry`, read once per layer and axis outside
    ``torch.compile`` (building it costs more than the rest of a hook's host path): a
    layer's kernel, stride, padding and dilation are fixed once it is built — torch
    checks them in its constructor only."""
    if torch.compiler.is_compiling():
        return tl.geometry(layer, axis)
    per_layer = _geometries.get(layer)
    if per_layer is None:
        per_layer = _geometries[layer] = {}
    g = per_layer.get(axis)
    if g is None:
        g = per_layer[axis] = tl.geometry(layer, axis)
    return g


def _keeps_lengths(g: tl.Geometry) -> bool:
    """Whether every sequence keeps its length through a layer of geometry ``g``
    (stride 1, ``"same"`` padding: ``L + p_l + p_r − d(k−1) = L``) and, for an average
    pool, no window's divisor needs correcting (see :func:`~seqnorm.time_layers.avg_divisor_ratio`)."""
    return (not g.transposed and g.stride == 1 and g.left + g.right == g.span
            and not (g.avg and not g.divisor_override and tl.reads_past_the_end(g)))


class _HostPlan:
    """What a time layer does for host lengths (a tuple of Python ints,
    :meth:`~seqnorm.masks.PaddingContext.host_lengths_at`) at ``steps`` steps along
    ``axis``, worked out in Python once and reused while the layer gets the same
    lengths: a kept context's next call, or a new batch of the same lengths.

    ``out_lengths``: the lengths after the layer (None where every sequence keeps its
    length); ``fill``: whether a real output reads a padded step, so the padding is
    filled first; ``short``: the sequences too short for the kernel."""

    __slots__ = ("axis", "steps", "lengths", "g", "out_lengths", "fill", "short")

    def __init__(self, layer: nn.Module, axis: int, steps: int, lengths: tuple):
        g = _geometry(layer, axis - 2)
        self.axis, self.steps, self.lengths, self.g = axis, steps, lengths, g
        out = None if _keeps_lengths(g) else hl.output_lengths(g, lengths)
        self.out_lengths = out
        self.fill = tl.reads_past_the_end(g) and hl.reads_padding(g, lengths, lengths if out is None else out, steps)
        self.short = [] if out is None else [b for b, (n, m) in enumerate(zip(lengths, out)) if n > 0 and m <= 0]

    def fits(self, axis: int, steps: int, lengths: tuple) -> bool:
        return self.steps == steps and self.axis == axis and (self.lengths is lengths or self.lengths == lengths)


#: time layer → its latest _HostPlan
_plans: "weakref.WeakKeyDictionary[nn.Module, _HostPlan]" = weakref.WeakKeyDictionary()


def _host_plan(layer: nn.Module, axis: int, steps: int, lengths: tuple) -> _HostPlan:
    plan = _plans.get(layer)
    if plan is None or not plan.fits(axis, steps, lengths):
        plan = _plans[layer] = _HostPlan(layer, axis, steps, lengths)
    return plan


def _broadcast_mask(ctx, steps: int, axis: int, dim: int, device) -> Tensor:
    """The rate's ``(B, T)`` mask (built once per rate, shared with the norms) laid out to
    broadcast against a ``dim``-d input whose time axis is ``axis``."""
    pad = ctx.mask_at(steps, device)
    return pad.reshape(pad.shape[:1] + (1,) * (axis - 1) + pad.shape[1:] + (1,) * (dim - axis - 1))


def _fill_mask(ctx, steps: int, axis: int, dim: int, device):
    """:func:`_broadcast_mask`, kept with the rate's mask (made once per rate and layout)."""
    return ctx.at_rate(("fill", axis, dim), steps, device, lambda: _broadcast_mask(ctx, steps, axis, dim, device))


def _time_pre_hook(name: str):
    def hook(layer, args):
        ctx, x = _in_context(args)
        if ctx is None:
            return None
        channels = getattr(layer, "in_channels", None)
        if channels is not None and x.dim() >= 2 and x.shape[1] != channels:
            raise ValueError(f"{_name(name, layer)}: expects {channels} input channels (input (N, {channels}, ...)), "
                             f"got input of shape {tuple(x.shape)}")
        axis = _time_axis(layer, x, ctx)
        if axis is None:
            _fall_back(layer, _name(name, layer), f"its input {tuple(x.shape)} has no time axis at a rate seqnorm "
                                                  f"knows (known: {sorted(_known(ctx))})", norm=False)
            return None
        steps = x.shape[axis]
        lengths, reason = _lengths_at(ctx, steps, x.shape[0], x.device)
        if lengths is None:
            _fall_back(layer, _name(name, layer), reason, norm=False)
            return None
        if type(lengths) is tuple:      # host ints: the output lengths now, and a fill only where one is read
            plan = _host_plan(layer, axis, steps, lengths)
            _push(layer, "time", (axis, lengths, plan))
            if not plan.fill:
                return None
            pad = _fill_mask(ctx, steps, axis, x.dim(), x.device)
        else:
            _push(layer, "time", (axis, lengths, None))
            if not tl.reads_past_the_end(_geometry(layer, axis - 2)):
                return None
            pad = _broadcast_mask(ctx, steps, axis, x.dim(), x.device)
        return (x.masked_fill(pad, tl.fill_value(layer, x.dtype)),) + tuple(args[1:])
    return hook


def _time_hook(name: str):
    def hook(layer, args, output):
        entry = _pop(layer, "time")
        if entry is None:
            return None
        axis, lengths, plan = entry[1]
        ctx = current_padding()
        out = output[0] if isinstance(output, tuple) else output     # MaxPool(return_indices=True)
        if ctx is None or not isinstance(out, Tensor):
            return None
        g = _geometry(layer, axis - 2) if plan is None else plan.g
        steps_in, steps_out = args[0].shape[axis], out.shape[axis]
        if (_keeps_lengths(g) if plan is None else plan.out_lengths is None) and steps_out == steps_in:
            ctx.record(steps_out, lengths)   # the same lengths: the rate's mask stays built
            return None
        if plan is not None and plan.out_lengths is not None:
            out_lengths, short = plan.out_lengths, plan.short
        elif plan is not None:       # keeps every length, yet the steps changed: torch's sizes say otherwise
            out_lengths = hl.output_lengths(g, lengths)
            short = [b for b, (n, m) in enumerate(zip(lengths, out_lengths)) if n > 0 and m <= 0]
        else:
            out_lengths = tl.output_lengths(g, lengths)
            # lengths on a device are not read back (no stall); see _lengths_at
            short = ((lengths > 0) & (out_lengths <= 0)).nonzero().flatten().tolist() if host_readable(lengths) else []
        if short and layer not in _fell_back:
            b = short[0]
            _fell_back[layer] = "a sequence too short for its kernel"
            warnings.warn(f"{_name(name, layer)}: sequence {b} has {int(lengths[b])} steps, too few for "
                          f"kernel {g.kernel} (stride {g.stride}): its output has no step (alone torch "
                          f"would refuse it); it counts as empty from here on", ConversionWarning, stacklevel=2)
        ctx.record(steps_out, out_lengths)
        if not g.avg:
            return None
        lengths = torch.tensor(lengths, device=out.device) if type(lengths) is tuple else lengths.to(out.device)
        ratio = tl.avg_divisor_ratio(g, lengths, steps_in, steps_out)
        if ratio is None:
            return None
        ratio = ratio.to(out.dtype).reshape(ratio.shape[:1] + (1,) * (axis - 1) + ratio.shape[1:]
                                            + (1,) * (out.dim() - axis - 1))
        return out * ratio
    return hook


# ---------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------


def _norm_pre_hook(name: str, channels_first: bool):
    """Check a swapped norm's input against the padding before it runs: an error that
    torch would raise too names the layer; an input off the context's grid falls back
    to torch's behaviour (warned once); a 4-d input is masked over ``(B, T)``."""
    def hook(norm, args, kwargs):
        ctx, x = _in_context(args)
        if ctx is None or kwargs.get("padding_mask") is not None or kwargs.get("lengths") is not None:
            return None
        if channels_first:
            return _channels_first_input(norm, ctx, x, name, args, kwargs)
        return _rowwise_input(norm, ctx, x, name, args, kwargs)
    return hook


def _channels_first_input(norm, ctx, x, name, args, kwargs):
    channels = getattr(norm, "num_channels", None) or norm.num_features
    if x.dim() >= 2 and x.shape[1] != channels:
        raise ValueError(f"{_name(name, norm)}: expects {channels} channels (input (N, {channels}, L)), got "
                         f"input of shape {tuple(x.shape)}")
    if x.dim() == 2:               # (N, C): no time axis, the norm takes no context
        return None
    if x.dim() == 3:
        lengths, reason = _lengths_at(ctx, x.shape[-1], x.shape[0], x.device)
        if lengths is None:
            _fall_back(norm, _name(name, norm), reason, norm=True)
        return None
    known = _known(ctx)
    axis = next((a for a in range(2, x.dim()) if x.shape[a] in known), None) if x.dim() == 4 else None
    lengths, reason = (None, f"its input {tuple(x.shape)} has no time axis at a rate seqnorm knows "
                             f"(known: {sorted(known)})") if axis is None else \
        _lengths_at(ctx, x.shape[axis], x.shape[0], x.device)
    if lengths is None:
        _fall_back(norm, _name(name, norm), reason, norm=True)
        return None
    # (B, C, T, F) → (B, C, T·F): step t's F values are positions [tF, (t+1)F), so the
    # real ones are the first L·F — masked over (B, T) exactly
    rest = x.movedim(axis, 2)
    flat = rest.reshape(rest.shape[0], rest.shape[1], -1)
    _push(norm, "reshape", (tuple(x.shape), axis))
    lengths = torch.tensor(lengths, device=x.device) if type(lengths) is tuple else lengths.to(x.device)
    return (flat,) + tuple(args[1:]), dict(kwargs, lengths=lengths * rest.shape[3])


def _rowwise_input(norm, ctx, x, name, args, kwargs):
    tokens = x.shape[: x.dim() - len(norm.normalized_shape)]
    if not ctx.batch_first:
        if len(tokens) != 2:
            _fall_back(norm, _name(name, norm), f"its input {tuple(x.shape)} has no (T, B) token grid", norm=True)
        return None
    if len(tokens) < 2:
        _fall_back(norm, _name(name, norm), f"its input {tuple(x.shape)} has no batch and time axes (token shape "
                                            f"{tuple(tokens)})", norm=True)
        return None
    if len(tokens) == 2:
        axis = 1
    else:
        known = _known(ctx)
        axis = 1 if not known else next((a for a in range(1, len(tokens)) if tokens[a] in known), None)
    lengths, reason = (None, f"its input {tuple(x.shape)} has no time axis at a rate seqnorm knows (known: "
                             f"{sorted(known)})") if axis is None else \
        _lengths_at(ctx, tokens[axis], tokens[0], x.device)
    if lengths is None:
        _fall_back(norm, _name(name, norm), reason, norm=True)
        return None
    if len(tokens) == 2:
        return None
    pad = ctx.mask_at(tokens[axis], x.device)       # (B, T) → the token grid
    pad = pad.reshape(pad.shape[:1] + (1,) * (axis - 1) + pad.shape[1:] + (1,) * (len(tokens) - axis - 1))
    return args, dict(kwargs, padding_mask=pad.expand(tokens))


def _swap_norm(m: nn.Module) -> Optional[nn.Module]:
    """The masked counterpart of a torch norm, or None to keep ``m``."""
    if type(m) in _ROWWISE:
        return convert(m, "layer" if type(m) is nn.LayerNorm else "rms")
    if type(m) is nn.BatchNorm1d:
        return convert(m, "masked_batch")
    if type(m) is nn.BatchNorm2d:      # its (N, C, H, W) is flattened to (N, C, H·W) by the pre-hook
        bn1 = nn.BatchNorm1d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        bn1.load_state_dict(m.state_dict())
        return convert(bn1.to(next(iter(m.buffers()), torch.empty(0)).device), "masked_batch")
    if type(m) is nn.GroupNorm:
        new = GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine)
    elif type(m) is nn.InstanceNorm1d:
        new = InstanceNorm1d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    else:
        return None
    p = next(iter(m.parameters()), None)
    p = next(iter(m.buffers()), None) if p is None else p
    if p is not None:
        new = new.to(device=p.device, dtype=p.dtype)
    new.load_state_dict(m.state_dict())
    return new


def _warn_unfollowed(layer: nn.Module, name: str) -> None:
    # a Conv1d's reflect/replicate/circular padding is followed by self_padding (issue 28): no warning
    if isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d)) and layer.padding_mode != "zeros" \
            and _one(layer.kernel_size) > 1 and not pads_itself(layer):
        warnings.warn(f"{_name(name, layer)}: padding_mode={layer.padding_mode!r} pads a sequence alone with "
                      f"its own values, which a batch cannot reproduce at the end of a shorter sequence: "
                      f"the last {_one(layer.padding) if not isinstance(layer.padding, str) else 'few'} "
                      f"outputs of such a sequence differ batched vs alone", ConversionWarning, stacklevel=3)


def is_padding_safe(model: nn.Module) -> bool:
    """Whether :func:`make_padding_safe` hooked any module of ``model``."""
    return any(m in _hooked for m in model.modules())


def make_padding_safe(model: nn.Module, *, attention: bool = True, padding_from_mask: bool = True) -> nn.Module:
    """Make ``model``'s outputs at real steps independent of padding, in place.

    Swaps its norms for seqnorm's masked ones and hooks its time convolutions
    and pooling layers (see the module docstring); returns ``model``. Then call
    the model as before, with its own mask: each call opens the
    :func:`seqnorm.padding` context from it (:mod:`seqnorm.call_padding`), so a
    Hugging Face pipeline, a training step, ``generate`` and ``torch.compile``
    all get batched = alone::

        model = seqnorm.make_padding_safe(model)
        out = model(batch, attention_mask=attention_mask)    # 1 at real steps

    A model called without a mask (a feature extractor that returns none by
    default, as group-norm wav2vec2's: pass ``return_attention_mask=True``)
    computes what it computed before, to float rounding; so does one called
    with a mask without padding. A context the caller opens wins: for a model
    whose forward takes no mask, ``with seqnorm.padding(lengths=input_lengths):
    model(batch)``. Calling it twice changes nothing more. Parameters of swapped
    norms are new objects: build the optimizer afterwards.

    With ``padding_from_mask=False`` the model follows padding only inside a
    :func:`seqnorm.padding` context the caller opens (and such call hooks are
    removed).

    With ``attention`` (the default), every attention module also masks the keys
    past each sequence's end at its own rate, combined with the mask the model
    passes (:mod:`seqnorm.attention_safe`); ``attention=False`` leaves the
    model's own attention masks as they are (and removes such hooks).

    Example::

        >>> import seqnorm
        >>> net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.GroupNorm(1, 4), nn.GELU(),
        ...                     nn.Conv1d(4, 2, 3, padding=1))
        >>> net = make_padding_safe(net)
        >>> short = torch.randn(1, 1, 6)
        >>> batch = torch.cat([torch.randn(1, 1, 9), nn.functional.pad(short, (0, 3))])
        >>> with torch.no_grad(), seqnorm.padding(lengths=torch.tensor([9, 6])):
        ...     batched = net(batch)
        >>> with torch.no_grad():
        ...     alone = net(short)
        >>> torch.allclose(batched[1, :, :6], alone[0], atol=1e-6)
        True
    """
    if type(model) in _ROWWISE + _CHANNELS_FIRST:
        raise ValueError("make_padding_safe: pass the model that contains the norm (a norm alone is "
                         "replaced, not changed in place: use seqnorm.convert)")
    decoders = decoder_paths(model)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if in_decoder(f"{parent_name}.{child_name}" if parent_name else child_name, decoders):
                continue
            new = _swap_norm(child)
            if new is not None:
                new.train(child.training)
                setattr(parent, child_name, new)
    for name, m in model.named_modules():
        if m in _hooked or in_decoder(name, decoders):
            continue
        if tl.is_time_layer(m):
            _warn_unfollowed(m, name)
            _hooked[m] = (m.register_forward_pre_hook(_time_pre_hook(name)),
                          m.register_forward_hook(_time_hook(name), always_call=True))
        elif isinstance(m, (GroupNorm, InstanceNorm1d)) or getattr(m, "channels_first", False):
            _hooked[m] = (m.register_forward_pre_hook(_norm_pre_hook(name, True), with_kwargs=True),
                          m.register_forward_hook(_undo_hook, always_call=True))
        elif isinstance(m, _ROWWISE):
            _hooked[m] = (m.register_forward_pre_hook(_norm_pre_hook(name, False), with_kwargs=True),
                          m.register_forward_hook(_undo_hook, always_call=True))
    hook_self_padding(model, skip=lambda name: in_decoder(name, decoders))
    hook_attention(model) if attention else unhook_attention(model)
    hook_model_calls(model, skip=decoders) if padding_from_mask else unhook_model_calls(model)
    return model
