"""Would one Q or K scale per block of rows cost accuracy? (issue 17, session 7)

A per-key-tile K scale would let the sm90 kernel drop one FFMA per score and the per-key
scale loads (1.13-1.24x kernel-only on the H200, docs/hopper.md "Session 7"). This measures
what it costs: rel-L2 against the float64 reference of the accurate and fast presets with
K (or Q) scaled per token, as the presets are, and per block of rows, on the CPU backend,
for N(0, 1), the outlier family, and inputs with uneven row norms (log-normal norms, one
sink row 30x, one row in 97 8x).

    python research/scale_granularity_study.py [--shape 1,4,2048,128] [--seed 3]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

import flash_quant
from flash_quant.config import PerBlock, PerToken, get_preset
from flash_quant.testing import make_qkv, reference_attention


def rel_l2(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def with_granularity(preset: str, role: str, granularity):
    cfg = get_preset(preset)
    operand = dataclasses.replace(getattr(cfg, role), granularity=granularity)
    return dataclasses.replace(cfg, **{role: operand}, name=f"{preset}-{role}-{granularity.name}")


def input_families(b, h, s, d, seed):
    for family in ("normal", "realistic"):
        yield family, make_qkv(b, h, s, d, family=family, seed=seed)
    q, k, v = make_qkv(b, h, s, d, family="realistic", seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    norms = torch.exp(0.5 * torch.randn(b, h, s, 1, generator=g))
    yield "lognormal row norms (Q and K)", (q * norms, k * norms, v)
    q1, k1 = q.clone(), k.clone()
    q1[:, :, 0] *= 30.0
    k1[:, :, 0] *= 30.0
    yield "one sink row 30x (Q and K)", (q1, k1, v)
    q2, k2 = q.clone(), k.clone()
    q2[:, :, ::97] *= 8.0
    k2[:, :, ::97] *= 8.0
    yield "one row in 97 8x (Q and K)", (q2, k2, v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,4,2048,128", help="B,H,S,D")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    b, h, s, d = (int(x) for x in args.shape.split(","))
    cases = [("accurate", "k", PerToken()), ("accurate", "k", PerBlock(128)), ("accurate", "q", PerBlock(64)),
             ("fast", "k", PerToken()), ("fast", "k", PerBlock(128))]
    print(f"rel-L2 vs float64, CPU, B,H,S,D = {args.shape}, torch {torch.__version__}")
    print("| input | " + " | ".join(f"{p} {r.upper()} {g.name}{'' if g.name == 'per_token' else f'({g.rows})'}"
                                     for p, r, g in cases) + " |")
    print("|---|" + "---:|" * len(cases))
    for family, (q, k, v) in input_families(b, h, s, d, args.seed):
        ref = reference_attention(q, k, v)
        errs = [rel_l2(flash_quant.attention(q, k, v, config=with_granularity(p, r, g)), ref) for p, r, g in cases]
        print(f"| {family} | " + " | ".join(f"{e:.2%}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
