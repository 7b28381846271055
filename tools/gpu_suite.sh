#!/usr/bin/env bash
# The GPU checks and benchmarks behind docs/perf: GPU-marked tests, then latency and throughput
# benchmarks of real model shapes with random weights. Usage: tools/gpu_suite.sh OUT_DIR [quick]
set -uo pipefail
out=${1:?usage: tools/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
bench() {  # name, then the bench arguments
  local name=$1; shift
  echo "== bench $name: $*"
  timeout "${BENCH_TIMEOUT:-300}" "$py" -m jaxserve.bench "$@" --json "$out/$name.json" 2>&1 \
    | grep -v "absl" | tail -25
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
"$py" -m pytest -q -p no:cacheprovider tests/test_attention_kernels.py tests/test_engine_gpu.py \
  tests/test_engine.py tests/test_sampling.py 2>&1 | tail -25 | tee "$out/tests.log"
bench latency_llama-3.2-1b_b1 latency --random-weights llama-3.2-1b --batch-size 1 --input-len 128 --output-len 256
bench latency_llama-3-8b_b1 latency --random-weights llama-3-8b --batch-size 1 --input-len 128 --output-len 256
bench latency_llama-3-8b_b8 latency --random-weights llama-3-8b --batch-size 8 --input-len 128 --output-len 256
[ "${2:-}" = quick ] && exit 0
bench throughput_llama-3-8b_2000x128x128 throughput --random-weights llama-3-8b --num-requests 2000 \
  --input-len 128 --output-len 128
