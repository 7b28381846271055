#!/usr/bin/env bash
# The GPU checks and benchmarks behind docs/perf/engine_h100.md and kernels.md: GPU-marked tests,
# then the latency benchmarks, the attention kernels' sweep, and the offline throughput,
# shared-prefix and server start-up benchmarks of real model shapes with random weights. Usage: tools/gpu_suite.sh OUT_DIR [quick]   (quick: tests + latency only)
set -uo pipefail
out=${1:?usage: tools/gpu_suite.sh OUT_DIR [quick]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
bench() {  # name, then the bench arguments
  local name=$1; shift
  echo "== bench $name: $*"
  timeout "${BENCH_TIMEOUT:-300}" "$py" -m jaxserve.bench "$@" --json "$out/$name.json" 2>&1 \
    | grep -v -e "absl" -e "cuda_timer" | tail -25
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
"$py" -m pytest -q -p no:cacheprovider tests/test_attention_kernels.py tests/test_engine_gpu.py \
  tests/test_engine.py tests/test_sampling.py 2>&1 | tail -25 | tee "$out/tests.log"
io=(--input-len 128 --output-len 256 --kernel-profile)
bench latency_llama-3.2-1b_b1 latency --random-weights llama-3.2-1b --batch-size 1 "${io[@]}"
bench latency_llama-3-8b_b1 latency --random-weights llama-3-8b --batch-size 1 "${io[@]}"
bench latency_llama-3-8b_b8 latency --random-weights llama-3-8b --batch-size 8 "${io[@]}"
[ "${2:-}" = quick ] && exit 0
bench kernels_h100 kernels  # the attention kernels' sweep against cuDNN / XLA (docs/perf/kernels.md)
offline=(--random-weights llama-3-8b --num-requests 2000 --input-len 128 --output-len 128)
bench throughput_llama-3-8b_2000x128x128 throughput "${offline[@]}"
bench throughput_llama-3-8b_2000x128x128_seqs512 throughput "${offline[@]}" \
  --max-num-seqs 512 --max-num-batched-tokens 8192
# The best offline configuration, with its kernel profile (a second run under CUPTI: kernel
# seconds against wall seconds).
bench throughput_llama-3-8b_2000x128x128_seqs1024 throughput "${offline[@]}" \
  --max-num-seqs 1024 --max-num-batched-tokens 16384 --max-prefill-seqs 128 --kernel-profile
prefix=(--random-weights llama-3-8b --num-requests 64 --input-len 32 --output-len 32
  --shared-prefix-len 1000)
bench prefix_1000_cache_on throughput "${prefix[@]}"
bench prefix_1000_cache_off throughput "${prefix[@]}" --no-prefix-caching
# Server start-up to SERVING: first with an empty compilation cache, then reusing it.
serve=(--random-weights llama-3-8b --num-requests 32 --input-len 128 --output-len 64
  --request-rate inf --server-timeout 280)
cache=$(mktemp -d)
JAXSERVE_COMPILATION_CACHE=$cache bench serve_llama-3-8b_cold serve "${serve[@]}"
JAXSERVE_COMPILATION_CACHE=$cache bench serve_llama-3-8b_warm serve "${serve[@]}"
rm -rf "$cache"
