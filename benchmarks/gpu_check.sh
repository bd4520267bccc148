#!/usr/bin/env bash
# Everything the GPU issue asks to run on a lent device, in one go (about 8 minutes on an H200):
#   1. pytest -m gpu (kernels vs references, engine on CUDA vs CPU, graphs, batched engine on CUDA)
#   2. benchmarks/gpu_decode.py (8B shapes, batch 1: decode at 1k/8k/32k, full vs 5%, graphs on/off,
#      transformers, copy bandwidth, prefill attention vs SDPA)
#   3. benchmarks/gpu_batch.py (8B shapes: continuous batching, full vs 5% in the same KV memory)
# Results land under $OUT (the device tool's output folder), the log in $OUT/log.
# Run from the checkout:  OUT=/tmp/out bash benchmarks/gpu_check.sh
set -o pipefail
OUT=${OUT:-/tmp/kvx-gpu}
mkdir -p "$OUT"
export PYTHONPATH=.
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  timeout 240 python3 -m pytest -q -m gpu -x tests/ -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
  echo "pytest rc=$?"
  timeout 180 python3 benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json"
  echo "gpu_decode rc=$?"
  timeout 150 python3 benchmarks/gpu_batch.py --out "$OUT/gpu_batch.json" --requests 32 --prompt 32768 --gen 32
  echo "gpu_batch rc=$?"
} 2>&1 | tee "$OUT/log"
