"""Argument checks and dtype rules shared by every norm (functional, modules,
distributed): each error names the argument and the shape it expects."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .masks import shape_str

__all__ = ["check_input", "check_param", "normalized_shape", "split_rowwise", "check_featurewise_input",
           "check_num_features", "compute_dtype", "cast", "LOW_PRECISION"]

Tensor = torch.Tensor
ShapeLike = Union[int, Sequence[int], torch.Size]

#: computed in float32, rounded once at the output
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_input(x, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")


def normalized_shape(shape: ShapeLike) -> Tuple[int, ...]:
    """``normalized_shape`` as a tuple of ints (an int is a 1-tuple)."""
    if isinstance(shape, int):
        return (shape,)
    if isinstance(shape, str):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {shape!r}")
    try:
        return tuple(map(int, shape))
    except (TypeError, ValueError):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {shape!r}") from None


def check_param(p: Optional[Tensor], name: str, shape: Tuple[int, ...], x: Tensor) -> None:
    """``p`` is None or a tensor of exactly ``shape`` on ``x``'s device."""
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_str(shape)} or None, "
                        f"got {type(p).__name__}")
    if p.shape != shape:
        raise ValueError(f"{name} must have shape {shape_str(shape)}, got {shape_str(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but the input is on {x.device}")


def split_rowwise(x: Tensor, shape: ShapeLike, name: str = "input"):
    """Check ``x (..., *normalized_shape)``; return ``(normalized_shape, token_shape, D)``."""
    shape = normalized_shape(shape)
    k = len(shape)
    if k == 0:
        raise ValueError("normalized_shape must have at least one dimension")
    n = x.dim()
    if n < k or x.shape[n - k:] != shape:
        raise ValueError(
            f"{name} must have shape (*, {', '.join(map(str, shape))}) to match normalized_shape="
            f"{list(shape)}, got {shape_str(x.shape)}"
        )
    return shape, tuple(x.shape[: n - k]), math.prod(shape)


def check_featurewise_input(x, who: str) -> None:
    """A feature-wise norm's input: a float ``(B, T, D)`` or ``(N, D)`` tensor."""
    check_input(x)
    if x.dim() not in (2, 3):
        raise ValueError(f"{who} expects input of shape (B, T, D) or (N, D), got {x.dim()}-D input "
                         f"of shape {shape_str(x.shape)}")


def check_num_features(x: Tensor, num_features: int, who: str, channels_first: bool = False) -> None:
    """A module's ``(B, T, D)`` / ``(N, D)`` input must have ``D = num_features``
    (``channels_first``: ``(N, C, L)`` / ``(N, C)`` with ``C = num_features``)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        return
    if channels_first and x.shape[1] != num_features:
        raise ValueError(f"{who}(num_features={num_features}, channels_first=True) expects input of shape "
                         f"(N, {num_features}, L) or (N, {num_features}), got {shape_str(x.shape)}")
    if not channels_first and x.shape[-1] != num_features:
        raise ValueError(f"{who}(num_features={num_features}) expects input of shape (B, T, {num_features}) "
                         f"or (N, {num_features}), got {shape_str(x.shape)}")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32/float64 as they are."""
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)     # no call when it is (host time)
