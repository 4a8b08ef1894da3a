"""Which backward matmuls can be 8-bit? An emulation against float64, on the CPU.

The attention backward has five products (the forward's Q·Kᵀ recomputed, then
dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q). Each variant below rounds the operands
of some of them to 8 bits (exactly the rounding the GPU kernel would apply: INT8 with a
per-row scale, or FP8 e4m3 with a per-row / per-block-per-channel scale), computes every
product in float64 otherwise, and reports dQ, dK, dV against the float64 gradient of the
*unquantized* attention (the bar of issue 4: cosine >= 0.999, rel-L2 <= 3 %).

Run:  python research/bwd_precision_study.py [--s 1024] [--d 64 128] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform

import torch

from flash_quant.testing import error_stats, make_qkv, reference_attention_backward

E4M3_MAX = 448.0


def q_int8_rows(x, smooth=False):
    """INT8 symmetric per-row (last dim is the dot dim) quantize-dequantize, optional
    smoothing by the mean over rows (the smoothed tensor is returned: softmax invariance
    makes that exact for K in Q·Kᵀ; callers that need the full K add the mean back)."""
    mean = x.mean(dim=-2, keepdim=True) if smooth else torch.zeros_like(x[..., :1, :])
    xs = x - mean
    s = xs.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127.0
    return torch.clamp(torch.round(xs / s), -127, 127) * s, mean


def q_fp8(x, dim, block=None):
    """FP8 e4m3 quantize-dequantize with an absmax scale reduced over `dim` (the dot's
    contraction dim), optionally in blocks of `block` along `dim`."""
    if block is None:
        s = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-30) / E4M3_MAX
        return (x / s).to(torch.float32).to(torch.float8_e4m3fn).to(torch.float64) * s
    chunks = []
    for c in torch.split(x, block, dim=dim):
        chunks.append(q_fp8(c, dim))
    return torch.cat(chunks, dim=dim)


def q_int8(x, dim):
    s = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-30) / 127.0
    return torch.clamp(torch.round(x / s), -127, 127) * s


def to16(x, dt):
    return x.to(dt).to(torch.float64)


def emulated_backward(q, k, v, do, variant, dt16):
    """float64 backward in which the operands of the chosen products are rounded."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    q64, k64, v64, do64 = (t.to(torch.float64) for t in (q, k, v, do))
    # Forward as the accurate preset runs it: Q and K INT8 per token, K smoothed.
    if variant["qk"] == "int8":
        qd, _ = q_int8_rows(q64)
        kd, kmean = q_int8_rows(k64, smooth=True)
    else:
        qd, kd, kmean = to16(q64, dt16), to16(k64, dt16), torch.zeros_like(k64[..., :1, :])
    s = (qd @ kd.transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)
    o = p @ to16(v64, dt16)
    o = to16(o, dt16)  # the forward output is stored in the input dtype
    delta = (do64 * o).sum(-1, keepdim=True)
    # dV = Pᵀ dO
    if variant["pdo"] == "fp8":
        pq = q_fp8(p, dim=-2, block=64)  # P column scale per block of 64 queries
        dov = q_fp8(do64, dim=-2, block=64)  # dO per block of 64 queries, per channel
        dv = pq.transpose(-1, -2) @ dov
    elif variant["pdo"] == "int8":  # P with the forward's fixed 1/127 scale
        pq = torch.round(p * 127.0) / 127.0
        dv = pq.transpose(-1, -2) @ q_int8(do64, dim=-2)
    elif variant["pdo"] == "int8b":  # P per key per block of 64 queries, dO per channel per block
        pq = torch.cat([q_int8(c, -2) for c in torch.split(p, 64, dim=-2)], dim=-2)
        dov = torch.cat([q_int8(c, -2) for c in torch.split(do64, 64, dim=-2)], dim=-2)
        dv = pq.transpose(-1, -2) @ dov
    else:
        dv = to16(p, dt16).transpose(-1, -2) @ to16(do64, dt16)
    # dP = dO Vᵀ
    if variant["dov"] == "int8":
        dp = q_int8(do64, -1) @ q_int8(v64, -1).transpose(-1, -2)
    elif variant["dov"] == "fp8":
        dp = q_fp8(do64, -1) @ q_fp8(v64, -1).transpose(-1, -2)
    else:
        dp = to16(do64, dt16) @ to16(v64, dt16).transpose(-1, -2)
    ds = p * (dp - delta)
    # dQ = scale dS K (full K: the smoothed K gives the same product, rows of dS sum to 0),
    # dK = scale dSᵀ Q
    kfull = kd + kmean
    if variant.get("center"):
        # the kernel's choice: dQ from mean-centred K (the smoothed K; or K minus its mean)
        kfull = kfull - kfull.mean(dim=-2, keepdim=True)
    if variant["ds"] == "int8":
        dq = scale * (q_int8(ds, -1) @ q_int8(kfull, -2))
        dk = scale * (q_int8(ds, -2).transpose(-1, -2) @ q_int8(qd, -2))
    elif variant["ds"] == "fp8":
        dq = scale * (q_fp8(ds, -1) @ q_fp8(kfull, -2))
        dk = scale * (q_fp8(ds, -2).transpose(-1, -2) @ q_fp8(qd, -2))
    else:
        dq = scale * (to16(ds, dt16) @ to16(kfull, dt16))
        dk = scale * (to16(ds, dt16).transpose(-1, -2) @ to16(qd, dt16))
    return dq, dk, dv


VARIANTS = {
    "all 16-bit": dict(qk="16", pdo="16", dov="16", ds="16"),
    "all 16-bit, dQ from centred K": dict(qk="16", pdo="16", dov="16", ds="16", center=True),
    "QK int8 (accurate fwd)": dict(qk="int8", pdo="16", dov="16", ds="16"),
    "QK int8, dQ from centred K (kernel)": dict(qk="int8", pdo="16", dov="16", ds="16", center=True),
    "QK int8 + PdO fp8": dict(qk="int8", pdo="fp8", dov="16", ds="16"),
    "QK int8 + PdO int8 (P 1/127)": dict(qk="int8", pdo="int8", dov="16", ds="16"),
    "QK int8 + PdO int8 (blockwise)": dict(qk="int8", pdo="int8b", dov="16", ds="16"),
    "QK int8 + PdO fp8 + dOV int8": dict(qk="int8", pdo="fp8", dov="int8", ds="16"),
    "QK int8 + PdO fp8 + dOV fp8": dict(qk="int8", pdo="fp8", dov="fp8", ds="16"),
    "QK int8 + PdO fp8 + dS int8": dict(qk="int8", pdo="fp8", dov="16", ds="int8"),
    "QK int8 + PdO fp8 + dS fp8": dict(qk="int8", pdo="fp8", dov="16", ds="fp8"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--s", type=int, default=1024)
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--bh", type=int, default=2, help="heads (batch 1)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dt16 = getattr(torch, args.dtype)
    rows = []
    for family in ("normal", "realistic"):
        for d in args.d:
            # Inputs already in the 16-bit type (as in training), so the fp64 reference is
            # the exact gradient of the very inputs the kernel sees.
            q, k, v = (t.to(dt16).float() for t in
                       make_qkv(1, args.bh, args.s, d, family=family, seed=1234 + d))
            do = torch.randn(q.shape, generator=torch.Generator().manual_seed(7 + d))
            do = do.to(dt16).float()
            ref = reference_attention_backward(do, q, k, v)
            for name, var in VARIANTS.items():
                got = emulated_backward(q, k, v, do, var, dt16)
                st = [error_stats(g, r) for g, r in zip(got, ref)]
                rows.append(dict(family=family, d=d, variant=name,
                                 **{f"{n}_cos": s["cosine"] for n, s in zip("qkv", st)},
                                 **{f"{n}_rel": s["rel_l2"] for n, s in zip("qkv", st)}))
    print(f"# S={args.s}, B=1, H={args.bh}, 16-bit type {args.dtype}; error vs fp64 gradient of "
          f"unquantized attention; {datetime.date.today()} torch {torch.__version__} "
          f"{platform.machine()} CPU")
    print("| family | D | variant | dQ rel-L2 | dK rel-L2 | dV rel-L2 | min cosine |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mc = min(r["q_cos"], r["k_cos"], r["v_cos"])
        print(f"| {r['family']} | {r['d']} | {r['variant']} | {100*r['q_rel']:.2f} % | "
              f"{100*r['k_rel']:.2f} % | {100*r['v_rel']:.2f} % | {mc:.5f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), date=str(datetime.date.today()),
                           torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
