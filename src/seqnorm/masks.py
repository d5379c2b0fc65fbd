"""The one padding path: ``padding_mask`` or ``lengths`` → one validated bool mask.

Every norm in seqnorm takes its padding through :func:`resolve_padding`, so
every norm validates it the same way and no norm ever broadcasts a mask of the
wrong shape.

Convention: ``True`` marks **padding**, as torch.nn.Transformer's
``src_key_padding_mask`` does. ``lengths[b]`` is the number of real tokens at
the start of sequence ``b``; the rest is padding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["resolve_padding", "lengths_to_padding_mask", "shape_str"]


def shape_str(shape: Sequence[int]) -> str:
    """A shape as Python writes a tuple: ``(2, 3)``, ``(3,)``, ``()``."""
    return str(tuple(int(s) for s in shape))


def lengths_to_padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(B,)`` lengths → ``(B, max_len)`` bool mask, True at positions ``t >= lengths[b]``.

    Example:
        >>> lengths_to_padding_mask(torch.tensor([2, 0, 3]), 3)
        tensor([[False, False,  True],
                [ True,  True,  True],
                [False, False, False]])
    """
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor of shape (B,), got dtype {lengths.dtype}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (B,), got {shape_str(lengths.shape)}")
    if lengths.numel() > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > max_len:
            raise ValueError(
                f"lengths must lie in [0, {max_len}] (the sequence length T), got values in [{lo}, {hi}]"
            )
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(1)


def resolve_padding(
    expected_shape: Sequence[int],
    device: torch.device,
    padding_mask: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    what: str = "(B, T)",
) -> Optional[torch.Tensor]:
    """Validate ``padding_mask`` / ``lengths`` against the token shape of the input.

    Args:
        expected_shape: the shape of the token grid, i.e. the input's shape
            without the normalized (feature) dimensions, e.g. ``(B, T)``.
        device: the input's device; the mask must live there.
        padding_mask: bool tensor of exactly ``expected_shape``, True at padding.
        lengths: integer tensor ``(B,)``; only for a 2-D token grid ``(B, T)``.
        what: how the expected shape is named in error messages.

    Returns:
        ``None`` when no padding was given, else a bool tensor of
        ``expected_shape`` on ``device``.

    Raises:
        TypeError: the mask is not a bool tensor, or lengths not integer.
        ValueError: shapes or devices do not match, lengths out of range, or
            both padding_mask and lengths were given.
    """
    expected_shape = tuple(int(s) for s in expected_shape)
    if padding_mask is not None and lengths is not None:
        raise ValueError("pass either padding_mask or lengths, not both")
    if lengths is not None:
        if len(expected_shape) != 2:
            raise ValueError(
                f"lengths describes a (B, T) token grid, but the input's token shape is "
                f"{shape_str(expected_shape)}; pass padding_mask of that shape instead"
            )
        if isinstance(lengths, torch.Tensor) and lengths.shape != (expected_shape[0],):
            raise ValueError(
                f"lengths must have shape (B,) = ({expected_shape[0]},), got {shape_str(lengths.shape)}"
            )
        mask = lengths_to_padding_mask(lengths, expected_shape[1])
        if mask.shape[0] != expected_shape[0]:
            raise ValueError(
                f"lengths must have shape (B,) = ({expected_shape[0]},), got {shape_str(mask.shape[:1])}"
            )
        return mask.to(device)
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, torch.Tensor):
        raise TypeError(
            f"padding_mask must be a bool torch.Tensor of shape {what} = {shape_str(expected_shape)}, "
            f"got {type(padding_mask).__name__}"
        )
    if padding_mask.dtype != torch.bool:
        raise TypeError(
            f"padding_mask must have dtype torch.bool (True = padding) and shape {what} = "
            f"{shape_str(expected_shape)}, got dtype {padding_mask.dtype}"
        )
    if tuple(padding_mask.shape) != expected_shape:
        raise ValueError(
            f"padding_mask must have shape {what} = {shape_str(expected_shape)} "
            f"(one entry per token), got {shape_str(padding_mask.shape)}"
        )
    if padding_mask.device != torch.device(device):
        raise ValueError(
            f"padding_mask is on {padding_mask.device} but the input is on {device}"
        )
    return padding_mask
