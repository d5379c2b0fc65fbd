"""The note's Transformer encoder, with a pluggable normalization."""

from .transformer import NORMS, Encoder, EncoderLayer, MaskedSelfAttention, Norm

__all__ = ["NORMS", "Encoder", "EncoderLayer", "MaskedSelfAttention", "Norm"]
