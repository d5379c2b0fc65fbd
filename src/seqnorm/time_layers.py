r"""What seqnorm knows about a layer that changes or reads across time: one spec per kind.

:func:`seqnorm.make_padding_safe` and :func:`seqnorm.audit` both iterate over
:data:`KINDS`; a new front end is one entry. For each kind a spec says

* which axis of its input is **time**: the last axis of a 1-d layer's
  ``(N, C, L)``; for a 2-d layer's ``(N, C, H, W)`` (a speech model's
  ``(B, C, T, F)`` front end) the spatial axis whose size is a number of steps
  the padding context knows (``H`` first);
* its **geometry** along that axis (:class:`Geometry`);
* the **fill** for padded steps before it runs: what the layer sees past the
  end of a sequence alone — 0 for convolutions and average pooling, the lowest
  finite value for max pooling (torch pads it with −∞);
* its **output lengths** (torch's output-size formula per sequence):

  .. math::
      L_\text{out} = \Bigl\lfloor \frac{L + p_l + p_r - d(k - 1) - 1}{s} \Bigr\rfloor + 1
      \qquad (\text{transposed: } (L - 1)s - 2p + d(k - 1) + p_\text{out} + 1)

  (``ceil_mode`` rounds up, but a last window must start inside the input or
  its left padding);
* whether a real output **reads past the end** (:func:`reads_past_the_end`), so
  the padded steps must be filled first;
* for average pooling, the **divisor** a window at a sequence's end has alone
  (:func:`avg_divisor_ratio`): zeroing the padding gives the sum the sequence has
  alone, but a window clipped at the end divides by fewer steps alone than in a
  longer batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

__all__ = ["Geometry", "KINDS", "TIME_LAYERS", "geometry", "time_axis", "output_lengths", "reads_past_the_end",
           "fill_value", "avg_divisor_ratio", "is_time_layer"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class Kind:
    """One kind of time layer: its classes, spatial axes, fill and whether it averages."""

    classes: Tuple[type, ...]
    spatial: int           #: 1: (N, C, L); 2: (N, C, H, W)
    transposed: bool = False
    max_pool: bool = False
    avg_pool: bool = False


KINDS = (
    Kind((nn.Conv1d,), 1),
    Kind((nn.ConvTranspose1d,), 1, transposed=True),
    Kind((nn.MaxPool1d,), 1, max_pool=True),
    Kind((nn.AvgPool1d,), 1, avg_pool=True),
    Kind((nn.Conv2d,), 2),
    Kind((nn.MaxPool2d,), 2, max_pool=True),
    Kind((nn.AvgPool2d,), 2, avg_pool=True),
)

#: the layers whose output rate make_padding_safe follows
TIME_LAYERS = tuple(c for k in KINDS for c in k.classes)


def kind(layer: nn.Module) -> Optional[Kind]:
    """The :class:`Kind` of ``layer``, or None. A subclass counts only with the class's own
    ``forward`` (a weight-norm parametrization, say): one that overrides it (Parakeet's CTC
    head transposes its input first) may compute anything on its input."""
    for k in KINDS:
        for cls in k.classes:
            if isinstance(layer, cls):
                return k if type(layer).forward is cls.forward else None
    return None


def is_time_layer(layer: nn.Module) -> bool:
    return kind(layer) is not None


@dataclass(frozen=True)
class Geometry:
    """A time layer along its time axis. ``left``/``right``: implicit padding on each side
    (for a transposed convolution, the ``padding`` cropped from each side of its output)."""

    kernel: int
    stride: int
    left: int
    right: int
    dilation: int = 1
    output_padding: int = 0
    ceil_mode: bool = False
    transposed: bool = False
    avg: bool = False
    count_include_pad: bool = True
    divisor_override: Optional[int] = None

    @property
    def span(self) -> int:
        """Steps a window covers minus one: ``d(k − 1)``."""
        return self.dilation * (self.kernel - 1)


def _at(v, i: int) -> int:
    return int(v[i]) if isinstance(v, (tuple, list)) else int(v)


def geometry(layer: nn.Module, axis: int = 0) -> Geometry:
    """``layer``'s :class:`Geometry` along spatial axis ``axis`` (0 for a 1-d layer; 0 = H,
    1 = W for a 2-d one)."""
    k_ = kind(layer)
    k, s = _at(layer.kernel_size, axis), _at(layer.stride if layer.stride is not None else layer.kernel_size, axis)
    d = _at(getattr(layer, "dilation", 1), axis)
    padding = layer.padding
    if padding == "valid":
        left = right = 0
    elif padding == "same":      # torch puts the odd step on the right
        left = d * (k - 1) // 2
        right = d * (k - 1) - left
    else:
        left = right = _at(padding, axis)
    return Geometry(k, s, left, right, d, _at(getattr(layer, "output_padding", 0), axis),
                    bool(getattr(layer, "ceil_mode", False)), k_.transposed, k_.avg_pool,
                    bool(getattr(layer, "count_include_pad", True)), getattr(layer, "divisor_override", None))


def time_axis(layer: nn.Module, x: Tensor, known: Iterable[int]) -> Optional[int]:
    """The axis of ``x`` that is time for ``layer``: a spatial axis whose number of steps is
    in ``known`` (``H`` before ``W``); None when ``x`` is not a batched input of the layer's
    rank or no spatial axis is at a known rate."""
    k = kind(layer)
    if k is None or not isinstance(x, Tensor) or x.dim() != k.spatial + 2:
        return None
    known = list(known)     # compared with ==, not hashed: a symbolic size stays symbolic under torch.compile
    return next((a for a in range(2, x.dim()) if x.shape[a] in known), None)


def output_lengths(g: Geometry, lengths: Tensor) -> Tensor:
    """Each sequence's steps after the layer, as if it were alone; 0 stays 0, and a
    sequence too short for the kernel gets 0."""
    if g.transposed:
        out = (lengths - 1) * g.stride - g.left - g.right + g.span + g.output_padding + 1
    else:
        span = lengths + g.left + g.right - g.span - 1
        out = torch.div(span + (g.stride - 1 if g.ceil_mode else 0), g.stride, rounding_mode="floor") + 1
        if g.ceil_mode:   # torch: the last window must start inside the input or its left padding
            out = torch.where((out - 1) * g.stride >= lengths + g.left, out - 1, out)
    return torch.where(lengths > 0, out.clamp_min(0), torch.zeros_like(out))


def reads_past_the_end(g: Geometry) -> bool:
    r"""Whether some real output reads a step past its sequence's end (for some length).

    * **convolution / pooling**: real window ``t`` starts at ``ts − p_l`` and ends
      ``d(k−1)`` later. Without ``ceil_mode`` the last real window ends at most at
      ``L − 1 + p_r`` (with equality for the lengths where the floor is exact), so it
      reads past the end exactly when there is **right padding** — whatever the kernel:
      a one-step kernel with ``padding=2`` reads 2 steps past the end (issue 19's leak:
      ``k = 1`` was taken as never reading past). ``ceil_mode`` adds a last window that
      starts inside the input: it reaches past the end when ``s > 1`` and ``d(k−1) > 0``.
    * **transposed convolution**: output ``t`` gathers input ``i`` with
      ``is + jd − p = t``; input ``L`` (the first pad) reaches a real output
      (``t ≤ (L−1)s + d(k−1) − 2p + p_out``) with ``j = 0`` exactly when
      ``d(k−1) + p_out ≥ s + p``.
    """
    if g.transposed:
        return g.span + g.output_padding >= g.stride + g.left
    return g.right > 0 or (g.ceil_mode and g.stride > 1 and g.span > 0)


def fill_value(layer: nn.Module, dtype: torch.dtype) -> float:
    """What ``layer`` sees past the end of a sequence alone."""
    return torch.finfo(dtype).min if kind(layer).max_pool else 0.0


def _window_size(g: Geometry, t: Tensor, n: Tensor) -> Tensor:
    """torch's divisor for average-pooling window ``t`` over ``n`` steps (avg_pool's
    ``pool_size``, or the real steps it covers without ``count_include_pad``)."""
    start = t * g.stride - g.left
    end = torch.minimum(start + g.kernel, n + g.right)
    if g.count_include_pad:
        return end - start
    return torch.minimum(end, n) - start.clamp_min(0)


def avg_divisor_ratio(g: Geometry, lengths: Tensor, steps_in: int, steps_out: int) -> Optional[Tensor]:
    r"""``(B, steps_out)``: batched divisor / alone divisor of each average-pooling window.

    With padded steps zeroed, a window's *sum* is the one the sequence has alone; its
    divisor is not where the window is clipped at the sequence's end: alone at
    ``L + p_r`` (``count_include_pad``) or ``L``, batched at ``T + p_r`` or ``T``. A
    ``ceil_mode`` window, or without ``count_include_pad`` a window over the right
    padding, is such a window. Multiplying the batched output by this ratio gives the
    output alone. None when no divisor differs (or ``divisor_override`` fixes it)."""
    if not g.avg or g.divisor_override or not reads_past_the_end(g):
        return None
    t = torch.arange(steps_out, device=lengths.device)[None, :]
    batched = _window_size(g, t, torch.full_like(lengths, steps_in)[:, None])
    alone = _window_size(g, t, lengths[:, None]).clamp_min(1)
    return batched.to(torch.float32) / alone.to(torch.float32)
