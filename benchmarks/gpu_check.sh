#!/usr/bin/env bash
# Everything the GPU issue asks to run on a lent device, in one call under the device's 600 s limit,
# most important first so a cut-off run still answers the questions:
#   1. pytest -m gpu on the engine and the paged kernel (graph path = eager decode, batched engine on CUDA)
#   2. benchmarks/gpu_batch.py (8B shapes, 32k prompts: continuous batching, full vs 5% in the same memory)
#   3. benchmarks/bench_kernels.py --paged (the paged decode kernel vs the contiguous one, same keys, at
#      gpu_batch's batches: is the batched step's attention at the contiguous kernel's bandwidth, and do
#      larger key tiles or more split programs get it there?)
#   4. pytest -m gpu on the rest (Triton kernels vs references, models, memory checks)
#   5. benchmarks/eviction_round.py (8B shapes: one decode-time eviction round of 21 sequences, batched vs
#      per request, for tova, h2o, streaming, ahakv; then --single: one sequence's ragged cache, ranked
#      per layer vs per segment)
#   6. benchmarks/gpu_decode.py (8B shapes, batch 1: decode at 1k/8k/32k, full vs 5%, graphs on/off,
#      transformers, copy bandwidth, prefill attention vs SDPA)
# Each step has its own timeout (worst case about 590 s in all) and never stops the ones after it.
# Results land under $OUT (the device tool's output folder), the log in $OUT/log.
# Run from the checkout:  OUT=/tmp/out bash benchmarks/gpu_check.sh
set -o pipefail
OUT=${OUT:-/tmp/kvx-gpu}
mkdir -p "$OUT"
export PYTHONPATH=.
FIRST="tests/test_gpu_engine.py tests/test_paged_kernel.py"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  timeout 140 python3 -m pytest -q -m gpu $FIRST -p no:cacheprovider --junitxml="$OUT/gpu_tests_1.xml"
  echo "pytest (engine, paged kernel) rc=$?"
  timeout 180 python3 benchmarks/gpu_batch.py --out "$OUT/gpu_batch.json" --prompt 32768 --gen 32
  echo "gpu_batch rc=$?"
  timeout 40 python3 benchmarks/bench_kernels.py --paged
  echo "bench_kernels --paged rc=$?"
  timeout 100 python3 -m pytest -q -m gpu tests/ $(for f in $FIRST; do echo --ignore=$f; done) \
    -p no:cacheprovider --junitxml="$OUT/gpu_tests_2.xml"
  echo "pytest (the rest) rc=$?"
  timeout 50 python3 benchmarks/eviction_round.py --device cuda --out "$OUT/eviction_round.json"
  echo "eviction_round rc=$?"
  timeout 20 python3 benchmarks/eviction_round.py --single --device cuda --out "$OUT/eviction_single.json"
  echo "eviction_round --single rc=$?"
  timeout 60 python3 benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json"
  echo "gpu_decode rc=$?"
  date -u
} 2>&1 | tee "$OUT/log"
