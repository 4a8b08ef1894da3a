#!/usr/bin/env bash
# One GPU call: build, the GPU tests named by FQ_TEST_K (default: the ones added on
# 2026-12-02 after that session's device time ran out), then Nsight Compute's warp-state
# and scheduler sections for the attention forward at the Flux shape — where the ~3800 SM
# clocks per key tile go (benchmarks/results/wgmma_study_2026-12-02_h200.md: more than the
# tensor-core, exp2 and issue throughputs add up to). Results under $OUT.
#
#   bash benchmarks/gpu_stall_run.sh
#
# ncu reads hardware counters on the Firecracker runtime only (device README, KINDS.md);
# clocks are left alone (--clock-control none, METHOD.md). Then benchmarks/profile_call.py:
# the GPU time of each kernel of one flash_quant.attention call at the Flux shape.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_stall_run}"
mkdir -p "$OUT"
source benchmarks/gpu_prelude.sh

echo "== gpu tests"
FLASH_QUANT_AUTOTUNE=0 timeout "${FQ_TEST_LIMIT:-150}" python3 -m pytest -q -m gpu tests/test_cuda_gpu.py \
  -k "${FQ_TEST_K:-constant_along_keys or direct_launch}" -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -4

if ! command -v ncu >/dev/null 2>&1; then
  echo "ncu not on PATH; stopping"; exit 0
fi
echo "== ncu"
for run in "accurate per_token 128/64/4/3" "accurate per_head 128/64/4/3" "fast per_token 64/128/4/3"; do
  set -- $run
  name="$1_$2_${3//\//-}"
  timeout "${FQ_NCU_LIMIT:-120}" ncu --clock-control none -k regex:_attn_fwd_kernel --launch-skip 3 --launch-count 1 \
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    python3 benchmarks/ncu_forward.py --recipe "$1" --kscale "$2" --config "$3" > "$OUT/ncu_$name.txt" 2>&1
  echo "-- $name (rc $?)"
  grep -E "stalled|Stall|Issued Warp|No Eligible|Active Warps|Eligible Warps|Achieved Occupancy|Executed Ipc|Duration" \
    "$OUT/ncu_$name.txt" | head -40
done

echo "== where one flash_quant.attention call spends GPU time (Flux shape)"
timeout "${FQ_PROFILE_LIMIT:-120}" python3 benchmarks/profile_call.py --shape 1,24,4608,128 --presets accurate fast \
  > "$OUT/profile_call.txt" 2>&1
grep -v Warning "$OUT/profile_call.txt" | grep -v _warn_once | head -60
