#!/usr/bin/env bash
# The one script a GPU call runs: build, GPU tests, attention benchmark, results to $OUT.
#
#   bash benchmarks/gpu_run.sh [--quick] [--skip-tests] [--tests-only]
#
# On the lent GPU machine (device tool), from the repository root; carry `.whl` when it
# holds wheels to install (e.g. sageattention-1.0.6-py3-none-any.whl for the SageAttention
# rows). Each stage has its own time limit so the results of the earlier ones survive.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_run}"
mkdir -p "$OUT"
QUICK=""; SKIP_TESTS=0; TESTS_ONLY=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK="--quick" ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --tests-only) TESTS_ONLY=1 ;;
    *) echo "unknown argument $a"; exit 2 ;;
  esac
done
TEST_LIMIT="${FQ_TEST_LIMIT:-170}"
BENCH_LIMIT="${FQ_BENCH_LIMIT:-330}"

source benchmarks/gpu_prelude.sh
python3 -c 'import flash_quant, torch; print("flash_quant imported; cuda kernels:", torch.cuda.is_available())' 2>&1 | tee -a "$OUT/build.txt"

if [ "$SKIP_TESTS" = 0 ]; then
  echo "== gpu tests (limit ${TEST_LIMIT}s)"
  FLASH_QUANT_AUTOTUNE=0 timeout "$TEST_LIMIT" python3 -m pytest -q -m gpu tests/test_cuda_gpu.py -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
fi
[ "$TESTS_ONLY" = 1 ] && exit 0

echo "== benchmark (limit ${BENCH_LIMIT}s)"
FLASH_QUANT_PRINT_AUTOTUNE=1 timeout "$BENCH_LIMIT" python3 benchmarks/bench_attention.py $QUICK \
  2>&1 | tee "$OUT/bench_log.txt" | grep -v '^\[flash_quant autotune\]' | tail -60
latest=$(ls -t benchmarks/results/attention_*.json 2>/dev/null | head -1)
if [ -n "$latest" ]; then
  cp "${latest%.json}".json "${latest%.json}".md "$OUT"/ 2>/dev/null
  cp "${latest%.json}".png "$OUT"/ 2>/dev/null || true
  echo "results: ${latest%.json}.{json,md,png}"
fi
