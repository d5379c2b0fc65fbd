"""``seqnorm.convert``: swap the normalization layers of an existing model.

In the spirit of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: walk the
model, replace every ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm``,
``torch.nn.BatchNorm1d`` and seqnorm norm by the target, and carry parameters
and buffers over where the maths allows. Where it does not, a
:class:`ConversionWarning` says what was dropped or approximated:

=====================  ==============================================================
from → to              what carries over
=====================  ==============================================================
LN → layer             everything (outputs bit-identical)
LN → rms               ``weight``; a non-zero ``bias`` is dropped (RMSNorm has none): warns
RMS → layer            ``weight``; ``bias`` starts at 0
RMS(offset, casting)   → rms: both carried; → any other target: ``offset + γ`` is the
                       ``weight`` copied (exact), a ``"llama"`` casting dropped: warns
LN/RMS → masked_batch, ``weight``/``bias`` (same per-feature role); running statistics
sync_batch, power,     start fresh (a LayerNorm has none); 1-D ``normalized_shape`` only
sync_power
BN → masked_batch,     ``weight``, ``bias``, ``running_mean``, ``running_var``,
sync_batch             ``num_batches_tracked``
BN → power,            ``weight``, ``bias``; ``running_phi = running_var + running_mean²``
sync_power             (the quadratic mean E[x²] = Var[x] + E[x]²)
power → power,         everything (``running_phi``, ``running_nu``, ``num_batches_tracked``)
sync_power
power → masked_batch   ``weight``, ``bias``; ``running_var = running_phi``, ``running_mean = 0``:
                       warns (PowerNorm keeps no mean)
BN/power → layer, rms  ``weight``, ``bias``; running statistics dropped: warns
LM RMSNorm → rms       the module's own ``weight`` Parameter and eps, and its family's
                       ``offset`` / ``casting`` (table below); checked on a probe input
                       first (a mismatch keeps the original: warns)
LM RMSNorm → other     nothing: left as it is (warns)
=====================  ==============================================================

**Language models' own RMSNorm classes** (:mod:`seqnorm.llm`, the table in one place:
``seqnorm.llm.FAMILIES``, 176 classes of ``transformers`` 5.25):

=========================================  ======  ==========  ====================
family                                     offset  casting     eps attribute
=========================================  ======  ==========  ====================
Llama, Mistral, Qwen2, Qwen3, Phi3, …      0       ``llama``   ``variance_epsilon``
Gemma, Gemma2, …  (zero-centred ``γ``)     1       ``float32`` ``eps``
Olmo2, …                                   0       ``float32`` ``variance_epsilon``
=========================================  ======  ==========  ====================

A converted language model reads its ``attention_mask`` on each call and opens the
padding context (:func:`seqnorm.llm.hook_attention_mask`): padded tokens' norms give
exactly 0. Any other class named ``…Norm`` with a ``weight`` is left alone and named once.

Target names are :mod:`seqnorm.kinds`'s; ``"batch"`` still means ``"masked_batch"``.

A ``torch.nn.BatchNorm1d`` becomes a module with ``channels_first=True``: it
takes BatchNorm1d's own ``(N, C, L)`` (or ``(N, C)``), so a BatchNorm1d inside
a conv stack converts without touching the model's code; its padding mask is
``(N, L)``. seqnorm's own feature-wise norms keep their layout.

Padding reaches the converted norms through the :func:`seqnorm.padding`
context manager (or explicit ``padding_mask`` arguments in your own code).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from . import kinds, llm
from .rms_variants import shifted_weight
from .distributed import SyncPowerNorm, SyncSeqBatchNorm
from .modules import LayerNorm, PowerNorm, RMSNorm, SeqBatchNorm, FeaturewiseNorm

__all__ = ["convert", "ConversionWarning", "TARGETS"]

#: the kinds (:mod:`seqnorm.kinds`) a model converts to; ``"batch"`` is accepted for ``"masked_batch"``
TARGETS = ("layer", "rms", "masked_batch", "sync_batch", "power", "sync_power")


class ConversionWarning(UserWarning):
    """A parameter or statistic could not be carried over exactly."""


def _kind(m: nn.Module) -> Optional[str]:
    """The kind of a norm to convert from: what its parameters and statistics mean."""
    if isinstance(m, (nn.LayerNorm,)):
        return "layer"
    if isinstance(m, nn.RMSNorm):
        return "rms"
    if isinstance(m, PowerNorm):
        return "power"
    if isinstance(m, SeqBatchNorm):
        return "masked_batch"
    if isinstance(m, nn.BatchNorm1d):
        return "pooled_batch"
    return None


def _features(m: nn.Module, name: str) -> int:
    if hasattr(m, "num_features"):
        return m.num_features
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"{name}: cannot convert a norm over normalized_shape={list(shape)} to a "
                         f"feature-wise norm; only 1-D normalized_shape has per-feature statistics")
    return shape[0]


def _check_eps(eps) -> None:
    """``eps`` is None (each source module's) or a finite number ≥ 0: else TypeError / ValueError
    here, not a norm that computes NaN or fails later inside the model (or a probe that keeps
    every language-model norm)."""
    if eps is None:
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float or None, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def _warn(name: str, msg: str) -> None:
    warnings.warn(f"seqnorm.convert: {name}: {msg}", ConversionWarning, stacklevel=4)


def _rms_variant(m: nn.Module, name: str, to: str):
    """``(offset, casting)`` a seqnorm RMSNorm carries to an ``"rms"`` target: its own. Another
    target has neither: the offset is folded into the weight copied (``offset + γ``, the scale
    the norm applied: exact), and a ``"llama"`` casting is dropped (warns: in 16 bits the new norm
    rounds once, after ``γ``). Any other norm: ``(0.0, "float32")``."""
    offset, casting = (getattr(m, "offset", 0.0), getattr(m, "casting", "float32")) if isinstance(
        m, RMSNorm) else (0.0, "float32")
    if to != "rms" and casting != "float32":
        _warn(name, f"casting={casting!r} is RMSNorm's: the {to!r} norm computes in float32 and rounds once")
    return offset, casting


def _copy(dst: Optional[torch.Tensor], src: Optional[torch.Tensor]) -> None:
    if dst is not None and src is not None:
        with torch.no_grad():
            dst.copy_(src.reshape(dst.shape))


def _build(m: nn.Module, to: str, name: str, eps, momentum, batch_first, process_group) -> nn.Module:
    kind = _kind(m)
    factory = dict(device=(m.weight.device if getattr(m, "weight", None) is not None else None),
                   dtype=(m.weight.dtype if getattr(m, "weight", None) is not None else None))
    weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
    affine = weight is not None
    src_eps = m.eps if m.eps is not None else None
    offset, casting = _rms_variant(m, name, to)
    if to != "rms" and weight is not None and offset:    # no offset there: its weight is the whole scale
        weight = shifted_weight(weight.detach(), offset)

    if to in ("layer", "rms"):
        shape = tuple(m.normalized_shape) if kind in ("layer", "rms") else (m.num_features,)
        if to == "layer":
            has_bias = bias is not None or kind == "rms"
            new = LayerNorm(shape, eps=eps if eps is not None else (src_eps if src_eps is not None else 1e-5),
                            elementwise_affine=affine, bias=has_bias and affine, **factory)
            _copy(new.bias, bias)
        else:
            new = RMSNorm(shape, eps=eps if eps is not None else (src_eps if kind in ("layer", "rms") else None),
                          elementwise_affine=affine, offset=offset, casting=casting, **factory)
            if bias is not None and bool(torch.any(bias != 0)):
                _warn(name, "RMSNorm has no bias: the non-zero bias was dropped")
        _copy(new.weight, weight)
        if kinds.kind(kind).feature_dim:
            _warn(name, "running statistics dropped: a row-wise norm uses each token's own statistics")
        return new

    d = _features(m, name)
    common = dict(eps=eps if eps is not None else (src_eps if src_eps is not None else 1e-5),
                  affine=affine, bias=bias is not None or not affine, batch_first=batch_first, **factory)
    if momentum is not None:
        common["momentum"] = momentum
    elif isinstance(m, (nn.BatchNorm1d, FeaturewiseNorm)):
        common["momentum"] = m.momentum
    channels_first = m.channels_first if isinstance(m, FeaturewiseNorm) else isinstance(m, nn.BatchNorm1d)
    if channels_first:                              # BatchNorm1d's own (N, C, L): the model's code stays
        common.update(batch_first=True, channels_first=True)
    if to == "power":
        new = PowerNorm(d, **common)
    elif to == "sync_power":
        new = SyncPowerNorm(d, process_group=process_group, **common)
    else:
        track = getattr(m, "track_running_stats", True)
        cls = SyncSeqBatchNorm if to == "sync_batch" else SeqBatchNorm
        extra = dict(process_group=process_group) if to == "sync_batch" else {}
        new = cls(d, track_running_stats=track, **common, **extra)
    _copy(new.weight, weight)
    _copy(new.bias, bias)
    if kind in ("masked_batch", "pooled_batch") and getattr(m, "running_mean", None) is not None:
        if to in ("power", "sync_power"):
            _copy(new.running_phi, m.running_var + m.running_mean ** 2)
        elif new.running_mean is not None:
            _copy(new.running_mean, m.running_mean)
            _copy(new.running_var, m.running_var)
            _copy(new.num_batches_tracked, m.num_batches_tracked)
    elif kind == "power":
        if to in ("power", "sync_power"):
            _copy(new.running_phi, m.running_phi)
            _copy(new.running_nu, m.running_nu)
            _copy(new.num_batches_tracked, m.num_batches_tracked)
        elif new.running_mean is not None:
            _copy(new.running_var, m.running_phi)
            _warn(name, "PowerNorm keeps no running mean: running_mean starts at 0 and running_var takes "
                        "the quadratic mean running_phi (exact only for zero-mean features)")
    return new


def convert(model: nn.Module, to: str, *, eps: Optional[float] = None, momentum: Optional[float] = None,
            batch_first: bool = True, process_group=None) -> nn.Module:
    """Replace every LayerNorm / RMSNorm / BatchNorm1d / seqnorm norm in ``model`` by ``to``,
    and (``to="rms"``) every language model's own RMSNorm class (:mod:`seqnorm.llm`).

    Args:
        model: any ``nn.Module`` (converted in place; also returned). A norm
            passed as ``model`` itself is returned converted.
        to: ``"layer"``, ``"rms"``, ``"masked_batch"`` (SeqBatchNorm; also
            spelled ``"batch"``), ``"sync_batch"``
            (SyncSeqBatchNorm), ``"power"`` (PowerNorm) or ``"sync_power"``
            (SyncPowerNorm).
        eps: the new modules' eps. Default: each source module's eps.
        momentum: for batch/power targets. Default: the source's, else 0.1.
        batch_first: for batch/power targets built from a LayerNorm/RMSNorm, the
            layout of the activations they will see (``(B, T, D)`` if True,
            ``(T, B, D)`` if False); a BatchNorm1d's replacement takes its ``(N, C, L)``.
        process_group: for ``"sync_batch"`` and ``"sync_power"``.

    Returns:
        The converted model. Parameters are new ``nn.Parameter`` objects
        (except a language model's own RMSNorm's, which keeps its ``weight``):
        build the optimizer after converting.

    Raises:
        ValueError / TypeError: an unknown ``to``; an ``eps`` that is not None or a
        finite number ≥ 0.

    Example::

        >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        >>> layer = convert(layer, "rms")
        >>> type(layer.norm1).__name__
        'RMSNorm'
    """
    to = kinds.resolve(to, TARGETS, "convert", "to")
    _check_eps(eps)
    if _kind(model) is not None:
        return _build(model, to, type(model).__name__, eps, momentum, batch_first, process_group)
    if llm.family_of(model) is not None:
        return llm.convert_family_norms(model, to, eps, _warn)
    for name, child in list(model.named_modules()):
        for child_name, grandchild in list(child.named_children()):
            if _kind(grandchild) is None:
                continue
            full = f"{name}.{child_name}" if name else child_name
            new = _build(grandchild, to, full, eps, momentum, batch_first, process_group)
            new.train(grandchild.training)
            setattr(child, child_name, new)
        if isinstance(child, nn.TransformerEncoderLayer) and to != "layer":
            # torch's fused inference fast path computes LayerNorm itself from the
            # norms' weights; with another norm it would silently compute the wrong thing.
            child.activation_relu_or_gelu = 0
    # the language models' own RMSNorm classes (seqnorm.llm.FAMILIES), each checked on a probe,
    # and the hook that reads their attention_mask; unknown norm-like classes named once
    return llm.convert_family_norms(model, to, eps, _warn)
