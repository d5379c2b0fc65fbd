"""Fused CPU kernels (Numba). They know nothing of torch: NumPy arrays in,
NumPy arrays out (written in place). One file per family:

* :mod:`.rowwise` — LayerNorm / RMSNorm, optionally fused with the residual Add.
* :mod:`.featurewise` — masked BatchNorm and PowerNorm over the token axis.
* :mod:`.groupwise` — masked GroupNorm / InstanceNorm over each sequence's time steps.
* :mod:`.rows` — row I/O, so that one kernel source serves every dtype.

Shared conventions: ``x`` is a C-contiguous ``(R, D)`` array of float32 or
float64, or of 16-bit integers holding bfloat16 (uint16) or float16 (int16)
bits (:mod:`.rows` widens each row to float32 and narrows outputs back; the
compute dtype is then float32); ``pad``
is a ``(R,)`` uint8 array, 1 at padding; ``k`` is a small array of constants
*in the compute dtype* (so that the accumulators keep that dtype and
vectorize): ``k = [eps, 1/D or 1/n, 1, 0]``; parameters and statistics are in
the compute dtype too. Parameter gradients are
reduced over a fixed partition of the rows into ``NCHUNK`` chunks whose
partial sums are then added in chunk order, so the bits do not depend on the
number of threads.

fastmath uses only ``reassoc``/``contract``/``arcp``; never ``nnan``/``ninf``,
so NaN and Inf propagate exactly as in IEEE arithmetic.
"""

FASTMATH = {"reassoc", "contract", "arcp"}
NCHUNK = 64

__all__ = ["FASTMATH", "NCHUNK"]
