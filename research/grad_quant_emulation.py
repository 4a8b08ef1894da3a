"""Emulation (float64, CPU): which Q/K quantization would bring the accurate preset's
straight-through gradients under issue 4's 3 % bar on the realistic family at D = 64?

The straight-through gradient of a quantized forward is the exact attention gradient at
the dequantized operands, so it is emulated here without any kernel: rotate Q and K by
the Hadamard matrix (as the accurate preset does), smooth K (subtract its mean over the
sequence), quantize / dequantize, and compare autograd's float64 gradients at those
operands with the float64 gradients at the exact (rotated) inputs; rel-L2 is invariant
under the rotation. Variants:

* ``groups=G``: symmetric INT8 with one scale per token and per group of D/G channels
  (G = 1 is the preset's per-token scale);
* ``qonly`` / ``konly``: quantize one operand only (which one carries the error);
* ``norot``: no Hadamard rotation;
* ``kres``: K as INT8 codes plus INT8 codes of its rounding residual (two INT8 Q·Kᵀ dots);
* ``qres``: the same for Q instead of K;
* ``qsmooth``: Q smoothed too (its mean over the sequence subtracted before quantizing and
  added back exactly: a kernel would add the per-key bias mean(Q)·k_jᵀ to the scores,
  which softmax does not cancel — one extra vector per key tile);
* ``clip``: Q and K per-token scales clipped to the MSE-optimal fraction of the absmax
  (searched over 1.0, 0.95, ..., 0.7).

A second table keeps the preset's forward (INT8 Q, K: its lse and O) and recomputes the
backward's scores from other operands against that lse, as a flash backward does: the
quantized ones (the straight-through gradient), float K, or float Q and K.

Setting: make_qkv(1, 2, 1024, D, family="realistic", seed=s), scale 1/sqrt(D), dO ~ N(0,1).

    python research/grad_quant_emulation.py [--seeds 4] [--head-dims 64 128]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flash_quant.rotation import hadamard_matrix  # noqa: E402
from flash_quant.testing import make_qkv  # noqa: E402

VARIANTS = ("groups=1", "groups=2", "groups=4", "qonly", "konly", "norot", "kres", "qres", "qsmooth", "clip")


def attention(q, k, v, scale):
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, -1) @ v


def int8_qdq(x, groups=1):
    """Symmetric INT8 round trip with one scale per (token, group of channels)."""
    B, H, S, D = x.shape
    xg = x.reshape(B, H, S, groups, D // groups)
    s = xg.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (torch.round(xg / s).clamp(-127, 127) * s).reshape(B, H, S, D)


def int8_qdq_clipped(x, fractions=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)):
    """Symmetric INT8 per token, the scale clipped to the fraction of the absmax that
    minimises the token's squared rounding + clipping error."""
    amax = x.abs().amax(-1, keepdim=True)
    best = best_err = None
    for c in fractions:
        s = (amax * c / 127).clamp_min(1e-30)
        y = torch.round(x / s).clamp(-127, 127) * s
        err = (y - x).pow(2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = y, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, y, best), torch.where(better, err, best_err)
    return best


def operands(variant, q, k, H):
    rot = variant != "norot"
    qr, kr = (q @ H, k @ H) if rot else (q, k)
    km = kr.mean(-2, keepdim=True)
    groups = int(variant.split("=")[1]) if variant.startswith("groups=") else 1
    if variant == "konly":
        qd = qr
    elif variant == "qres":
        first = int8_qdq(qr)
        qd = first + int8_qdq(qr - first)
    elif variant == "qsmooth":
        qm = qr.mean(-2, keepdim=True)
        qd = int8_qdq(qr - qm) + qm
    elif variant == "clip":
        qd = int8_qdq_clipped(qr)
    else:
        qd = int8_qdq(qr, groups)
    if variant == "qonly":
        kd = kr
    elif variant == "kres":
        first = int8_qdq(kr - km)
        kd = first + int8_qdq(kr - km - first) + km
    elif variant == "clip":
        kd = int8_qdq_clipped(kr - km) + km
    else:
        kd = int8_qdq(kr - km, groups) + km
    return (qr, kr), (qd, kd)


def grads(q, k, v, do, scale):
    a = [t.clone().requires_grad_(True) for t in (q, k, v)]
    attention(*a, scale).backward(do)
    return [t.grad for t in a]


def flash_backward(o, lse, do, v, qb, kb, scale):
    """dQ, dK, dV from scores recomputed with (qb, kb) against the saved lse and O."""
    p = torch.exp((qb @ kb.transpose(-1, -2)) * scale - lse[..., None])
    ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    return ds @ kb * scale, ds.transpose(-1, -2) @ qb * scale, p.transpose(-1, -2) @ do


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args()
    print(f"torch {torch.__version__}; realistic family, B=1, H=2, S=1024; rel-L2 (%) of the "
          f"straight-through gradient vs the float64 gradient, seeds 0..{args.seeds - 1}")
    print("| D | variant | dQ | dK | dV |")
    print("|---|---|---|---|---|")
    for D in args.head_dims:
        H = hadamard_matrix(D, dtype=torch.float64)
        rows = {v: [] for v in VARIANTS}
        for seed in range(args.seeds):
            q, k, v = (t.double() for t in make_qkv(1, 2, 1024, D, family="realistic", seed=seed))
            do = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            for variant in VARIANTS:
                (qr, kr), (qd, kd) = operands(variant, q, k, H)
                ref = grads(qr, kr, v, do, 1 / math.sqrt(D))
                got = grads(qd, kd, v, do, 1 / math.sqrt(D))
                rows[variant].append([((g - r).norm() / r.norm()).item() * 100 for g, r in zip(got, ref)])
        for variant, errs in rows.items():
            cells = [" ".join(f"{e[i]:.2f}" for e in errs) for i in range(3)]
            print(f"| {D} | {variant} | {cells[0]} | {cells[1]} | {cells[2]} |", flush=True)
    print()
    print("Backward recompute against the quantized forward's lse and O (groups=1 forward):")
    print("| D | scores recomputed from | dQ | dK | dV |")
    print("|---|---|---|---|---|")
    for D in args.head_dims:
        H = hadamard_matrix(D, dtype=torch.float64)
        rows = {"quantized Q, K": [], "quantized Q, float K": [], "float Q, K": []}
        for seed in range(args.seeds):
            q, k, v = (t.double() for t in make_qkv(1, 2, 1024, D, family="realistic", seed=seed))
            do = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            scale = 1 / math.sqrt(D)
            (qr, kr), (qd, kd) = operands("groups=1", q, k, H)
            ref = grads(qr, kr, v, do, scale)
            s = (qd @ kd.transpose(-1, -2)) * scale
            lse, o = torch.logsumexp(s, -1), torch.softmax(s, -1) @ v
            for name, (qb, kb) in zip(rows, ((qd, kd), (qd, kr), (qr, kr))):
                got = flash_backward(o, lse, do, v, qb, kb, scale)
                rows[name].append([((g - r).norm() / r.norm()).item() * 100 for g, r in zip(got, ref)])
        for name, errs in rows.items():
            cells = [" ".join(f"{e[i]:.2f}" for e in errs) for i in range(3)]
            print(f"| {D} | {name} | {cells[0]} | {cells[1]} | {cells[2]} |", flush=True)


if __name__ == "__main__":
    main()
