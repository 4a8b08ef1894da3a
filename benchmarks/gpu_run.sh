#!/usr/bin/env bash
# The one script for a GPU machine: build, the GPU tests, the maintained GPU benchmarks.
#
#   bash benchmarks/gpu_run.sh [--quick] [STAGE ...]
#
# STAGEs, in this order (default: all of them):
#   tests      pytest -m gpu tests/test_cuda_gpu.py tests/test_sm90_gpu.py tests/test_training.py tests/test_contract.py
#              -> $OUT/gpu_tests.txt
#   attention  benchmarks/bench_attention.py (forward + backward tables)   -> $OUT/attention_*
#   training   benchmarks/bench_training.py --mode all (check, kernel timings, loss curves)
#   flux       benchmarks/bench_flux.py (needs diffusers; skipped with a note without it)
#   decode     pytest -m gpu tests/test_decode_gpu.py, then benchmarks/bench_decode.py -> $OUT/decode.md
#              (FQ_DECODE_SWEEP=1: also the kernel-configuration sweep -> $OUT/decode_sweep.md)
# --quick: the short variant of each benchmark (two attention shapes, 1024² Flux, 100 steps).
#
# Results go to $OUT (default benchmarks/results/gpu_run_<UTC date-time>): env.txt (device,
# driver, torch, triton, commit), build.txt, one log per stage and each benchmark's own
# result files. Each stage has its own time limit (FQ_<STAGE>_LIMIT seconds), so the
# results of the earlier stages survive a later one running out of time. Wheels placed
# in .whl/ (e.g. diffusers, sageattention) are installed into a private site dir first;
# SAGE_SRC=<dir> builds SageAttention from a source checkout instead (benchmarks/README.md).
set -u
cd "$(dirname "$0")/.."
QUICK=0
STAGES=()
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    tests|attention|training|flux|decode) STAGES+=("$a") ;;
    *) echo "unknown argument $a (stages: tests attention training flux decode; option: --quick)"; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests attention training flux decode)
OUT="${OUT:-benchmarks/results/gpu_run_$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- environment and build
{
  echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# SageAttention2's sm90 kernel, the issue-17 peer, built from its source in the same call
# when SAGE_SRC names a checkout (git-ignored, never committed; see benchmarks/README.md),
# in the background while flash_quant builds (~75 s with 16 cores).
if [ -n "${SAGE_SRC:-}" ]; then
  (cd "$SAGE_SRC" && TORCH_CUDA_ARCH_LIST=9.0 EXT_PARALLEL=4 python3 setup.py build_ext --inplace \
     > "$OUT/sage_build.txt" 2>&1; echo "sage build rc $?" >> "$OUT/sage_build.txt") &
  SAGE_PID=$!
fi
echo "== build"
t0=$(date +%s)
MAX_JOBS="${MAX_JOBS:-16}" python3 -m pip install --no-build-isolation --no-deps -e . -q > "$OUT/build.txt" 2>&1 \
  || { tail -20 "$OUT/build.txt"; exit 1; }
if [ -n "${SAGE_PID:-}" ]; then
  wait "$SAGE_PID"; tail -1 "$OUT/sage_build.txt"
  export PYTHONPATH="$(cd "$SAGE_SRC" && pwd):${PYTHONPATH:-}"
fi
python3 -c 'import flash_quant, torch; from flash_quant import _build_info as b; print("flash_quant from", flash_quant.__file__, "| cuda:", torch.cuda.is_available(), "| sm90 kernels:", b.SM90_KERNELS, b.SM90_NOT_BUILT_BECAUSE or "")' \
  2>&1 | tee -a "$OUT/build.txt"
echo "built in $(( $(date +%s) - t0 )) s"

# ---------------------------------------------------------------- stages
run_stage() {  # name, limit, command...
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/${name}_log.txt" 2>&1
  local rc=$?
  grep -v '^\[flash_quant autotune\]' "$OUT/${name}_log.txt" | tail -40
  echo "-- $name: exit $rc"
}

for stage in "${STAGES[@]}"; do
  case "$stage" in
    tests)
      # Fixed tiles: autotuning every test's kernels would take the whole limit.
      FLASH_QUANT_AUTOTUNE=0 run_stage tests "${FQ_TESTS_LIMIT:-300}" \
        python3 -m pytest -q -m gpu tests/test_cuda_gpu.py tests/test_sm90_gpu.py tests/test_training.py tests/test_contract.py \
        -p no:cacheprovider
      cp "$OUT/tests_log.txt" "$OUT/gpu_tests.txt" ;;
    attention)
      FLASH_QUANT_PRINT_AUTOTUNE=1 run_stage attention "${FQ_ATTENTION_LIMIT:-420}" \
        python3 benchmarks/bench_attention.py $([ $QUICK = 1 ] && echo --quick) --out "$OUT" ;;
    training)
      run_stage training "${FQ_TRAINING_LIMIT:-360}" \
        python3 benchmarks/bench_training.py --mode all --steps "$([ $QUICK = 1 ] && echo 100 || echo 400)" --out "$OUT" ;;
    flux)
      if python3 -c 'import diffusers' 2>/dev/null; then
        run_stage flux "${FQ_FLUX_LIMIT:-300}" \
          python3 benchmarks/bench_flux.py --sizes $([ $QUICK = 1 ] && echo 1024 || echo 1024 2048) \
          --presets fast accurate --warmup 2 --iters 5 --out "$OUT/flux"
      else
        echo "== flux: skipped (diffusers is not installed; put its wheel in .whl/)" | tee "$OUT/flux_log.txt"
      fi ;;
    decode)
      run_stage decode_tests "${FQ_DECODE_TESTS_LIMIT:-240}" \
        python3 -m pytest -q -m gpu tests/test_decode_gpu.py -p no:cacheprovider
      run_stage decode "${FQ_DECODE_LIMIT:-300}" \
        python3 benchmarks/bench_decode.py $([ $QUICK = 1 ] && echo --quick) --out "$OUT/decode.md"
      if [ "${FQ_DECODE_SWEEP:-0}" = 1 ]; then
        run_stage decode_sweep "${FQ_DECODE_SWEEP_LIMIT:-420}" \
          python3 benchmarks/bench_decode.py --sweep --quick --out "$OUT/decode_sweep.md"
      fi ;;
  esac
done
ls -la "$OUT"
