"""Launch the Triton attention forward a few times on pre-quantized operands, for a
profiler to attach to (Nsight Compute: benchmarks/gpu_stall_run.sh). No timing here: the
profiler measures; warm-up launches come first so compilation and autotuning stay out of
the profiled launch.

    python benchmarks/ncu_forward.py [--shape 1,24,4608,128] [--recipe accurate|fast]
        [--kscale per_token|per_head] [--config 128/64/4/3] [--launches 5]
"""
from __future__ import annotations

import argparse

import torch

import flash_quant  # noqa: F401  (registers the ops)
from flash_quant.cuda import autotune
from flash_quant.cuda.forward import attention_forward_launch
from flash_quant.testing import kernel_operands


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1,24,4608,128")
    ap.add_argument("--recipe", choices=["accurate", "fast"], default="accurate")
    ap.add_argument("--kscale", choices=["per_token", "per_head"], default="per_token")
    ap.add_argument("--config", default="128/64/4/3", help="BLOCK_M/BLOCK_N/warps/stages")
    ap.add_argument("--launches", type=int, default=5)
    args = ap.parse_args()
    B, H, S, D = (int(x) for x in args.shape.split(","))
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kw, pv = kernel_operands(q, k, v, args.recipe, args.kscale)
    ph = lambda x: torch.empty((), dtype=x.dtype, device=x.device).expand(x.shape)  # noqa: E731
    vv = ph(v) if "v_data" in kw else v
    config = autotune.Config(*(int(x) for x in args.config.split("/")))
    for _ in range(args.launches):
        attention_forward_launch(ph(q), ph(k), vv, pv_precision=pv, config=config, num_splits=1, **kw)
    torch.cuda.synchronize()
    print(f"{args.launches} launches of the forward, {args.recipe}, K {args.kscale}, {config}, shape {args.shape}")


if __name__ == "__main__":
    main()
