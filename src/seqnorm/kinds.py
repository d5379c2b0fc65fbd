"""The one table of norm kinds: every name a norm goes by in seqnorm.

``convert`` targets, the note's encoder (``models``), ``seqnorm explain``,
``seqnorm compare``, ``seqnorm bench`` and the tests all read this table, and
each name has one meaning:

================  ======================  =======  ================================================
name              module                  masked   what a statistic covers
================  ======================  =======  ================================================
``layer``         LayerNorm               yes      each token over its own features
``rms``           RMSNorm                 yes      each token's root mean square (no mean)
``add_layer``     AddNorm(norm="layer")   yes      LayerNorm of ``x + residual``, one op
``add_rms``       AddNorm(norm="rms")     yes      RMSNorm of ``x + residual``, one op
``masked_batch``  SeqBatchNorm            yes      each feature over the batch's real tokens
``pooled_batch``  SeqBatchNorm            no       each feature over every position, padding
                                                   included (the note's BatchNorm; torch's
                                                   BatchNorm1d)
``power``         PowerNorm               yes      each feature's running quadratic mean ψ²
``sync_batch``    SyncSeqBatchNorm        yes      ``masked_batch`` over every process's tokens
``sync_power``    SyncPowerNorm           yes      ``power`` with ψ², ν over every process
``group``         GroupNorm               yes      each sequence's group of channels over its real
                                                   time steps (channels first, as torch's)
``instance``      InstanceNorm1d          yes      each sequence's channel over its real time steps
``none``          Identity                —        no normalization
================  ======================  =======  ================================================

"masked" means the module receives the padding mask: padded tokens enter no
statistic and come out as 0. Older spellings keep working where they were
accepted (:data:`ALIASES`): ``convert(to="batch")`` builds the SeqBatchNorm
that ``masked_batch`` names, while the encoder's (and ``seqnorm compare``'s)
``"batch"`` was the note's pad-pooling BatchNorm, now ``pooled_batch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn

__all__ = ["Kind", "KINDS", "ALIASES", "kind", "resolve", "build"]


@dataclass(frozen=True)
class Kind:
    name: str
    module: str               #: the seqnorm (or torch.nn) class that computes it
    masked: Optional[bool]    #: whether it sees the padding mask (None: no statistic at all)
    description: str
    op: Optional[str] = None  #: the ``seqnorm.functional`` op that computes it (bench, tests)
    feature_dim: bool = False  #: statistics per feature (BatchNorm-like) rather than per token
    channels_first: bool = False  #: takes torch's channels-first (B, C, T) and statistics per sequence


KINDS: Dict[str, Kind] = {k.name: k for k in (
    Kind("layer", "LayerNorm", True, "LayerNorm: each token (row) is normalized over its own features",
         "layer_norm"),
    Kind("rms", "RMSNorm", True, "RMSNorm: each token is divided by the root mean square of its features "
         "(no mean)", "rms_norm"),
    Kind("add_layer", "AddNorm", True, "Add & LayerNorm: LayerNorm of x + residual in one op", "add_layer_norm"),
    Kind("add_rms", "AddNorm", True, "Add & RMSNorm: RMSNorm of x + residual in one op", "add_rms_norm"),
    Kind("masked_batch", "SeqBatchNorm", True, "BatchNorm: each feature (column) is normalized over all real "
         "tokens of the batch", "seq_batch_norm", True),
    Kind("pooled_batch", "SeqBatchNorm", False, "BatchNorm as the note describes it: each feature pools every "
         "position, padding included", None, True),
    Kind("power", "PowerNorm", True, "PowerNorm: each feature is divided by its quadratic mean ψ over real "
         "tokens (no mean)", "power_norm", True),
    Kind("sync_batch", "SyncSeqBatchNorm", True, "masked BatchNorm over the real tokens of every process",
         None, True),
    Kind("sync_power", "SyncPowerNorm", True, "PowerNorm whose ψ² and ν see every process's real tokens",
         None, True),
    Kind("group", "GroupNorm", True, "GroupNorm: each sequence's group of channels is normalized over its "
         "real time steps", "group_norm", channels_first=True),
    Kind("instance", "InstanceNorm1d", True, "InstanceNorm: each sequence's channel is normalized over its "
         "real time steps", "instance_norm", channels_first=True),
    Kind("none", "Identity", None, "no normalization"),
)}

#: older spellings, per place that accepted them → the kind they meant there
ALIASES: Dict[str, Dict[str, str]] = {
    "convert": {"batch": "masked_batch"},
    "models": {"batch": "pooled_batch"},
    "explain": {"batch": "masked_batch"},
}


def kind(name: str) -> Kind:
    return KINDS[name]


def resolve(name: str, allowed: Tuple[str, ...], where: str, arg: str) -> str:
    """The kind ``name`` means in ``where`` (an alias resolved); a ValueError
    naming ``arg`` and the choices when it is not one of ``allowed``."""
    canonical = ALIASES.get(where, {}).get(name, name) if isinstance(name, str) else name
    if canonical not in allowed:
        raise ValueError(f"{arg} must be one of {', '.join(allowed)}, got {name!r}")
    return canonical


def build(name: str, d: int, **kwargs) -> nn.Module:
    """A fresh module of kind ``name`` over ``d`` features (``kwargs`` go to its constructor)."""
    from . import distributed, modules

    k = KINDS[name]
    if k.module == "Identity":
        return nn.Identity()
    if k.module == "AddNorm":
        kwargs.setdefault("norm", name[len("add_"):])
    cls = getattr(modules, k.module, None) or getattr(distributed, k.module)
    if name == "group":   # GroupNorm(num_groups, num_channels), as torch's
        return cls(kwargs.pop("num_groups", 1), d, **kwargs)
    return cls(d, **kwargs)
