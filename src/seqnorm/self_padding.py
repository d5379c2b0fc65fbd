r"""Modules that pad (or crop) their own input along time: codecs' convolution wrappers.

EnCodec's and Mimi's convolutions (``EncodecConv1d``, ``MimiConv1d``) call
``torch.nn.functional.pad`` — reflect, replicate or constant; left, right or
causal, plus "extra" steps so the last window is whole — and then a
``padding=0`` convolution; their transposed convolutions crop the output with a
slice (``x[..., left:end - right]``). Batched, a short sequence gets the padding
of the longest one: the reflection of another sequence's padding instead of its
own end, a right pad computed from the batch's length, and the following
convolution sees ``T + left + right`` steps, a rate no time layer recorded.

One rule follows them all, without a list of classes. A module **pads itself**
(:func:`pads_itself`) when a direct child is a time layer with no implicit
padding and the module's class calls ``functional.pad``, or another child is
one of torch's padding modules (``nn.ConstantPad1d``: FunASR's FSMN), or the
time layer is a transposed convolution, whose output such a module crops; a
``Conv1d`` whose ``padding_mode`` is not ``zeros`` (UnivNet's reflect
``conv_pre``: torch pads it with ``functional.pad`` before a ``padding=0`` call);
and a ``Conv1d`` subclass whose own ``forward`` pads (moonshine_streaming's
``MoonshineStreamingCausalConv1d``: a causal left pad, then ``Conv1d.forward``).
While it runs inside
a padding context, a :class:`torch.overrides.TorchFunctionMode` follows its
calls (its ``forward`` is wrapped, so it runs eagerly under ``torch.compile``):

* **a pad** along the last axis of a tensor at a known rate: each sequence's
  steps past its own end get what they get alone — the pad value, or the
  reflection / replication / wrap of *that sequence's* end (a gather per
  sequence, on the device) — and the lengths ``L_b + left + right_b`` are
  recorded at the padded rate, so the following convolution is followed.
  ``right_b`` is the right pad the module gives a sequence of ``L_b`` steps
  alone: a module may compute it from the input's length (EnCodec's extra
  padding), so it is read from the module itself, run once per length on a
  ``meta`` tensor (no data, cached; only where the lengths are on the host);
* **a crop** ``x[..., a:b]`` of the last axis at a known rate: each sequence
  loses ``a`` steps at its start and ``T − b`` at its own end (the codecs' crop
  of a transposed convolution's padding), recorded at the cropped rate;
* **its own convolution** (a ``Conv1d`` subclass that pads in its ``forward``,
  so no time layer's hook sees it): the call of ``conv1d`` with the module's
  weight on a tensor at a known rate records each sequence's output length;
* **its input at a rate not known yet** (moonshine_streaming frames the
  waveform by a reshape, which no layer follows) with a ``(B, T)`` mask
  argument at that rate (the model's own mask, 1 / True at each sequence's
  first steps): the lengths the mask holds are recorded at ``T`` first.

Anything else (a pad of another axis, a rate the context does not know) is
left to torch, and the layer after it falls back with its own warning.
Under ``torch.compile`` a module that pads itself breaks the graph (it runs
eagerly); models without one (wav2vec2, HuBERT, Parakeet) get no such wrapper
and still compile whole.
"""

from __future__ import annotations

import functools
import inspect
import re
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import time_layers as tl
from .masks import close_padding, current_padding, end_padded_lengths, host_readable, known_rates, open_padding

__all__ = ["pads_itself", "hook_self_padding"]

Tensor = torch.Tensor
_F_PAD = torch.nn.functional.pad
_CALLS_PAD = re.compile(r"\b(?:functional|F|torch)\.pad\(")
_calls_pad: Dict[type, bool] = {}


def _class_calls_pad(cls: type) -> bool:
    if cls not in _calls_pad:
        found = False
        for c in cls.__mro__:
            if c.__module__.startswith("torch") or c is object:
                continue
            try:
                found = found or bool(_CALLS_PAD.search(inspect.getsource(c)))
            except (OSError, TypeError):
                pass
        _calls_pad[cls] = found
    return _calls_pad[cls]


def _unpadded_time_child(module: nn.Module) -> Optional[nn.Module]:
    """A direct child of ``module`` that is a 1-d time layer with no implicit padding and a
    window wider than a step (or transposed), else None."""
    for child in module.children():
        k = tl.kind(child)
        if k is None or k.spatial != 1:
            continue
        g = tl.geometry(child)
        if g.left == 0 and g.right == 0 and (g.span > 0 or g.stride > 1 or g.transposed):
            return child
    return None


#: torch's padding modules: a module holding one next to its convolution pads through it (FunASR's
#: FSMN: ``conv(pad(x))`` with a ``ConstantPad1d`` child), as one that calls ``functional.pad``
_PAD_MODULES = (nn.ConstantPad1d, nn.ZeroPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d, nn.CircularPad1d)


def _pads_with_mode(conv: nn.Module) -> bool:
    """Whether torch's ``padding_mode`` (not zeros) pads ``conv`` before a ``padding=0`` call."""
    return getattr(conv, "padding_mode", "zeros") != "zeros"


def _own_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a ``Conv1d`` subclass whose own ``forward`` pads its input (it is no
    time layer: :func:`~seqnorm.time_layers.kind` counts only torch's forward)."""
    return (isinstance(module, nn.Conv1d) and type(module).forward is not nn.Conv1d.forward
            and _class_calls_pad(type(module)))


def pads_itself(module: nn.Module) -> bool:
    """Whether ``module`` pads (or crops) its own input around a time layer: see the module docstring."""
    k = tl.kind(module)
    if k is not None:
        # a convolution whose padding_mode is not zeros pads itself with functional.pad (UnivNet's
        # reflect conv_pre): batched, it would reflect the batch's padding, not the sequence's end
        return k.spatial == 1 and not k.transposed and _pads_with_mode(module)
    if _own_conv(module):
        return True
    child = _unpadded_time_child(module)
    return child is not None and (tl.kind(child).transposed or _class_calls_pad(type(module))
                                  or any(isinstance(c, _PAD_MODULES) for c in module.children()))


# ---------------------------------------------------------------------------
# What a sequence gets alone: the module's pad calls at its length, on a meta tensor
# ---------------------------------------------------------------------------


def _ints(pad) -> Tuple[int, ...]:
    return tuple(int(p) for p in pad)


def _pad_args(args, kwargs):
    pad = args[1] if len(args) > 1 else kwargs["pad"]
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value", None)
    return pad, mode, value


class _Probe(TorchFunctionMode):
    """Records the pad calls of one forward on a meta tensor."""

    def __init__(self):
        super().__init__()
        self.pads: List[Tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _F_PAD:
            self.pads.append(_ints(_pad_args(args, kwargs)[0]))
        with torch._C.DisableTorchFunction():
            return func(*args, **kwargs)


_MAX_PROBED = 4096
#: module → {(input shape without batch, length): the pads it makes alone}
_probed: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _pads_alone(module: nn.Module, x: Tensor, length: int) -> List[Tuple[int, ...]]:
    """The pad amounts ``module`` uses, call by call, on one sequence of ``length`` steps."""
    cache = _probed.setdefault(module, {})
    key = (tuple(x.shape[1:-1]), length, x.dtype)
    if key not in cache:
        if len(cache) >= _MAX_PROBED:     # lengths of every call: keep the memory bounded
            cache.clear()
        probe = _Probe()
        depth = open_padding(None)        # the probe is no padded call: every hook stands aside
        try:
            with probe:
                type(module).forward(module, torch.empty((1,) + tuple(x.shape[1:-1]) + (length,), dtype=x.dtype,
                                                         device="meta"))
        except Exception:       # a meta tensor meets the module's weights: the pads made before are what counts
            pass
        finally:
            close_padding(depth)
        cache[key] = probe.pads
    return cache[key]


# ---------------------------------------------------------------------------
# Following the pads and crops of one call
# ---------------------------------------------------------------------------


def _known_lengths(ctx, x) -> Optional[Tensor]:
    """The context's lengths at ``x``'s last axis, when ``x`` is a batched ``(B, ..., T)``
    at a rate the context knows and they fit its batch; else None."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.is_nested:
        return None
    known = known_rates(ctx)
    if known and x.shape[-1] not in known:      # (none known yet: the first layer to ask sets the input's rate)
        return None
    lengths = ctx.lengths_at(x.shape[-1])
    return lengths if lengths.shape == (x.shape[0],) else None


def _per_step(t: Tensor, like: Tensor) -> Tensor:
    """``(B, P)`` → ``(B, 1, ..., P)`` to broadcast against ``like``."""
    return t.reshape(t.shape[:1] + (1,) * (like.dim() - 2) + t.shape[1:])


def _follow_pad(x: Tensor, y: Tensor, left: int, right: int, mode: str, value, lengths: Tensor) -> Tensor:
    """``y = pad(x)`` with each sequence's steps past its own end (and, for ``circular`` and
    ``reflect``, before its start) set to what it gets alone. A reflection at least as long as
    the sequence, which torch refuses alone, follows Hugging Face's codecs (EnCodec, Mimi,
    WavTokenizer ``_pad1d``): the sequence is extended with zeros to ``max(left, right) + 1``
    steps, reflected, and the extension cropped from the end."""
    steps = x.shape[-1]
    n = lengths.to(y.device)[:, None]
    src = torch.arange(y.shape[-1], device=y.device)[None, :] - left      # the step of x each padded step copies
    past = src >= n
    if mode == "constant":
        return y.masked_fill(_per_step(past, y), 0.0 if value is None else value)
    zero = None
    if mode == "reflect":     # both sides; a sequence no longer than the pad: the codecs' zero extension
        big = max(left, right)
        ext = torch.where(n <= big, torch.full_like(n, big + 1), n)
        idx = torch.where(src < 0, -src, torch.where(src < ext, torch.full_like(src, -1), 2 * (ext - 1) - src))
        past = past | (src < 0)
        zero = (idx < 0) | (idx >= n)
    elif mode == "replicate":
        idx = (n - 1).expand(n.shape[0], src.shape[1])
    else:      # circular: the wrap of the sequence's own steps, on both sides
        idx = src.remainder(n.clamp_min(1))
        past = past | (src < 0)
    idx = _per_step(idx.clamp(0, steps - 1), x).expand(x.shape[:-1] + idx.shape[-1:])
    alone = x.gather(-1, idx)
    if zero is not None:
        alone = alone.masked_fill(_per_step(zero, y), 0.0)
    return torch.where(_per_step(past, y), alone, y)


def _last_axis_slice(x: Tensor, index) -> Optional[slice]:
    """The slice of ``x[index]`` when it slices only the last axis (step 1), else None."""
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    rest = index[:-1]
    full = all(r is Ellipsis or r == slice(None) for r in rest)
    if not full or (Ellipsis not in rest and len(index) != x.dim()) or index[-1].step not in (None, 1):
        return None
    return index[-1]


class _Follow(TorchFunctionMode):
    """Follows the pads and crops of one call of a module that pads itself."""

    def __init__(self, alone: Dict[int, List[Tuple[int, ...]]], conv: Optional[nn.Conv1d] = None):
        super().__init__()
        self.alone = alone      # length → the module's pads alone, call by call
        self.calls = 0
        self.conv = conv        # a Conv1d subclass that pads in its own forward: its conv1d call is followed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _F_PAD:
            out = func(*args, **kwargs)
            ctx = current_padding()
            if func is Tensor.__getitem__ and ctx is not None and isinstance(out, Tensor):
                self._crop(ctx, args, out)
            elif func is torch.conv1d and ctx is not None and self.conv is not None:
                self._conv(ctx, args, kwargs, out)
            return out
        with torch._C.DisableTorchFunction():     # an enclosing module's mode does not follow it again
            out = func(*args, **kwargs)
        ctx = current_padding()
        self.calls += 1
        return out if ctx is None else self._pad(ctx, args, kwargs, out)

    def _pad(self, ctx, args, kwargs, y):
        x = args[0]
        lengths = _known_lengths(ctx, x)
        pad, mode, value = _pad_args(args, kwargs)
        pad = _ints(pad)
        if lengths is None or len(pad) < 2 or any(pad[2:]) or not isinstance(y, Tensor):
            return y
        left, right = pad[0], pad[1]
        y = _follow_pad(x, y, left, right, mode, value, lengths)
        rights = self._rights_alone(lengths, left, right, self.calls - 1)
        ctx.record(y.shape[-1], lengths + left + rights)
        return y

    def _rights_alone(self, lengths: Tensor, left: int, right: int, call: int):
        if not self.alone or not host_readable(lengths):
            return right
        rights = []
        for n in lengths.tolist():
            pads = self.alone.get(n, ())
            if call >= len(pads) or len(pads[call]) < 2 or pads[call][0] != left:
                return right        # alone the module pads otherwise (another call order): the batch's
            rights.append(pads[call][1])
        return torch.tensor(rights, dtype=lengths.dtype, device=lengths.device)

    def _conv(self, ctx, args, kwargs, y):
        """``conv1d(x, weight, ...)`` with the module's own weight (not another conv1d its forward
        makes, as moonshine_streaming's of its mask with ones): the output lengths at ``y``'s rate."""
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        lengths = _known_lengths(ctx, args[0]) if weight is self.conv.weight else None
        if lengths is None or not isinstance(y, Tensor):
            return
        c = self.conv
        if _pads_with_mode(c) or c.padding not in ((0,), "valid"):
            return      # torch pads it too (or conv1d does): more than this forward's own pad; left to torch
        g = tl.Geometry(c.kernel_size[0], c.stride[0], 0, 0, c.dilation[0])
        ctx.record(y.shape[-1], tl.output_lengths(g, lengths))

    def _crop(self, ctx, args, y):
        x, index = args[0], args[1]
        lengths = _known_lengths(ctx, x)
        s = _last_axis_slice(x, index) if lengths is not None else None
        if s is None or y.dim() != x.dim() or y.shape[-1] == x.shape[-1]:
            return
        start, stop, _ = s.indices(x.shape[-1])
        ctx.record(y.shape[-1], (lengths - start - (x.shape[-1] - stop)).clamp(0, y.shape[-1]))


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------


def _record_mask_argument(ctx, x: Tensor, args, kwargs) -> None:
    """``x`` at a rate the context does not know, and a ``(B, T)`` bool or integer mask argument at
    that rate (1 / True at real steps, the model's own): the lengths it holds, recorded at ``T``.
    (With no rate known yet the context's lengths would be taken for ``T``'s: the mask is the
    model's own word on that rate.)"""
    if x.dim() < 2 or x.shape[-1] in known_rates(ctx):
        return
    for m in list(args[1:]) + list(kwargs.values()):
        if (isinstance(m, Tensor) and m.shape == (x.shape[0], x.shape[-1])
                and (m.dtype == torch.bool or not (m.is_floating_point() or m.is_complex()))):
            real = m.to(torch.bool)
            # a mask True at padding (torch's key_padding_mask), or with holes, says no lengths
            lengths = real.sum(-1) if not host_readable(real) else end_padded_lengths(real.logical_not())
            if lengths is not None:
                ctx.record(x.shape[-1], lengths)
            return


def _follow_mode(module: nn.Module, args, kwargs) -> Optional[_Follow]:
    """The mode that follows this call's pads and crops, or None outside a padding context."""
    ctx = current_padding()
    if ctx is None or not args or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    _record_mask_argument(ctx, x, args, kwargs)
    lengths = _known_lengths(ctx, x)
    alone = {}
    if lengths is not None and host_readable(lengths):
        alone = {n: _pads_alone(module, x, n) for n in set(lengths.tolist())}
    return _Follow(alone, module if _own_conv(module) else None)


class _FollowsPads:
    """``module.forward`` run under :class:`_Follow` inside a padding context (an instance
    attribute over the class's forward; a deep copy of the model gets one bound to the copy).
    Eager under ``torch.compile`` (a graph break around the module): Dynamo does not run a
    TorchFunctionMode entered inside a traced frame."""

    def __init__(self, module: nn.Module):
        self.module = module
        functools.update_wrapper(self, type(module).forward.__get__(module))     # the bound signature

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        forward = type(self.module).forward.__get__(self.module)
        mode = _follow_mode(self.module, args, kwargs)
        if mode is None:
            return forward(*args, **kwargs)
        with mode:
            return forward(*args, **kwargs)


#: modules whose forward follows its pads → True
_hooked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def hook_self_padding(model: nn.Module, skip=lambda name: False) -> List[str]:
    """Make every module of ``model`` that :func:`pads_itself` follow its pads and crops (its
    forward wrapped; calling it again wraps none twice); returns their names."""
    names = []
    for name, m in model.named_modules():
        if skip(name) or not pads_itself(m):
            continue
        if m not in _hooked:
            m.__dict__["forward"] = _FollowsPads(m)
            _hooked[m] = True
        names.append(name)
    return names
