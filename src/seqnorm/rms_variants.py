r"""RMSNorm's affine step as today's language models write it: a zero-centred ``γ`` and where
the cast to the input dtype happens.

.. math::
    \hat x = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}}, \qquad
    y = \hat x \odot (\mathrm{offset} + \gamma)

* ``offset``: 0 for the usual ``γ`` (initialised to ones); 1 for a zero-centred one (Gemma,
  initialised to zeros and applied as ``1 + γ``). The gradient of ``γ`` does not change
  (``∂y/∂γ = x̂``); the input's gradient sees ``offset + γ``.
* ``casting``: for a float16/bfloat16 input, where the result is rounded to its dtype:

  ==========  ================================================  ==============================
  casting     what is computed                                  families (Liger's name)
  ==========  ================================================  ==============================
  float32     ``round(x̂ ⊙ (offset + γ))``: statistics, x̂ and     Gemma, Gemma2, Olmo2, seqnorm's
              the affine in float32, rounded once               own default ("gemma")
  llama       ``(offset + γ) ⊙ round(x̂)``: x̂ rounded to the      Llama, Mistral, Qwen2/3, Phi3
              input dtype, then multiplied by ``γ`` in the       ("llama")
              dtype torch promotes ``γ`` and the input to
  ==========  ================================================  ==============================

  For a float32/float64 input both are the same computation. Liger's third mode, ``"none"``
  (statistics in the input dtype), is not offered: seqnorm's statistics are float32 or wider.

Every backend runs these unchanged: the offset is folded into ``γ`` in float32 (float64 for a
float64 input) before the backend's kernel, as Gemma itself forms ``1.0 + weight.float()``; the
``"llama"`` cast is the backend's normalization without ``γ`` (rounded once to the input dtype,
padded tokens exactly 0) followed by the product with ``γ`` — the same two steps, and so the same
bits and gradients, as the family's own module.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

__all__ = ["CASTINGS", "check_offset_casting", "rms_affine", "shifted_weight", "variant_repr"]

Tensor = torch.Tensor

#: where a 16-bit input is rounded: see the module docstring
CASTINGS = ("float32", "llama")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_offset_casting(offset, casting, has_weight: bool = True) -> float:
    """``offset`` as a float, after checking both arguments (TypeError / ValueError naming them)."""
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset must be a float (0.0, or 1.0 for a zero-centred weight), got "
                        f"{type(offset).__name__}")
    if not math.isfinite(offset):
        raise ValueError(f"offset must be finite, got {offset}")
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {', '.join(map(repr, CASTINGS))}, got {casting!r}")
    if offset and not has_weight:
        raise ValueError(f"offset={offset} shifts the weight γ, but there is none (weight=None / "
                         f"elementwise_affine=False)")
    return float(offset)


def rms_affine(x: Tensor, weight: Optional[Tensor], offset: float,
               casting: str) -> Tuple[Optional[Tensor], Optional[Callable[[Tensor], Tensor]]]:
    """``(weight for the backend's norm, step after it)`` for RMSNorm with ``offset`` and ``casting``.

    The step after is None, or the ``"llama"`` product ``(offset + γ) ⊙ round(x̂)`` for a 16-bit
    input (the backend then normalizes without ``γ``). A non-zero offset is folded into ``γ`` in
    float32 (float64 for a float64 input or weight): differentiable, so ``γ``'s gradient flows
    through the sum unchanged."""
    offset = check_offset_casting(offset, casting, weight is not None)
    if weight is None:
        return None, None
    if casting == "llama" and x.dtype in _LOW_PRECISION:
        if offset:
            w = shifted_weight(weight, offset)
            out_dtype = torch.promote_types(weight.dtype, x.dtype)
            return None, lambda y: (w * y).to(out_dtype)
        return None, lambda y: weight * y          # as the family writes it: `self.weight * x̂.to(input_dtype)`
    return (shifted_weight(weight, offset) if offset else weight), None


def shifted_weight(weight: Tensor, offset: float) -> Tensor:
    """``offset + γ``, the scale a zero-centred ``γ`` stands for, in float32 at least (a
    bfloat16 ``1 + γ`` would lose ``γ``'s low bits; float32 holds it exactly)."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(wide) + offset


def variant_repr(offset: float, casting: str) -> str:
    """What a module's ``extra_repr`` adds for a non-default ``offset`` / ``casting``."""
    return (f", offset={offset}" if offset else "") + (f", casting={casting!r}" if casting != "float32" else "")
