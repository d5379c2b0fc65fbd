r"""The padding context from the mask a model is called with.

:func:`seqnorm.make_padding_safe` makes a model's layers follow the
:func:`seqnorm.padding` context. Users do not open one: a Hugging Face
pipeline, a ``Trainer`` step, ``model.generate`` or a server thread calls the
model with its own mask, ``model(input_values, attention_mask=mask)``. So the
model (and each sub-model that can be called on its own, such as the encoder
``generate`` runs first) gets a forward pre-hook that reads that mask and opens
the context for the call, and a forward hook that closes it:

* **which argument**: the first of :data:`MASK_ARGUMENTS` the forward's
  signature names, with the convention that name has — Hugging Face's
  ``attention_mask``, ``input_features_mask``, ``feature_attention_mask`` and
  ``padding_mask`` keep 1 at real steps; torch's ``src_key_padding_mask`` and
  ``key_padding_mask`` (and ``padding_mask`` outside Hugging Face, as in
  seqnorm's own modules) are True at padding;
* **at which rate**: the mask's ``(B, T)`` must fit the call's main input (its
  first tensor argument: ``B`` its batch, ``T`` one of its other axes, as a
  waveform ``(B, T)`` or frames ``(B, T, F)`` / ``(B, F, T)``); the context
  then knows the lengths at ``T``, and the time layers' hooks carry them to
  every other rate. A mask that fits no axis of the input (a decoder step
  whose cache holds more tokens than its input) opens nothing;
* **a context the caller opened wins**, and so does one opened by an outer
  call (the model's own encoder inside its forward);
* **no mask, or a mask without padding** (read where that costs nothing: a CPU
  mask outside ``torch.compile``): nothing is opened, and the model computes
  what it computed before;
* **generate**: an encoder–decoder's ``generate`` runs the encoder once, then
  the decoder step by step with the same mask and the encoder's states. The
  context the encoder call opened is kept for that mask (per thread, as long as
  the mask is alive and unchanged), so every step's cross-attention masks the
  encoder frames past each utterance's end at the encoder's rate.

Everything here is per thread: the open contexts live on a ``threading.local``
(:mod:`seqnorm.masks`), so two threads serving one model each get their own
batch's padding. Nothing reads a device tensor back to the host, and under
``torch.compile`` the hooks trace into the model's graph (a ``threading.local``
attribute and a list trace; a ``ContextVar`` would break the graph).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .masks import (PaddingContext, call_argument, close_padding, current_padding, host_readable, open_padding,
                    pop_in_flight, push_in_flight)

__all__ = ["MASK_ARGUMENTS", "MaskArgument", "mask_argument", "context_for_call", "entry_points", "hook_model_calls",
           "unhook_model_calls"]

Tensor = torch.Tensor

#: the names a model's forward takes its padding by, in the order they are looked for, and what
#: a True / 1 entry means: ``"real"`` (Hugging Face) or ``"padding"`` (torch, seqnorm);
#: ``padding_mask`` means "real" in a Hugging Face model (EnCodec, UnivNet) and "padding" elsewhere
MASK_ARGUMENTS = {
    "attention_mask": "real",
    "input_features_mask": "real",
    "feature_attention_mask": "real",
    "padding_mask": None,
    "src_key_padding_mask": "padding",
    "key_padding_mask": "padding",
}


def _is_hf(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``PreTrainedModel`` (checked without importing transformers)."""
    hf = sys.modules.get("transformers")
    return hf is not None and isinstance(module, getattr(hf, "PreTrainedModel", ()))


@dataclass(frozen=True)
class MaskArgument:
    """Where a forward takes its mask and its main input, and what the mask's True means."""

    name: str           #: the mask's parameter name
    index: Optional[int]   #: its position among the positional parameters (after self), if it has one
    real: bool          #: True: 1 marks a real step (Hugging Face); False: True marks padding (torch)
    input_name: str     #: the main input's parameter name (the forward's first parameter)


def mask_argument(module: nn.Module, method: str = "forward") -> Optional[MaskArgument]:
    """How ``module``'s forward (or another ``method``) takes its padding (see
    :data:`MASK_ARGUMENTS`), or None."""
    try:
        params = list(inspect.signature(getattr(module, method)).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params]
    name = next((n for n in MASK_ARGUMENTS if n in names), None)
    if name is None or not params or params[0].name == name:
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    meaning = MASK_ARGUMENTS[name] or ("real" if _is_hf(module) else "padding")
    return MaskArgument(name, positional.index(name) if name in positional else None, meaning == "real",
                        params[0].name)


class _LastContexts(threading.local):
    """Per thread: the context the latest call opened, kept for the model and the mask it
    came from (a weak reference and the mask's version counter), so the calls of one
    ``generate`` share the rates its encoder call recorded — and another model given the
    same mask never sees rates this one recorded."""

    def __init__(self):
        self.last = (_dead, -1, _dead, None)     # weak references: a kept context keeps no model alive


def _dead():
    return None


_last = _LastContexts()


def _kept_context(mask: Tensor, model) -> Optional[PaddingContext]:
    ref, version, owner, ctx = _last.last
    if ref() is mask and version == mask._version and owner() is model:
        return ctx
    return None


def _keep_context(mask: Tensor, model, ctx: PaddingContext) -> None:
    if not mask.is_inference():       # an inference tensor has no version counter
        _last.last = (weakref.ref(mask), mask._version, _dead if model is None else weakref.ref(model), ctx)


def _layout(x, batch: int, steps: int) -> Optional[bool]:
    """``batch_first`` for a main input ``x`` that a ``(batch, steps)`` mask fits, else None."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.is_nested:
        return None
    if x.shape[0] == batch and steps in x.shape[1:]:
        return True
    if x.shape[1] == batch and x.shape[0] == steps:      # (T, B, ...): torch's batch_first=False
        return False
    return None


def context_for_call(arg: MaskArgument, args, kwargs, model=None) -> Optional[PaddingContext]:
    """The padding context for one call of a model whose forward takes its mask as
    ``arg`` describes, or None (no mask, one that fits no axis of the main input, or
    no padding). ``model``: the model :func:`hook_model_calls` was given (the kept
    context of a mask is its own: see :class:`_LastContexts`)."""
    mask = call_argument(args, kwargs, arg.index, arg.name)
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return None
    compiling = torch.compiler.is_compiling()
    if not compiling:      # (weak references and version counters do not trace)
        ctx = _kept_context(mask, model)
        if ctx is not None:
            return ctx
    x = call_argument(args, kwargs, 0, arg.input_name)
    batch_first = _layout(x, mask.shape[0], mask.shape[1])
    if batch_first is None:
        return None
    if compiling:      # no tensor op in the hook: the mask is negated where it is first used, in the model's graph
        return PaddingContext(None if arg.real else mask.to(torch.bool), None, batch_first,
                              real_mask=mask if arg.real else None)
    pad = mask.logical_not() if arg.real else mask.to(torch.bool)
    if host_readable(pad) and not pad.any():
        return None       # no padding: the model computes exactly what it did
    ctx = PaddingContext(pad, None, batch_first)
    _keep_context(mask, model, ctx)
    return ctx


#: modules given the call hooks → (MaskArgument, handles)
_hooked: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _open_hook(arg: MaskArgument, owner: "weakref.ref[nn.Module]"):
    def hook(module, args, kwargs):
        if current_padding() is not None:        # the caller's context, or an outer call's, wins
            return None
        ctx = context_for_call(arg, args, kwargs, owner())
        if ctx is not None:
            push_in_flight(module, "open", open_padding(ctx))
        return None
    return hook


def _close_hook(module, args, output):
    entry = pop_in_flight(module, "open")
    if entry is not None:
        close_padding(entry[1])
    return None


def entry_points(model: nn.Module, skip=()) -> list:
    """``(name, module)`` of the modules of ``model`` that open the context: the model
    itself and every Hugging Face sub-model (an encoder ``generate`` calls on its own),
    those whose forward takes a mask; none whose name is in ``skip`` or below one."""
    found = []
    for name, m in model.named_modules():
        if name and (not _is_hf(m) or any(name == s or name.startswith(s + ".") for s in skip)):
            continue
        if mask_argument(m) is not None:
            found.append((name, m))
    return found


#: methods besides forward that users call with the model's mask: a codec's ``encode``
#: (EnCodec, Mimi: ``model.encode(input_values, padding_mask)``)
MASKED_METHODS = ("encode",)


class _MethodHandle:
    """Removes a method wrapper: the class's method shows through again."""

    def __init__(self, module: nn.Module, method: str):
        self.module, self.method = module, method

    def remove(self) -> None:
        self.module.__dict__.pop(self.method, None)


class _OpensContext:
    """``module.<method>`` that opens the padding context from its mask argument, as the
    forward pre-hook does for ``forward`` (an instance attribute over the class's method;
    a deep copy of the model gets one bound to the copy)."""

    def __init__(self, module: nn.Module, method: str, arg: MaskArgument):
        self.module, self.method, self.arg = module, method, arg
        functools.update_wrapper(self, getattr(type(module), method).__get__(module))     # the bound signature

    def __call__(self, *args, **kwargs):
        fn = getattr(type(self.module), self.method).__get__(self.module)
        ctx = None if current_padding() is not None else context_for_call(self.arg, args, kwargs, self.module)
        if ctx is None:
            return fn(*args, **kwargs)
        depth = open_padding(ctx)
        try:
            return fn(*args, **kwargs)
        finally:
            close_padding(depth)


def _wrap_method(module: nn.Module, method: str, arg: MaskArgument) -> _MethodHandle:
    module.__dict__[method] = _OpensContext(module, method, arg)
    return _MethodHandle(module, method)


def hook_model_calls(model: nn.Module, skip=()) -> list:
    """Give each of :func:`entry_points` the hooks that open the padding context from its
    mask for each call, and its :data:`MASKED_METHODS` that take a mask a wrapper that
    does the same (calling it again adds none). Returns their names."""
    names = []
    owner = weakref.ref(model)
    for name, m in entry_points(model, skip):
        if m not in _hooked:
            arg = mask_argument(m)
            handles = (m.register_forward_pre_hook(_open_hook(arg, owner), with_kwargs=True),
                       m.register_forward_hook(_close_hook, always_call=True))
            for method in MASKED_METHODS:
                marg = mask_argument(m, method) if callable(getattr(type(m), method, None)) else None
                if marg is not None:
                    handles += (_wrap_method(m, method, marg),)
            _hooked[m] = (arg, handles)
        names.append(name)
    return names


def unhook_model_calls(model: nn.Module) -> None:
    """Remove :func:`hook_model_calls`' hooks: the model then follows padding only inside
    :func:`seqnorm.padding`."""
    for m in model.modules():
        entry = _hooked.pop(m, None)
        if entry is not None:
            for handle in entry[1]:
                handle.remove()
