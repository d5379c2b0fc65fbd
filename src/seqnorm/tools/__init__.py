"""Measuring tools over the whole package: launches per module call
(:mod:`.launches`) and the Triton kernels' registers and spills
(:mod:`.registers`). They sit above the modules and backends they measure and
import only downward; ``seqnorm bench``, ``benchmarks/`` and the tests use them."""
