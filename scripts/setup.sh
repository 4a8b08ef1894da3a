#!/usr/bin/env bash
# Set up this checkout: dependencies from pyproject.toml (its extras are the one list), then
# flash_quant's C++ extension built in place. Idempotent: each step first checks whether it
# has anything to do (scripts/setup_state.py), so a second run takes seconds.
#
# Run it inside a virtual environment (README, Install); CI runs it with the system python.
#   PYTHON=...          the interpreter (default python3)
#   FQ_EXTRAS=a,b       extras to install (default: test,diffusers,transformers; on CI: ci)
#   FQ_TRITON=1         also install Triton (its kernels' tests run on the CPU under
#                       TRITON_INTERPRET=1); automatic with a CUDA torch on Linux, and on CI
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "[setup.sh] $*"; }
start=$(date +%s)

if ! "$PY" -c "import torch" 2>/dev/null; then
  # 2.13.0 is the CPU wheel on our CI/dev machines; elsewhere pip picks the platform's build.
  say "installing torch 2.13.0 (no torch in $("$PY" -c 'import sys; print(sys.prefix)'))"
  "$PY" -m pip install -q "torch==2.13.0"
fi

if [ -n "${CI:-}" ]; then
  extras=${FQ_EXTRAS:-ci}       # pinned versions (pyproject.toml, extra "ci"), Triton included
else
  extras=${FQ_EXTRAS:-test,diffusers,transformers}
  cuda_torch=$("$PY" -c "import torch; print(int(torch.version.cuda is not None))")
  if [ "${FQ_TRITON:-0}" = 1 ] || { [ "$(uname -s)" = Linux ] && [ "$cuda_torch" = 1 ]; }; then
    extras="$extras,test-triton"
  fi
fi

missing_lines=$("$PY" scripts/setup_state.py missing "$extras")
missing=()
while IFS= read -r line; do [ -n "$line" ] && missing+=("$line"); done <<< "$missing_lines"
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${#missing[@]} requirement(s) of extras [$extras]: ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}"
else
  say "requirements of extras [$extras]: all met"
fi

if ! "$PY" scripts/setup_state.py installed; then
  say "registering flash_quant from this checkout (pip install --no-build-isolation --no-deps -e .; builds the extension, a few minutes)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
elif why=$("$PY" scripts/setup_state.py extension); then
  say "C++ extension: up to date"
else
  say "building the C++ extension in place ($why; incremental, a few minutes at most)"
  MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)} "$PY" setup.py -q build_ext --inplace
fi

"$PY" -c "import flash_quant.ops, torch; print('[setup.sh] flash_quant', flash_quant.__version__, 'torch', torch.__version__)"
say "done in $(( $(date +%s) - start )) s"
