r"""Attention key masks from :func:`seqnorm.padding`: a padded batch attends to no key a sequence alone lacks.

A speech model derives its attention mask at the encoder's frame rate with a
formula of its own, and some formulas do not give the frames a sequence alone
has: Moonshine slices the waveform mask every 384th sample, so a frame whose
convolution windows run past the end of a short utterance counts as a real key;
SEW max-pools the mask to its squeezed rate, so a half-real window counts, where
the sequence alone has ``⌊L/2⌋`` squeezed frames. The padding context knows
the true lengths at every rate (:func:`seqnorm.make_padding_safe`'s convolution
hooks record them), so a forward pre-hook on each attention module masks out the
keys past each sequence's end:

.. math::
    \text{keep}_{b,s} = s < L_b \quad (\text{or every } s \text{ when } L_b = 0),

where ``L`` are the lengths at the rate of the keys (the module's own input, or
for cross-attention the encoder states it attends to), combined with the mask
the model passes, so causal, sliding-window or chunked structure is kept and a
mask that was already right is unchanged:

* **bool** (True = attend, HF's SDPA masks): ``mask & keep``;
* **integer** 0/1 keep masks (SEW-D): ``mask * keep``;
* **float** additive masks (HF's eager masks): the most negative value at
  dropped keys (``masked_fill``, not an addition, so a key already at the
  minimum stays there rather than overflowing to ``-inf``);
* :class:`torch.nn.MultiheadAttention`'s ``key_padding_mask`` (True =
  padding): ``mask | ~keep``.

Any shape whose last axis is the keys' and that broadcasts from the front
works: ``(B, S)``, ``(B, T, S)``, ``(B, 1, T, S)``, ``(1, 1, T, S)``. A module
called with no mask (wav2vec2 without ``attention_mask``) gets one built from
the lengths in the format it takes: what HF's mask utilities make for its
attention implementation (``config._attn_implementation``: SDPA bool ``(B, 1,
1, S)``, eager an additive float mask), causal where the module is; bool for a
module that fills its scores at ``~attention_mask`` (Parakeet); ``(B, S)`` for
one that makes it torch's ``key_padding_mask`` (WavLM). Where every sequence
fills the keys nothing is done, so SDPA keeps its mask-free kernels.
Rotary and relative-position tables need nothing: they depend on positions
``0…T−1`` or on distances, the same batched and alone.

What is not touched, and why (:func:`attention_report` lists it; ``seqnorm
audit`` prints it): self-attention inside a decoder (its keys are tokens, at a
rate the padding context does not know, and a token count equal to a frame
count would be a collision, not a rate); modules whose forward takes no mask
(a mask built inside one forward, such as Granite Speech's block attention);
masks that cannot be combined (flex attention's ``BlockMask``; a bool mask
under HF's eager attention, which adds it as 0/1 and so masks nothing, batched
or alone — Seamless M4T v2's chunk mask); a rate the context does not know.
Each warns once per layer (:class:`AttentionWarning`); none raises: the model
computes what it did.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .masks import call_argument, current_padding, host_readable

__all__ = ["hook_attention", "unhook_attention", "attention_report", "key_mask", "combine_key_mask",
           "AttentionWarning", "decoder_paths", "in_decoder"]

Tensor = torch.Tensor

#: names a key-padding mask goes by in an attention module's forward
_MASK_ARGS = ("attention_mask",)
#: where cross-attention modules receive the states they attend to
_KV_ARGS = ("key_value_states", "encoder_hidden_states")


class AttentionWarning(UserWarning):
    """An attention module's mask was left as the model made it (the message says why)."""


@dataclass
class _Hooked:
    """What :func:`hook_attention` knows of one attention module."""

    name: str
    kind: str                        #: "hf" (``attention_mask``), "mha" (nn.MultiheadAttention), or "none"
    in_decoder: bool = False
    reason: str = ""                 #: why it is not hooked ("" when it is)
    handle: Optional[object] = None
    last: str = ""                   #: what the latest call under seqnorm.padding did
    warned: set = field(default_factory=set)


#: module → its record (weak, so a model that is dropped frees its records)
_records: "weakref.WeakKeyDictionary[nn.Module, _Hooked]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------
# The mask arithmetic (pure functions)
# ---------------------------------------------------------------------------


def key_mask(lengths: Tensor, steps: int) -> Tensor:
    """``(B,)`` lengths → ``(B, steps)`` bool, True at the keys a sequence has
    (``s < L_b``); a sequence with no step keeps every key, so its rows stay
    finite (they are all padding, but NaN there could reach other layers)."""
    positions = torch.arange(steps, device=lengths.device)
    return (positions[None, :] < lengths[:, None]) | (lengths == 0)[:, None]


def _broadcast_keep(keep: Tensor, mask: Tensor) -> Optional[Tensor]:
    """``keep`` (B, S) laid out to broadcast against ``mask`` (…, S'): ``(B, 1, …, 1, S')``;
    keys past ``S`` (a mask longer than the keys, as for a static cache) are kept.
    None when the shapes cannot be aligned."""
    batch, steps = keep.shape
    if mask.dim() < 2 or mask.shape[0] not in (1, batch) or mask.shape[-1] < steps:
        return None
    if mask.shape[-1] > steps:
        keep = torch.cat([keep, keep.new_ones(batch, mask.shape[-1] - steps)], dim=1)
    return keep.reshape((batch,) + (1,) * (mask.dim() - 2) + (keep.shape[1],))


def combine_key_mask(mask: Tensor, keep: Tensor, *, padding_true: bool = False) -> Optional[Tensor]:
    """``mask`` with the keys where ``keep`` (B, S) is False dropped; None when the
    shapes do not align.

    ``mask``: bool (True = attend; with ``padding_true``, True = padding, as
    nn.MultiheadAttention's ``key_padding_mask``), integer 0/1 (1 = attend) or
    float additive (0 = attend). Where ``keep`` is True the mask is unchanged."""
    k = _broadcast_keep(keep.to(mask.device), mask)
    if k is None:
        return None
    if mask.dtype == torch.bool:
        return mask | ~k if padding_true else mask & k
    if mask.is_floating_point():
        return mask.masked_fill(~k, torch.finfo(mask.dtype).min)
    return mask * k.to(mask.dtype)


def _new_mask(keep: Tensor, style: str, dtype: torch.dtype, queries: int, causal: bool) -> Tensor:
    """A mask from ``keep`` alone for a module called without one: ``(B, 1, 1, S)``,
    or ``(B, 1, T, S)`` when causal (query ``t`` sees keys ``s ≤ t + S − T``)."""
    if style == "keys":
        return keep
    batch, steps = keep.shape
    allowed = keep[:, None, None, :]
    if causal:
        t = torch.arange(queries, device=keep.device)[:, None]
        s = torch.arange(steps, device=keep.device)[None, :]
        allowed = allowed & (s <= t + (steps - queries))[None, None]
    if style == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=keep.device).masked_fill(~allowed,
                                                                                   torch.finfo(dtype).min)


# ---------------------------------------------------------------------------
# The hooks
# ---------------------------------------------------------------------------


def _warn_once(rec: _Hooked, why: str, message: str, deeper: int = 0) -> None:
    """Warn once per module and reason; ``deeper``: how many more calls down from the hook
    than one (so the warning points where it did before :func:`_keep` came between)."""
    rec.last = why
    if why not in rec.warned:
        rec.warned.add(why)
        warnings.warn(f"seqnorm.make_padding_safe: attention {rec.name!r}: {message}; its mask is left as the "
                      f"model made it", AttentionWarning, stacklevel=4 + deeper)


def _lengths(ctx, steps: int, batch: int, rec: _Hooked) -> Optional[Tensor]:
    """The context's lengths at ``steps`` keys, or None (with one warning) when it knows no such rate."""
    try:
        lengths = ctx.lengths_at(steps)
    except ValueError:
        _warn_once(rec, "unknown rate", f"no lengths are known at its {steps} keys (known at "
                   f"{', '.join(map(str, ctx.known_steps())) or 'none'})", deeper=1)
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,):
        _warn_once(rec, "batch", f"the padding holds {lengths.numel()} sequences, its input {batch}", deeper=1)
        return None
    if host_readable(lengths) and lengths.numel() and int(lengths.max()) > steps:
        _warn_once(rec, "unknown rate", f"lengths up to {int(lengths.max())} but only {steps} keys (the "
                   f"number of keys matches another rate)", deeper=1)
        return None
    return lengths


def _no_padding(lengths: Tensor, steps: int, rec: _Hooked) -> bool:
    """Whether every sequence fills all ``steps`` keys (read only where that costs no
    device sync): the model's mask, or none, is then already right — and SDPA
    without a mask keeps its fastest kernels."""
    if not host_readable(lengths) or not bool((lengths >= steps).all()):
        return False
    rec.last = "masked"
    return True


def _host_keep(ctx, lengths: tuple, steps: int, batch: int, device, rec: _Hooked) -> Optional[Tensor]:
    """:func:`_lengths`, :func:`_no_padding` and :func:`key_mask` for host lengths (a tuple
    of Python ints, :meth:`~seqnorm.masks.PaddingContext.host_lengths_at`): the same checks
    and warnings in Python, and the ``(B, steps)`` key mask on ``device`` made once per
    rate (:meth:`~seqnorm.masks.PaddingContext.at_rate`: a model's attention modules at one
    rate share it, and a kept context's next call makes none); None where those give None."""
    if len(lengths) != batch:
        _warn_once(rec, "batch", f"the padding holds {len(lengths)} sequences, its input {batch}", deeper=1)
        return None
    top = max(lengths, default=0)
    if top > steps:
        _warn_once(rec, "unknown rate", f"lengths up to {top} but only {steps} keys (the "
                   f"number of keys matches another rate)", deeper=1)
        return None
    if all(n >= steps for n in lengths):
        rec.last = "masked"
        return None
    return ctx.at_rate("keys", steps, device, lambda: _host_key_mask(ctx, lengths, steps, device))


def _host_key_mask(ctx, lengths: tuple, steps: int, device) -> Tensor:
    """:func:`key_mask` of host lengths: the negated mask of the rate where the context
    has it (:meth:`~seqnorm.masks.PaddingContext.host_mask_at`: ``s < L`` is ``not s ≥ L``)
    and no sequence is empty (an empty one keeps every key), one op; else made anew."""
    pad = ctx.host_mask_at(steps, device) if min(lengths) > 0 else None
    return key_mask(torch.tensor(lengths, device=device), steps) if pad is None else pad.logical_not()


def _keep(ctx, steps: int, batch: int, device, rec: _Hooked) -> Optional[Tensor]:
    """The ``(B, steps)`` key mask of the context's lengths at ``steps`` keys on ``device``
    (:func:`key_mask`), or None: no lengths fit (warned once), or no sequence is padded."""
    host = ctx.host_lengths_at(steps)
    if host is not None:
        return _host_keep(ctx, host, steps, batch, device, rec)
    lengths = _lengths(ctx, steps, batch, rec)
    if lengths is None or _no_padding(lengths, steps, rec):
        return None
    return key_mask(lengths.to(device), steps)


@functools.lru_cache(maxsize=None)
def _mask_use(cls) -> Optional[str]:
    """How a module class uses its ``attention_mask``, read from its forward's source:
    ``"bool"`` — fills its scores at ``~attention_mask`` (Parakeet, LASR), so it takes
    bool under any implementation; ``"keys"`` — makes it torch's ``key_padding_mask``
    (WavLM), so it takes ``(B, S)``; ``"interface"`` — hands it to HF's attention
    interface, which takes what HF's mask utilities make for the implementation;
    None — a use seqnorm does not follow."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    if "attention_mask.logical_not()" in src or "~attention_mask" in src:
        return "bool"
    if "key_padding_mask = attention_mask" in src:
        return "keys"
    if "attention_interface" in src or "ALL_ATTENTION_FUNCTIONS" in src:
        return "interface"
    return None


def _implementation(module: nn.Module) -> Optional[str]:
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


def _new_mask_style(module: nn.Module, use: Optional[str]) -> Optional[str]:
    """The mask format a module called without one takes (SDPA: bool, eager: additive
    float), or None where seqnorm cannot tell (flash's unpadded masks, flex's
    BlockMask, a use of the mask it does not follow); ``use`` is :func:`_mask_use` of
    its class, read when the hook is made (reading source inside a call would break
    a ``torch.compile`` graph)."""
    if use != "interface":
        return use
    return {"sdpa": "bool", "eager": "float"}.get(_implementation(module) or "eager")


def _param_index(module: nn.Module, name: str) -> Optional[int]:
    """Position of ``name`` among the forward's positional parameters (after self), or None."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


def _set(args, kwargs, index, name, value):
    if name not in kwargs and index is not None and index < len(args):
        return args[:index] + (value,) + args[index + 1:], kwargs
    return args, {**kwargs, name: value}


def _hf_pre_hook(rec: _Hooked, module: nn.Module):
    mask_at = _param_index(module, "attention_mask")
    states_name = next(iter(inspect.signature(module.forward).parameters), "hidden_states")
    kv_at = {n: _param_index(module, n) for n in _KV_ARGS}
    use = _mask_use(type(module))

    def hook(mod, args, kwargs):
        ctx = current_padding()
        if ctx is None:
            return None
        x = call_argument(args, kwargs, 0, states_name)
        kv = next((v for n in _KV_ARGS if (v := call_argument(args, kwargs, kv_at[n], n)) is not None), None)
        if rec.in_decoder and kv is None:
            rec.last = "decoder self-attention (not touched)"
            return None
        keys = x if kv is None else kv
        if not (isinstance(x, Tensor) and isinstance(keys, Tensor) and x.dim() == 3 and keys.dim() == 3
                and keys.shape[0] == x.shape[0]):
            return None
        batch, steps = keys.shape[:2]
        keep = _keep(ctx, steps, batch, keys.device, rec)
        if keep is None:
            return None
        mask = call_argument(args, kwargs, mask_at, "attention_mask")
        if mask is None:
            style = _new_mask_style(mod, use)
            if style is None:
                _warn_once(rec, "no mask", f"called without a mask, and seqnorm does not know the mask format "
                           f"it takes (attn_implementation={_implementation(mod)!r})")
                return None
            causal = bool(getattr(mod, "is_causal", False)) and kv is None
            if style == "keys" or (style == "bool" and not causal):
                keep = keep.clone()     # handed to the module as it is: never the rate's shared key mask
            new = _new_mask(keep, style, x.dtype if x.is_floating_point() else torch.float32, x.shape[1], causal)
        elif isinstance(mask, Tensor) and mask.dtype == torch.bool and _new_mask_style(mod, use) == "float":
            # HF's eager attention adds its mask: a bool one (Seamless M4T v2's chunk mask) adds 0/1 and
            # masks nothing, batched or alone; turning it into a real mask would change the model itself
            _warn_once(rec, "bool under eager", "its eager attention adds the bool mask it gets (0/1), which masks "
                       "no key; attn_implementation='sdpa' masks them")
            return None
        elif isinstance(mask, Tensor):
            new = combine_key_mask(mask, keep)
            if new is None:
                _warn_once(rec, "shape", f"a mask of shape {tuple(mask.shape)} does not align with its {batch} "
                           f"sequences of {steps} keys")
                return None
        else:
            _warn_once(rec, "mask type", f"a mask of type {type(mask).__name__} cannot be combined with a key mask")
            return None
        rec.last = "masked"
        return _set(args, kwargs, mask_at, "attention_mask", new)
    return hook


def _mha_pre_hook(rec: _Hooked, module: nn.MultiheadAttention):
    def hook(mod, args, kwargs):
        ctx = current_padding()
        if ctx is None:
            return None
        key = call_argument(args, kwargs, 1, "key")
        # a nested key (nn.TransformerEncoder's fast path in eval) holds each sequence's own keys: no padded
        # key to mask, and no (B, T) shape to read
        if not isinstance(key, Tensor) or key.is_nested or key.dim() != 3:
            return None
        batch, steps = (key.shape[0], key.shape[1]) if mod.batch_first else (key.shape[1], key.shape[0])
        keep = _keep(ctx, steps, batch, key.device, rec)
        if keep is None:
            return None
        mask = call_argument(args, kwargs, 3, "key_padding_mask")
        attn_mask = call_argument(args, kwargs, 5, "attn_mask")
        if mask is None:
            # torch deprecates a bool key_padding_mask next to a float attn_mask: match its type
            if isinstance(attn_mask, Tensor) and attn_mask.is_floating_point():
                new = torch.zeros(keep.shape, dtype=attn_mask.dtype, device=key.device).masked_fill(
                    ~keep, torch.finfo(attn_mask.dtype).min)
            else:
                new = ~keep
        else:
            new = combine_key_mask(mask, keep, padding_true=True)
            if new is None:
                _warn_once(rec, "shape", f"a key_padding_mask of shape {tuple(mask.shape)} does not align "
                           f"with its {batch} sequences of {steps} keys")
                return None
        rec.last = "masked"
        return _set(args, kwargs, 3, "key_padding_mask", new)
    return hook


# ---------------------------------------------------------------------------
# Finding attention modules
# ---------------------------------------------------------------------------


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def _takes_mask(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(n in params for n in _MASK_ARGS)


def _own_mask_arg(module: nn.Module) -> Optional[str]:
    """The name of a padding argument seqnorm does not fill (``padding_mask``, True = padding: the
    caller's own convention), or None."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in ("padding_mask", "key_padding_mask", "mask", "attn_mask") if n in params), None)


#: forward parameters whose values are token ids: a module that takes one first is a text decoder
TOKEN_INPUTS = ("input_ids", "decoder_input_ids", "token_ids")


def is_text_decoder(module: nn.Module) -> bool:
    """Whether ``module``'s steps are text tokens, by its role, not its name: its forward
    takes token ids as its main (first) input, or it embeds tokens itself (an
    ``embed_tokens`` embedding, Hugging Face's name for a decoder's token table). A
    codec's audio decoder (DAC, EnCodec, Mimi), whose input is frames at the encoder's
    rate, is not one: it is a time stack, followed like the encoder."""
    if next(module.children(), None) is None:      # a leaf (a positional table indexed by ids): no layers to skip
        return False
    if isinstance(getattr(module, "embed_tokens", None), nn.Embedding):
        return True
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] in TOKEN_INPUTS


def decoder_paths(model: nn.Module) -> List[str]:
    """Module paths of the text decoders inside ``model`` (:func:`is_text_decoder`; the
    model itself is never one: it is what make_padding_safe was given), outermost only."""
    paths: List[str] = []
    for n, m in model.named_modules():
        if n and not in_decoder(n, paths) and is_text_decoder(m):
            paths.append(n)
    return paths


def in_decoder(name: str, decoders: List[str]) -> bool:
    """Whether the module path ``name`` is one of ``decoders`` or inside one."""
    return any(name == d or name.startswith(d + ".") for d in decoders)


def hook_attention(model: nn.Module) -> Dict[str, str]:
    """Give every attention module of ``model`` a key-mask pre-hook (see the module
    docstring); calling it again adds none. Returns ``{name: what}`` for each
    attention module: ``"hooked"``, or why not."""
    decoders = decoder_paths(model)
    candidates = [(n or type(m).__name__, m) for n, m in model.named_modules() if _is_attention(m)]
    names = {m: n for n, m in candidates}
    out = {}
    for name, m in candidates:
        if isinstance(m, nn.MultiheadAttention):
            kind = "mha"
        elif _takes_mask(m):
            # the innermost module that takes the mask computes the attention (BertAttention → BertSelfAttention)
            if any(c is not m and c in names and _takes_mask(c) for c in m.modules()):
                continue
            kind = "hf"
        else:
            if any(c is not m and c in names for c in m.modules()):
                continue          # a wrapper: its inner attention module is the one that counts
            kind = "none"
        rec = _records.get(m)
        if rec is None or rec.handle is None:
            inside = in_decoder(name, decoders)
            rec = _Hooked(name, kind, inside)
            if kind == "none":
                own = _own_mask_arg(m)
                rec.reason = (f"it takes its padding as {own!r}, which the caller passes" if own else
                              "its forward takes no mask (a mask, if any, is built inside one call)")
            else:
                pre = _mha_pre_hook(rec, m) if kind == "mha" else _hf_pre_hook(rec, m)
                rec.handle = m.register_forward_pre_hook(pre, with_kwargs=True)
            _records[m] = rec
        out[name] = "hooked" if rec.handle is not None else rec.reason
    return out


def unhook_attention(model: nn.Module) -> None:
    """Remove :func:`hook_attention`'s hooks from ``model``; its attention masks are the model's own again."""
    for m in model.modules():
        rec = _records.pop(m, None)
        if rec is not None and rec.handle is not None:
            rec.handle.remove()


def attention_report(model: nn.Module, first_leak: Optional[str] = None, leaking=()) -> List[str]:
    """Lines for the audit's notes on ``model``'s attention modules: which got key
    masks from the padding, which were left alone and why, and — when the
    audit's first leak (``first_leak``) is in an attention module — which of
    them leak (``leaking``: the names of the modules the audit found leaking)."""
    groups: Dict[str, List[str]] = {}
    attention = {n for n, m in model.named_modules() if _is_attention(m)}
    leaks_here = first_leak is not None and any(first_leak == a or first_leak.startswith(a + ".")
                                                for a in attention)
    leaking = set(leaking) & attention if leaks_here else set()
    for name, m in model.named_modules():
        rec = _records.get(m)
        if rec is None:
            continue
        name = name or rec.name          # names as in the model audited (hooks may have come from a parent)
        if rec.handle is None:
            what = f"not fixed: {rec.reason}"
        elif rec.last == "masked":
            what = "keys past each sequence's end masked by make_padding_safe"
        elif rec.last:
            what = f"left as the model made it ({rec.last})"
        else:
            what = "hooked, not called under seqnorm.padding"
        groups.setdefault(what, []).append(name)
    lines = []
    for what, names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        still = [n for n in names if n in leaking]
        tail = f" — yet still leaking: {', '.join(still[:3])}" if still and "masked" in what else ""
        lines.append(f"attention over padded keys: {what}: {shown}{tail}")
    if not groups and leaking:
        lines.append("attention over padded keys: not fixed (make_padding_safe(model) masks attention keys past "
                     "each sequence's end; it was not applied, or with attention=False)")
    return lines
