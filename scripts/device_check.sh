#!/usr/bin/env bash
# The GPU checks, as one prepared call for a session that is lent a device machine (its image brings
# PyTorch, Triton, pytest, hypothesis and transformers; our .venv does not travel). From the repo root:
#
#   OUT=/some/folder scripts/device_check.sh      (the device tool's run: `bash scripts/device_check.sh`)
#
# 1. the Triton span kernel's tests on CUDA (tests/algorithms/test_algorithms_gpu_sweep.py);
# 2. benchmarks/gpu_sweep.py: torch column loop against the Triton kernel on 4096 x 4096 and
#    11008 x 4096 layers, same run (rows into benchmarks/results/gpu_sweep.json, copied to $OUT);
# 3. benchmarks/scale.py on 2 blocks of the Llama-2-7B-shaped model on the GPU: seconds per block and
#    the extrapolation to 70B / 175B at 16 x 256 and 128 x 2048 calibration tokens ($OUT/scale.md).
# Each step has its own time limit so that one stuck step leaves the others' output; logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/secateurs-device}
mkdir -p "$OUT"
# at most 8 files come back from $OUT: versions, 3 logs, gpu_sweep.{json,md}, scale.{json,md}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/versions.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/algorithms/test_algorithms_gpu_sweep.py 2>&1 | tee "$OUT/tests.log"
timeout 180 python3 benchmarks/gpu_sweep.py 2>&1 | tee "$OUT/gpu_sweep.log"
cp benchmarks/results/gpu_sweep.json benchmarks/results/gpu_sweep.md "$OUT/" 2>/dev/null
timeout 300 python3 benchmarks/scale.py --models llama2-7b-shape --blocks 2 --device cuda --threads 8 \
  --results "$OUT" 2>&1 | tee "$OUT/scale.log"
echo "device check done: $(ls "$OUT" | tr '\n' ' ')"
