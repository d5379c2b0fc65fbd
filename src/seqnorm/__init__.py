"""seqnorm: padding-aware normalization layers for sequence models.

LayerNorm, RMSNorm, the fused residual Add & Norm, BatchNorm over real tokens
(SeqBatchNorm), PowerNorm, GroupNorm and InstanceNorm1d over real time steps,
torch-compatible, with a float64 reference; make_padding_safe for models whose
source you do not edit.
"""

from . import distributed, functional, reference
from .distributed import SyncPowerNorm, SyncSeqBatchNorm
from .convert import ConversionWarning, convert
from .masks import lengths_to_padding_mask, padding
from .padding_safe import make_padding_safe
from .audit import AuditReport, audit
from .modules import AddNorm, GroupNorm, InstanceNorm1d, LayerNorm, PowerNorm, RMSNorm, SeqBatchNorm
from .backends import available_backends, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "AddNorm",
    "SeqBatchNorm",
    "PowerNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "SyncSeqBatchNorm",
    "SyncPowerNorm",
    "functional",
    "reference",
    "distributed",
    "lengths_to_padding_mask",
    "padding",
    "convert",
    "make_padding_safe",
    "audit",
    "AuditReport",
    "ConversionWarning",
    "set_backend",
    "get_backend",
    "use_backend",
    "available_backends",
    "__version__",
]
