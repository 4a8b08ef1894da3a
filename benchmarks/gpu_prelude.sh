# Sourced by the GPU-call scripts (gpu_run.sh, gpu_final.sh, gpu_host_run.sh) after they
# set OUT: stamps the machine into $OUT/env.txt, installs carried wheels (.whl/*.whl,
# e.g. diffusers or sageattention) into a private site dir, builds the extension in place.
export PYTHONUNBUFFERED=1
{
  echo "== $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
echo "== build"
_fq_t0=$(date +%s)
MAX_JOBS="${MAX_JOBS:-16}" python3 -m pip install --no-build-isolation --no-deps -e . -q > "$OUT/build.txt" 2>&1 \
  || { tail -20 "$OUT/build.txt"; exit 1; }
echo "built in $(( $(date +%s) - _fq_t0 )) s"
