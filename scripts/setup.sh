#!/usr/bin/env bash
# One-step set-up on a fresh machine: torch (if absent), build tools, the test and
# integration extras, then flash_quant itself built in place (the C++ extension).
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  # 2.13.0 is the CPU wheel on our CI/dev machines; elsewhere pip picks the platform's build.
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q pybind11 ninja numpy pytest matplotlib setuptools wheel
# Optional integrations exercised by the tests (diffusers Flux, HF transformers) and
# Triton, whose kernels the tests run in interpreter mode on CPU.
"$PY" -m pip install -q "diffusers==0.42.1" "transformers==5.23.0" accelerate safetensors
if [ "$(uname -s)" = "Linux" ]; then
  "$PY" -m pip install -q "triton==3.6.0" || "$PY" -m pip install -q triton
fi
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import flash_quant, torch; print('flash_quant', flash_quant.__version__, 'torch', torch.__version__)"
