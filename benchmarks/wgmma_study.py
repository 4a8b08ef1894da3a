"""Study: the Gluon wgmma forward kernels (benchmarks/wgmma_kernels.py) against the Triton
forward kernel and SDPA cuDNN / flash, on the same run, at forced configs.

For each shape and recipe (accurate: INT8 Q·Kᵀ + bf16 P·V; fast: INT8 P·V too) the
operands are quantized once (the presets' per-token Q / K, K smoothed, V per channel);
both kernels then run on the same codes. Reports ms, TFLOPS (4·B·H·Sq·Skv·D, halved for
causal), ratio to cuDNN and rel-L2 of each output against an fp32 SDPA of the float
inputs (and of the Gluon output against the Triton one).

Run on a Hopper GPU:  python benchmarks/wgmma_study.py [--shapes flux,b4,b4c,d64]
"""
from __future__ import annotations

import argparse
import sys
import os

import torch
import triton

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

from flash_quant.cuda import autotune, forward  # noqa: E402
from flash_quant.testing import kernel_operands  # noqa: E402

import wgmma_kernels as forward_wgmma  # noqa: E402  (this folder)

SHAPES = {"flux": (1, 24, 4608, 128, False), "b4": (4, 32, 4096, 128, False),
          "b4c": (4, 32, 4096, 128, True), "d64": (8, 32, 2048, 64, False),
          "d64c": (8, 32, 2048, 64, True), "odd": (2, 4, 1000, 128, True)}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bench(f):
    f()
    torch.cuda.synchronize()
    return triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux,b4,b4c,d64,odd")
    ap.add_argument("--recipes", default="accurate,fast")
    ap.add_argument("--configs", default="128/128/2/8,128/128/3/8,128/64/2/8,128/64/3/8",
                    help="Gluon configs BLOCK_M/BLOCK_N/NUM_BUF/warps, or ws:BLOCK_M/BLOCK_N/NUM_BUF/consumer registers "
                         "(the warp-specialized ping-pong kernel)")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name in args.shapes.split(","):
        B, H, S, D, causal = SHAPES[name]
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * S * S * D / (2 if causal else 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        line = f"### {name} {B}x{H}x{S}x{D} causal={causal}:"
        for be, tag in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")):
            with sdpa_kernel([be]):
                ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
            line += f" {tag} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOPS)"
            if tag == "cudnn":
                cudnn = ms
        print(line)
        print("| recipe | kernel | config | ms | TFLOPS | x cuDNN | rel-L2 fp32 | vs Triton |")
        print("|---|---|---|---|---|---|---|---|")
        for recipe in args.recipes.split(","):
            kw, pv = kernel_operands(q, k, v, recipe)
            ph = lambda x: torch.empty((), dtype=x.dtype, device=x.device).expand(x.shape)  # noqa: E731
            vv = ph(v) if recipe == "fast" else v
            tri = lambda: forward.attention_forward_launch(ph(q), ph(k), vv, pv_precision=pv,  # noqa: E731
                                                           is_causal=causal, **kw)
            o_t, l_t = tri()
            ms = bench(tri)
            print(f"| {recipe} | triton | autotuned | {ms:.3f} | {flops / ms / 1e9:.0f} | {cudnn / ms:.2f} | "
                  f"{rel(o_t, ref):.4f} | |")
            p = forward.plan(ph(q), ph(k), vv, pv_precision=pv, is_causal=causal, **kw)
            why = forward_wgmma.ineligible(p)
            if why:
                print(f"| {recipe} | wgmma | - | ineligible: {why} | | | | |")
                continue
            for cfg in args.configs.split(","):
                pp = cfg.startswith("ws:")
                bm, bn, nb, nw = (int(x) for x in cfg.removeprefix("ws:").split("/"))
                out = torch.empty_like(o_t)
                lse = torch.empty_like(l_t)
                f = lambda: forward_wgmma.launch(p, out, lse, bm, bn, nb, nw if not pp else 4, pp, nw if pp else 240)  # noqa: E731
                try:
                    ms = bench(f)
                except Exception as exc:  # a config that does not compile / fit
                    print(f"| {recipe} | wgmma | {cfg} | failed: {type(exc).__name__}: {str(exc)[:150]} | | | | |")
                    continue
                f()
                lse_err = (lse - l_t).abs().max().item()
                print(f"| {recipe} | wgmma | {cfg} | {ms:.3f} | {flops / ms / 1e9:.0f} | {cudnn / ms:.2f} | "
                      f"{rel(out, ref):.4f} | {rel(out, o_t):.2e} (lse {lse_err:.1e}) |")
        sys.stdout.flush()
    print(autotune.describe())


if __name__ == "__main__":
    main()
