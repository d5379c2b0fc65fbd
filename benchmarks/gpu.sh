#!/usr/bin/env bash
# The GPU checks of one device session (target: under 6 minutes on an H200):
# the CUDA tests (tests/test_cuda.py, tests/test_triton.py on the GPU), launches per
# module call on the GPU (benchmarks/launches.py, issue 16's budget), registers and
# spills of the kernels at two widths (benchmarks/registers.py), then
# `seqnorm bench --device cuda` at the issue's shapes (each op's launches and its
# kernels' registers printed beside the timings), one BERT training step, and host µs
# per launch and per module call, cached launch handles against kernel[grid]
# (benchmarks/launch_overhead.py, issue 27).
# Logs and the markdown table go to $OUT (the device tool's folder) or benchmarks/.
# Record the figures in benchmarks/RESULTS-gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -x tests/test_cuda.py tests/test_triton.py tests/test_groupwise.py 2>&1 | tee "$out/gpu-tests.log" | tail -n 5
timeout 60 python3 benchmarks/launches.py 2>&1 | tee "$out/gpu-launches.log"
timeout 120 python3 benchmarks/registers.py --widths 1024,65536 --dtypes bf16 --archs 90 2>&1 \
    | tee "$out/gpu-registers.log" | tail -n 3
timeout 150 python3 -m seqnorm bench --device cuda --shapes "16,512,1024;8,2048,4096" --dtypes bf16,fp32 \
    --budget 0.2 --markdown "$out/results-gpu.md" 2>&1 | tee "$out/gpu-bench.log"
# masked GroupNorm/InstanceNorm at torch's (8, 512, 8000) (the shape is B,T,C)
timeout 60 python3 -m seqnorm bench --device cuda --shapes "8,8000,512" --dtypes bf16,fp32 \
    --ops group_norm,instance_norm --budget 0.2 --markdown "$out/results-gpu-groupnorm.md" 2>&1 | tee -a "$out/gpu-bench.log"
timeout 60 python3 benchmarks/bert_step.py 2>&1 | tee "$out/bert-step.log"
# host µs per launch and per module call: cached launch handles vs kernel[grid] (issue 27)
timeout 90 python3 benchmarks/launch_overhead.py --markdown "$out/results-launch-overhead.md" 2>&1 \
    | tee "$out/gpu-launch-overhead.log"
