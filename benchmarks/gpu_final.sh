#!/usr/bin/env bash
# Second GPU call of a session: the full-size Flux transformer timing (issue 5), the
# cost-model calibration (issue 7) and the training loss curves (issue 4). Run after
# benchmarks/gpu_run.sh (which builds, tests and writes the attention table). Everything
# is packed into $OUT/final_results.tar.gz (the device tool returns at most 8 files).
#   bash benchmarks/gpu_final.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_final}"
RESULT_DIR="$OUT"
OUT=/tmp/fq_gpu_final  # working folder; only the tarball and the log go to $RESULT_DIR
mkdir -p "$OUT" "$RESULT_DIR"
source benchmarks/gpu_prelude.sh

echo "== flux (limit ${FQ_FLUX_LIMIT:-260}s)"
timeout "${FQ_FLUX_LIMIT:-260}" python3 benchmarks/bench_flux.py --sizes 1024 2048 --presets fast accurate \
  --warmup 2 --iters 5 --device cuda 2>&1 | tee "$OUT/flux_log.txt" | tail -30
echo "== calibration (limit ${FQ_CAL_LIMIT:-150}s)"
timeout "${FQ_CAL_LIMIT:-150}" python3 -m flash_quant.cli calibrate --device cuda --sdpa-baseline \
  --presets ${FQ_CAL_PRESETS:-accurate fast int4 fp16} \
  --out-dir "$OUT/calibration" 2>&1 | tee "$OUT/calibration_log.txt" | tail -30
[ "${FQ_SKIP_TRAINING:-0}" = 1 ] || {
echo "== training curves (limit ${FQ_TRAIN_LIMIT:-120}s)"
timeout "${FQ_TRAIN_LIMIT:-120}" python3 benchmarks/bench_training.py --mode curves --steps 400 \
  --out "$OUT/training" 2>&1 | tee "$OUT/training_log.txt" | tail -20
}
cp benchmarks/results/flux_* "$OUT/" 2>/dev/null || true
cp benchmarks/results/calibration_* "$OUT/" 2>/dev/null || true
cp flash_quant/planning/data/calibration_*.json "$OUT/" 2>/dev/null || true
tar czf "$RESULT_DIR/final_results.tar.gz" -C "$OUT" .
ls -laR "$OUT" | head -40
