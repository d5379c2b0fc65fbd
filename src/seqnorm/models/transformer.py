r"""The note's Transformer sub-layer, stacked into a small encoder.

One sub-layer, as the note writes it for a padded sentence: self-attention
whose padded *columns* get weight 0 (the note's ``+ 0`` terms), a linear map,
the residual Add, then the norm; the feed-forward sub-layer the same way.
Post-norm: ``x = norm(x + f(x))``; pre-norm: ``x = x + f(norm(x))``.

The norm is chosen by its :mod:`seqnorm.kinds` name (:data:`NORMS`), all from
seqnorm's own modules: ``"layer"``, ``"rms"``, ``"pooled_batch"`` (SeqBatchNorm
*without* the mask: each feature over every position, padding included — the
BatchNorm the note describes, and torch's BatchNorm1d; formerly ``"batch"``),
``"masked_batch"`` (SeqBatchNorm over real tokens only), ``"power"`` (PowerNorm
with the mask) and ``"none"``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import kinds

NORMS = ("layer", "rms", "pooled_batch", "masked_batch", "power", "none")


class Norm(nn.Module):
    """A named normalization that knows whether it may see the padding mask."""

    def __init__(self, name: str, d_model: int):
        super().__init__()
        self.name = kinds.resolve(name, NORMS, "models", "norm")
        self.masked = kinds.kind(self.name).masked
        self.norm = kinds.build(self.name, d_model, **({"eps": 1e-6} if self.name == "rms" else {}))

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        if self.masked is None:    # no norm: the padded rows still read 0
            return x.masked_fill(padding_mask.unsqueeze(-1), 0)
        if not self.masked:        # the note's BN: padding pooled like any token
            return self.norm(x)
        return self.norm(x, padding_mask=padding_mask)


class MaskedSelfAttention(nn.Module):
    r"""Multi-head self-attention; padded keys get weight exactly 0.

    ``A = softmax(QKᵀ/√d_k + M)`` with ``M = −∞`` at padded columns, so that
    row ``i`` of the output is ``Σ_j a_ij V_j`` over real tokens ``j`` only.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.h, self.dk = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.dk).permute(2, 0, 3, 1, 4)   # 3 × (B,H,T,dk)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dk)                         # B,H,T,T
        scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-padding row attends to nothing
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)                              # B,T,D
        return self.out(out)


class EncoderLayer(nn.Module):
    """Attention sub-layer then feed-forward sub-layer, each with Add & Norm."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm: str, prenorm: bool, dropout: float = 0.0):
        super().__init__()
        self.attn = MaskedSelfAttention(d_model, n_heads)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.norm1, self.norm2 = Norm(norm, d_model), Norm(norm, d_model)
        self.drop = nn.Dropout(dropout)
        self.prenorm = prenorm

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        if self.prenorm:
            x = x + self.drop(self.attn(self.norm1(x, padding_mask), padding_mask))
            return x + self.drop(self.ff(self.norm2(x, padding_mask)))
        x = self.norm1(x + self.drop(self.attn(x, padding_mask)), padding_mask)
        return self.norm2(x + self.drop(self.ff(x)), padding_mask)


class Encoder(nn.Module):
    """Token + position embeddings, ``n_layers`` encoder layers, and a head.

    Args:
        vocab_size, d_model, n_heads, d_ff, n_layers: the usual sizes.
        norm: one of :data:`NORMS`.
        prenorm: pre-norm (with a final norm) instead of post-norm.
        num_classes: output size of the head.
        task: ``"classify"`` (mean over real tokens, then a linear head: ``(B, C)``)
            or ``"tokens"`` (a prediction per token: ``(B, T, C)``).
        max_len: longest sequence (position embeddings).
        dropout: Default 0.

    Example::

        >>> enc = Encoder(vocab_size=10, d_model=16, n_heads=2, d_ff=32, n_layers=1, norm="masked_batch",
        ...               num_classes=3)
        >>> tokens = torch.tensor([[1, 2, 3], [4, 5, 0]])
        >>> enc(tokens, torch.tensor([[False, False, False], [False, False, True]])).shape
        torch.Size([2, 3])
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4, d_ff: int = 128, n_layers: int = 2,
                 norm: str = "layer", prenorm: bool = False, num_classes: int = 2, task: str = "classify",
                 max_len: int = 512, dropout: float = 0.0):
        super().__init__()
        if task not in ("classify", "tokens"):
            raise ValueError(f"task must be 'classify' or 'tokens', got {task!r}")
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff, norm, prenorm, dropout)
                                    for _ in range(n_layers))
        self.final = Norm(norm, d_model) if prenorm else None
        self.head = nn.Linear(d_model, num_classes)
        self.task = task

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> Tensor:
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0)   # the note's padded row starts at 0
        for layer in self.layers:
            x = layer(x, padding_mask)
        if self.final is not None:
            x = self.final(x, padding_mask)
        if self.task == "tokens":
            return self.head(x)
        real = (~padding_mask).unsqueeze(-1).to(x.dtype)
        pooled = (x * real).sum(1) / real.sum(1).clamp_min(1)
        return self.head(pooled)
