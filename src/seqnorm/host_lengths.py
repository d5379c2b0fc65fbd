r"""The time layers' length arithmetic on Python ints, for lengths that are host data.

:mod:`seqnorm.time_layers` states each rule on ``(B,)`` tensors, so that it runs
where the lengths live (on a device, and under ``torch.compile``). Where the
lengths are host data — a CPU mask or lengths outside a trace, read once per
rate (:meth:`seqnorm.masks.PaddingContext.host_lengths_at`) — a tiny model's
forward is mostly Python, and each tensor op on two numbers costs microseconds:
:func:`seqnorm.make_padding_safe`'s hooks then take these, the same rules on a
tuple of ints (one per sequence).
"""

from __future__ import annotations

from typing import Tuple

from .time_layers import Geometry, reads_past_the_end

__all__ = ["output_lengths", "reads_padding"]


def output_lengths(g: Geometry, lengths: Tuple[int, ...]) -> Tuple[int, ...]:
    """:func:`seqnorm.time_layers.output_lengths` on Python ints: each sequence's steps
    after a layer of geometry ``g``, as if it were alone; 0 stays 0, and a sequence too
    short for the kernel gets 0."""
    return tuple(_output_length(g, n) for n in lengths)


def _output_length(g: Geometry, n: int) -> int:
    if n <= 0:
        return 0
    if g.transposed:
        out = (n - 1) * g.stride - g.left - g.right + g.span + g.output_padding + 1
    else:
        out = (n + g.left + g.right - g.span - 1 + (g.stride - 1 if g.ceil_mode else 0)) // g.stride + 1
        if g.ceil_mode and (out - 1) * g.stride >= n + g.left:   # the last window starts inside the input
            out -= 1
    return max(out, 0)


def reads_padding(g: Geometry, lengths: Tuple[int, ...], out_lengths: Tuple[int, ...], steps: int) -> bool:
    """Whether, in a batch of ``steps`` steps, some sequence's real output reads one of
    its padded steps (``L ≤ t < steps``), so that they must be filled first.

    Real window ``t`` of a sequence of ``L`` steps (``t < L_out``) covers steps
    ``ts − p_l … ts − p_l + d(k − 1)``; the last one that starts inside the batch reaches
    furthest into ``[L, steps)``: the padding is read when it ends at ``L`` or later.
    (With dilation it may step over every padded step: then this says True and the fill
    is merely not needed.) A transposed convolution's real outputs reach input ``L`` for
    every length or for none (:func:`seqnorm.time_layers.reads_past_the_end`). A
    full-length sequence has no padded step, and an empty one no real output."""
    if g.transposed:
        return reads_past_the_end(g) and any(0 < n < steps for n in lengths)
    return any(0 < n < steps and m > 0
               and min(m - 1, (steps - 1 + g.left) // g.stride) * g.stride - g.left + g.span >= n
               for n, m in zip(lengths, out_lengths))
