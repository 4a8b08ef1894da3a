#!/usr/bin/env bash
# One GPU call for the Hadamard rotation fused into the quantize kernels: build, the GPU
# tests (FQ_TEST_K selects; default all of tests/test_cuda_gpu.py), the fused kernels'
# launch study against the former rotate-then-quantize route (quantize_study.py
# --rotate), and the per-kernel GPU time of one flash_quant.attention call at the Flux
# shape (profile_call.py); with FQ_BENCH="--quick --no-backward" (say) also
# benchmarks/bench_attention.py. Results under $OUT.
#
#   bash benchmarks/gpu_rotate_run.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_rotate_run}"
mkdir -p "$OUT"
source benchmarks/gpu_prelude.sh

echo "== gpu tests"
FLASH_QUANT_AUTOTUNE=0 timeout "${FQ_TEST_LIMIT:-240}" python3 -m pytest -q -m gpu tests/test_cuda_gpu.py \
  ${FQ_TEST_K:+-k "$FQ_TEST_K"} -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15

if [ -z "${FQ_SKIP_STUDY:-}" ]; then
  echo "== quantize study (rotation fused)"
  timeout "${FQ_STUDY_LIMIT:-150}" python3 benchmarks/quantize_study.py --rotate 2>&1 | tee "$OUT/quantize_rotate_study.md" | tail -20
fi

echo "== where one flash_quant.attention call spends GPU time (Flux shape)"
timeout "${FQ_PROFILE_LIMIT:-120}" python3 benchmarks/profile_call.py --shape 1,24,4608,128 --presets accurate fast \
  > "$OUT/profile_call.txt" 2>&1
grep -v Warning "$OUT/profile_call.txt" | grep -v _warn_once | head -60

if [ -n "${FQ_BENCH:-}" ]; then
  echo "== bench_attention $FQ_BENCH"
  timeout "${FQ_BENCH_LIMIT:-300}" python3 benchmarks/bench_attention.py $FQ_BENCH --out "$OUT" 2>&1 | tail -40
fi
