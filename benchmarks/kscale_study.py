"""Study: does a K scale constant along the keys make the Triton forward faster?

The forward kernel multiplies every score by its key's K scale (per-token K) and converts
the int32 Q·Kᵀ tile with an add and a subtract. With one K scale per head the scale joins
the per-row factor and the conversion's offset the per-row constant of the one FMA per
score (flash_quant/cuda/forward.py, KS_CONST): offline (``python tools/kernel_registers.py
--sass --recipes accurate accurate-khead fast fast-khead``) that takes the key loop from
11.2 to 8.5 SASS instructions per score (accurate, 128/128/8/3) and from 15.4 to 13.5
(fast, 64/128/4/3). This times the kernel both ways on the same data at forced configs,
with cuDNN in the same run, and reports the error of each against an fp32 SDPA of the
float inputs (per-head K scales are coarser: the speed is only worth having with K
scales per key tile, which the op does not take yet).

Run on the GPU:  python benchmarks/kscale_study.py [--shapes flux,b4,d64]
"""
from __future__ import annotations

import argparse

import torch
import triton

import flash_quant  # noqa: F401  (registers the ops)
from flash_quant.cuda import autotune
from flash_quant.cuda.forward import attention_forward_launch
from flash_quant.testing import kernel_operands

SHAPES = {"flux": (1, 24, 4608, 128), "b4": (4, 32, 4096, 128), "d64": (8, 32, 2048, 64)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux,b4,d64")
    ap.add_argument("--configs", default="128/128/8/3,64/128/4/3,128/64/4/3,64/64/4/3")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name in args.shapes.split(","):
        B, H, S, D = SHAPES[name]
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * S * S * D
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
            f()
            cudnn = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        print(f"### {name} {B}x{H}x{S}x{D}: cuDNN {cudnn:.3f} ms ({flops / cudnn / 1e9:.0f} TFLOPS)")
        print("| recipe | K scale | config | ms | TFLOPS | x cuDNN | rel-L2 vs fp32 |")
        print("|---|---|---|---|---|---|---|")
        ph = lambda x: torch.empty((), dtype=x.dtype, device=x.device).expand(x.shape)  # noqa: E731
        for recipe in ("accurate", "fast"):
            for kgran in ("per_token", "per_head"):
                kw, pv = kernel_operands(q, k, v, recipe, kgran)
                vv = ph(v) if "v_data" in kw else v
                for cfg in args.configs.split(","):
                    config = autotune.Config(*(int(x) for x in cfg.split("/")))
                    g = lambda: attention_forward_launch(ph(q), ph(k), vv, pv_precision=pv,  # noqa: E731
                                                         config=config, num_splits=1, **kw)
                    try:
                        out, _ = g()
                        ms = triton.testing.do_bench(g, warmup=25, rep=100, return_mode="median")
                    except Exception as exc:  # e.g. out of shared memory for this tile
                        print(f"| {recipe} | {kgran} | {cfg} | failed: {type(exc).__name__} | | | |")
                        continue
                    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
                    print(f"| {recipe} | {kgran} | {cfg} | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                          f"{cudnn / ms:.2f} | {err:.4f} |", flush=True)


if __name__ == "__main__":
    main()
