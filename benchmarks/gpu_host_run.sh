#!/usr/bin/env bash
# One GPU call for host-overhead work: build, the GPU tests, host time per call of this
# tree against a reference tree, and the Flux step at 1024² (where eager calls are
# host-bound). Results under $OUT (the device tool returns them).
#
#   bash benchmarks/gpu_host_run.sh [REF_DIR]
#
# FQ_TEST_K (optional): a pytest -k expression selecting GPU tests.
# REF_DIR (optional): a copy of an earlier flash_quant/ package to compare host times
# with, e.g. made by `git archive <rev> flash_quant | tar -x -C .ref` and carried; it
# gets this build's compiled _C. Carry `.whl` with diffusers' wheel for the Flux stage.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_host_run}"
mkdir -p "$OUT"
REF="${1:-}"
source benchmarks/gpu_prelude.sh

echo "== gpu tests (limit ${FQ_TEST_LIMIT:-150}s)"
FLASH_QUANT_AUTOTUNE=0 timeout "${FQ_TEST_LIMIT:-150}" python3 -m pytest -q -m gpu tests/test_cuda_gpu.py \
  ${FQ_TEST_K:+-k "$FQ_TEST_K"} -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -4

echo "== host time per call (limit ${FQ_HOST_LIMIT:-60}s each)"
timeout "${FQ_HOST_LIMIT:-60}" python3 benchmarks/host_overhead.py --iters 60 2>&1 | tee "$OUT/host_overhead.txt" \
  | grep -E "flash_quant.attention|op quantize|op attention_forward|under|sdpa"
if [ -n "$REF" ] && [ -d "$REF/flash_quant" ]; then
  cp flash_quant/_C*.so "$REF/flash_quant/"
  echo "-- reference tree $REF"
  PYTHONPATH="$PWD/$REF:${PYTHONPATH:-}" timeout "${FQ_HOST_LIMIT:-60}" python3 benchmarks/host_overhead.py --iters 60 \
    2>&1 | tee "$OUT/host_overhead_ref.txt" | grep -E "flash_quant.attention|op quantize|op attention_forward|under|sdpa|imported"
fi

echo "== flux 1024 (limit ${FQ_FLUX_LIMIT:-200}s)"
timeout "${FQ_FLUX_LIMIT:-200}" python3 benchmarks/bench_flux.py --sizes ${FQ_FLUX_SIZES:-1024} \
  --presets ${FQ_FLUX_PRESETS:-fast accurate} --baselines sdpa no_attention_fused sdpa_fused \
  --warmup 2 --iters 5 --out "$OUT/flux" 2>&1 | tee "$OUT/flux_log.txt" | tail -14
