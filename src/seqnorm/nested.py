r"""Nested jagged tensors: sequences of different lengths with no padding at all.

A ``torch.nested`` tensor of layout ``torch.jagged`` and shape ``(B, j, D)``
holds its ``B`` sequences back to back in ``values()`` ``(N, D)`` (``N`` the
total number of tokens), cut by ``offsets()`` ``(B + 1,)``. Every seqnorm norm
accepts one and computes what it computes on the padded batch with its mask,
at every real token, without materializing padding:

* row-wise norms and the batch-statistic norms (SeqBatchNorm, PowerNorm) run on
  ``values()`` — every row there is a real token;
* GroupNorm / InstanceNorm take the jagged tensor as channels-last
  ``(B, j, C)`` and reduce each sequence's segment of ``values()``
  (:func:`segment_sums`).

Autograd flows through ``values()`` and back into the jagged result.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["is_jagged", "unpack", "pack", "segment_ids", "segment_sums"]

Tensor = torch.Tensor


def is_jagged(x) -> bool:
    """Whether ``x`` is a nested tensor of layout ``torch.jagged``."""
    return isinstance(x, Tensor) and x.is_nested and x.layout == torch.jagged


def unpack(x: Tensor, who: str, padding_mask=None, lengths=None) -> Tuple[Tensor, Tensor]:
    """``(values (N, D), offsets (B + 1,))`` of a ``(B, j, D)`` jagged tensor."""
    if padding_mask is not None or lengths is not None:
        raise ValueError(f"{who}: a nested jagged input carries its own lengths; padding_mask and lengths "
                         f"must be None")
    if x.dim() != 3 or x._ragged_idx != 1:
        raise ValueError(f"{who}: a nested jagged input must have shape (B, j, D) with the ragged dimension "
                         f"second, got {x.dim()}-D input ragged at dimension {x._ragged_idx}")
    if x.lengths() is not None:
        raise ValueError(f"{who}: a nested jagged input with holes (lengths() set) is not supported; pass "
                         f"x.contiguous()")
    return x.values(), x.offsets()


def pack(values: Tensor, like: Tensor) -> Tensor:
    """``values (N, D)`` as a jagged tensor with ``like``'s sequences."""
    return torch.nested.nested_tensor_from_jagged(values, like.offsets())


def segment_ids(offsets: Tensor, total: int) -> Tensor:
    """The sequence of each of the ``total`` tokens, ``(N,)`` int64."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=offsets.device), counts,
                                   output_size=total)


def segment_sums(t: Tensor, ids: Tensor, batch: int) -> Tensor:
    """``Σ`` over each sequence's tokens of ``t (N, ...)`` → ``(B, ...)`` (an
    ``index_add``: differentiable, no host synchronization)."""
    out = t.new_zeros((batch,) + tuple(t.shape[1:]))
    return out.index_add(0, ids, t)
