"""Triton kernels of the triton backend (:mod:`seqnorm.backends.triton`). One file per family:

* :mod:`.rowwise` — LayerNorm / RMSNorm, optionally fused with the residual Add;
* :mod:`.featurewise` — masked BatchNorm and PowerNorm over the token axis:
  partials → one finalize kernel (merge, running statistics, coefficients) → normalize;
* :mod:`.groupwise` — masked GroupNorm / InstanceNorm over each sequence's real steps;
* :mod:`.partials` — the finalize of parameter gradients shared by every backward;
* :mod:`.sync` — the finalize kernels of the Sync modules, around their collectives.

Conventions (as the CPU kernels'): inputs are read in their own dtype (float32,
bfloat16, float16) and computed in float32, outputs rounded once; statistics
and parameter gradients are float32. A padded row is never read: its loads are
masked off by its padding bit, so it costs one mask read. Parameter gradients
and feature statistics are per-program partial sums written to a buffer and
reduced in one ordered pass — no atomics, the same bits on every run — by a
finalize kernel that writes them in the parameters' dtype. Rows too wide for
registers take column-blocked kernels (no spills: ``benchmarks/registers.py``).
Every kernel argument carries a shape comment.
"""
