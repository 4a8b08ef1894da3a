#!/usr/bin/env bash
# One GPU session for issue 4 (training / backward): build, standalone accuracy check of
# the Triton backward, kernel + autograd timings against SDPA, the gpu-marked tests and
# the loss-curve run. Everything lands in $OUT (or benchmarks/results when OUT is unset).
#   bash benchmarks/gpu_backward_run.sh [steps for the curves run]
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${1:-400}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  date -u
} 2>&1 | tee "$OUT/run.log"
python3 -m pip install --no-build-isolation --no-deps -e . -q > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
# 1. accuracy, standalone (fixed tiles: no autotune over the many variants)
FLASH_QUANT_AUTOTUNE=0 timeout 110 python3 benchmarks/bench_training.py --mode check --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
# 2. timings (autotuned tiles; the choices are printed)
FLASH_QUANT_PRINT_AUTOTUNE=1 timeout 170 python3 benchmarks/bench_training.py --mode kernel --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
# 3. loss curves
timeout 120 python3 benchmarks/bench_training.py --mode curves --steps "$STEPS" --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
# 4. gpu tests through autograd (need the forward kernels too)
FLASH_QUANT_AUTOTUNE=0 timeout 100 python3 -m pytest -q -m gpu tests/test_training.py -p no:cacheprovider 2>&1 | tail -25 | tee -a "$OUT/run.log"
