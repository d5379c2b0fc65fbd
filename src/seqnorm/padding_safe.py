r"""``seqnorm.make_padding_safe``: batched = alone for a model whose source you do not edit.

A padded batch changes a sequence's output in two ways (the note's lesson, and
the speech models' bug): a norm pools statistics over time, padding included
(GroupNorm in wav2vec2's feature encoder, BatchNorm in HuBERT's and the
Conformer's convolutions), and a convolution with kernel > 1 reads past the
end of a sequence into padding that earlier layers made non-zero. This module
fixes both, in place:

* **norms**: every ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
  ``nn.BatchNorm1d`` and ``nn.InstanceNorm1d`` (these exact classes; a
  subclass may compute something else) becomes its masked seqnorm
  counterpart, parameters and buffers carried over, so without padding the
  model computes what it did;
* **convolutions**: every ``nn.Conv1d``, ``nn.ConvTranspose1d``,
  ``nn.MaxPool1d`` and ``nn.AvgPool1d`` gets two hooks. Before it runs, its
  input's padded steps are set to what the layer would see past the end of
  the sequence alone — zeros (the lowest finite value for max pooling) — when
  the kernel is wider than one step; after it runs, the lengths at its output
  rate are recorded in the :func:`seqnorm.padding` context:

  .. math::
      L_\text{out} = \Bigl\lfloor \frac{L + 2p - d(k - 1) - 1}{s} \Bigr\rfloor + 1
      \qquad (\text{transposed: } (L - 1)s - 2p + d(k - 1) + p_\text{out} + 1)

  so every later norm and convolution gets the mask at its own frame rate.

The lengths passed to :func:`seqnorm.padding` are those at the first padding-
aware layer the input reaches (a speech model's waveform). Everything happens
inside that context; outside it the hooks do nothing and the norms see no
padding. Errors name the layer: a sequence too short for a convolution, lengths
beyond the input, channels that do not match.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional, Tuple

import torch
from torch import nn

from .attention_safe import hook_attention, unhook_attention
from .convert import ConversionWarning, convert
from .masks import current_padding, lengths_to_padding_mask
from .modules import GroupNorm, InstanceNorm1d
from .running import sync_free

__all__ = ["make_padding_safe", "conv_output_lengths", "reads_past_the_end", "is_padding_safe", "TIME_LAYERS"]

Tensor = torch.Tensor

_ROWWISE = (nn.LayerNorm, nn.RMSNorm)
_CHANNELS_FIRST = (nn.GroupNorm, nn.BatchNorm1d, nn.InstanceNorm1d)
#: the layers whose output rate make_padding_safe follows
TIME_LAYERS = (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d)

#: modules already given hooks → their handles (so a second call adds none)
_hooked: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _one(v) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def _geometry(layer: nn.Module) -> Tuple[int, int, int, int, int, bool]:
    """``(kernel, stride, left+right padding, dilation, output_padding, ceil_mode)`` of a time layer."""
    k, s, d = _one(layer.kernel_size), _one(layer.stride), _one(getattr(layer, "dilation", 1))
    padding = layer.padding
    if padding == "valid":
        total = 0
    elif padding == "same":
        total = d * (k - 1)
    else:
        total = 2 * _one(padding)
    return k, s, total, d, _one(getattr(layer, "output_padding", 0)), bool(getattr(layer, "ceil_mode", False))


def reads_past_the_end(layer: nn.Module) -> bool:
    """Whether a real output of ``layer`` can read a step past its sequence's end.

    Not with a one-step kernel, nor without padding: an unpadded (``"valid"``)
    window ``t`` of a sequence of ``L`` steps is real when
    ``t ≤ ⌊(L − d(k−1) − 1)/s⌋``, so it ends at ``t·s + d(k−1) ≤ L − 1``. Padded
    windows, ``ceil_mode`` (a last window may run past the input) and transposed
    convolutions can."""
    k, s, total, d, _, ceil = _geometry(layer)
    if k == 1 and not isinstance(layer, nn.ConvTranspose1d):
        return False
    return total > 0 or ceil or isinstance(layer, nn.ConvTranspose1d)


def conv_output_lengths(layer: nn.Module, lengths: Tensor) -> Tensor:
    """The lengths after ``layer`` (a Conv1d, ConvTranspose1d, MaxPool1d or
    AvgPool1d) of sequences of ``lengths`` real steps, each as if it were alone
    (torch's output-size formula applied per sequence); 0 stays 0, and a
    sequence too short for the kernel gets 0 (:func:`make_padding_safe`'s hook
    reports it)."""
    k, s, total, d, out_pad, ceil = _geometry(layer)
    if isinstance(layer, nn.ConvTranspose1d):
        out = (lengths - 1) * s - total + d * (k - 1) + out_pad + 1
    else:
        span = lengths + total - d * (k - 1) - 1
        out = (torch.div(span + (s - 1 if ceil else 0), s, rounding_mode="floor")) + 1
        if ceil:   # torch: the last window must start inside the input or its left padding
            out = torch.where((out - 1) * s >= lengths + total // 2, out - 1, out)
    return torch.where(lengths > 0, out.clamp_min(0), torch.zeros_like(out))


def _name(name: str, module: nn.Module) -> str:
    return f"seqnorm.make_padding_safe: layer {name!r} ({type(module).__name__})"


def _lengths_at(ctx, steps: int, batch: int, where: str) -> Tensor:
    """The context's lengths at ``steps``, checked against the layer's input."""
    try:
        lengths = ctx.lengths_at(steps)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if lengths.shape != (batch,):
        raise ValueError(f"{where}: the padding holds {tuple(lengths.shape)[0] if lengths.dim() else 0} "
                         f"sequences but the layer's input has batch size {batch}")
    if not sync_free(lengths) and lengths.numel() and int(lengths.max()) > steps:
        raise ValueError(f"{where}: lengths up to {int(lengths.max())} but the layer's input has only "
                         f"{steps} time steps (lengths must be at the rate of the model's input)")
    return lengths


def _in_context(args):
    """``(context, x)`` when a padding context is active and the layer's input is a
    batched ``(N, C, L)`` / ``(N, L, C)`` tensor; ``(None, None)`` otherwise."""
    ctx = current_padding()
    if ctx is None or not args or not isinstance(args[0], Tensor) or args[0].dim() != 3:
        return None, None
    return ctx, args[0]


def _time_pre_hook(name: str):
    def hook(layer, args):
        ctx, x = _in_context(args)
        if ctx is None:
            return None
        where = _name(name, layer)
        channels = getattr(layer, "in_channels", None)
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"{where}: expects {channels} input channels (input (N, {channels}, L)), "
                             f"got input of shape {tuple(x.shape)}")
        lengths = _lengths_at(ctx, x.shape[-1], x.shape[0], where)
        if not reads_past_the_end(layer):
            return None
        pad = lengths_to_padding_mask(lengths.to(x.device), x.shape[-1]).unsqueeze(1)
        fill = torch.finfo(x.dtype).min if isinstance(layer, nn.MaxPool1d) else 0.0
        return (x.masked_fill(pad, fill),) + tuple(args[1:])
    return hook


def _time_hook(name: str):
    def hook(layer, args, output):
        ctx, x = _in_context(args)
        if ctx is None:
            return None
        out = output[0] if isinstance(output, tuple) else output     # MaxPool1d(return_indices=True)
        lengths = ctx.lengths_at(args[0].shape[-1])
        out_lengths = conv_output_lengths(layer, lengths)
        if not sync_free(lengths):
            short = ((lengths > 0) & (out_lengths <= 0)).nonzero().flatten().tolist()
            if short:
                b = short[0]
                raise ValueError(f"{_name(name, layer)}: sequence {b} has {int(lengths[b])} steps, too few "
                                 f"for kernel {_one(layer.kernel_size)} (stride {_one(layer.stride)}): its "
                                 f"output would have no step")
        ctx.record(out.shape[-1], out_lengths)
        return None
    return hook


def _norm_pre_hook(name: str, channels_first: bool):
    """Check a swapped norm's input against the padding before it runs, so that
    an error names the layer."""
    def hook(norm, args):
        ctx, x = _in_context(args)
        if ctx is None:
            return None
        where = _name(name, norm)
        if channels_first:
            channels = getattr(norm, "num_channels", None) or norm.num_features
            if x.shape[1] != channels:
                raise ValueError(f"{where}: expects {channels} channels (input (N, {channels}, L)), got "
                                 f"input of shape {tuple(x.shape)}")
            _lengths_at(ctx, x.shape[-1], x.shape[0], where)
        elif ctx.batch_first:
            _lengths_at(ctx, x.shape[1], x.shape[0], where)
        return None
    return hook


def _swap_norm(m: nn.Module) -> Optional[nn.Module]:
    """The masked counterpart of a torch norm, or None to keep ``m``."""
    if type(m) in _ROWWISE:
        return convert(m, "layer" if type(m) is nn.LayerNorm else "rms")
    if type(m) is nn.BatchNorm1d:
        return convert(m, "masked_batch")
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
    if isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)) and layer.padding_mode != "zeros" \
            and _one(layer.kernel_size) > 1:
        warnings.warn(f"{_name(name, layer)}: padding_mode={layer.padding_mode!r} pads a sequence alone with "
                      f"its own values, which a batch cannot reproduce at the end of a shorter sequence: "
                      f"the last {_one(layer.padding) if not isinstance(layer.padding, str) else 'few'} "
                      f"outputs of such a sequence differ batched vs alone", ConversionWarning, stacklevel=3)
    if isinstance(layer, nn.AvgPool1d) and not layer.count_include_pad and _one(layer.padding) > 0:
        warnings.warn(f"{_name(name, layer)}: count_include_pad=False divides by the real steps of the "
                      f"window, which at the end of a shorter sequence counts batch padding too",
                      ConversionWarning, stacklevel=3)


def is_padding_safe(model: nn.Module) -> bool:
    """Whether :func:`make_padding_safe` hooked any module of ``model``."""
    return any(m in _hooked for m in model.modules())


def make_padding_safe(model: nn.Module, *, attention: bool = True) -> nn.Module:
    """Make ``model``'s outputs at real steps independent of padding, in place.

    Swaps its norms for seqnorm's masked ones and hooks its time convolutions
    and pooling layers (see the module docstring); returns ``model``. Padding
    then reaches every layer through :func:`seqnorm.padding`, with lengths at
    the rate of the model's input::

        model = seqnorm.make_padding_safe(model)
        with seqnorm.padding(lengths=input_lengths):
            out = model(batch, attention_mask=attention_mask)

    Without the context the model computes what it computed before (to float
    rounding). Calling it twice changes nothing more. Parameters of swapped
    norms are new objects: build the optimizer afterwards.

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
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = _swap_norm(child)
            if new is not None:
                new.train(child.training)
                setattr(parent, child_name, new)
    for name, m in model.named_modules():
        if m in _hooked:
            continue
        if isinstance(m, TIME_LAYERS):
            _warn_unfollowed(m, name)
            _hooked[m] = (m.register_forward_pre_hook(_time_pre_hook(name)),
                          m.register_forward_hook(_time_hook(name)))
        elif isinstance(m, (GroupNorm, InstanceNorm1d)) or getattr(m, "channels_first", False):
            _hooked[m] = (m.register_forward_pre_hook(_norm_pre_hook(name, True)),)
        elif isinstance(m, _ROWWISE):
            _hooked[m] = (m.register_forward_pre_hook(_norm_pre_hook(name, False)),)
    hook_attention(model) if attention else unhook_attention(model)
    return model
