"""Study: which Hopper techniques speed up an INT8 attention forward written in Triton?

A deliberately small kernel (non-causal, no masks, sequence a multiple of the key tile,
contiguous (B, H, S, D) inputs) with one constexpr per technique, timed against SDPA's
cuDNN / flash backends on the same run. Its results decide what goes into the product
kernel (flash_quant/cuda/forward.py); it is not used by the package.

Techniques (each a constexpr of ``_study_kernel``):

* ``MAGIC_CVT``: int32 -> fp32 of the Q·Kᵀ (and INT8 P·V) accumulators by adding the bits
  of 1.5·2**23 and subtracting it as a float (exact for |x| < 2**22: an INT8 dot over
  D <= 256 stays below 127·127·256 < 2**22), instead of the conversion instruction;
  fp32 -> int8 of P the same way round.
* ``TILE_MAX_P``: INT8 P·V reuses the key tile's row max: e = exp2(s - tile max) lies in
  [0, 1] with max exactly 1, so P's per-row-and-tile INT8 scale is 1/127 with no extra
  reduction; the tile's factor exp2(tile max - running max) goes onto the int32 result.
* ``TMA``: K and V tiles through tensor descriptors (the copy engine) instead of
  pointer loads.
* ``WS``: ``tl.range(..., warp_specialize=True)`` on the key loop.
* ``PV``: 0 bf16 P·V, 1 INT8 P·V (V per channel, K-major), 2 FP8 e4m3 P·V.

Run on the GPU:  python benchmarks/forward_study.py  [--shapes flux,b4]
Prints one table: variant, config, ms, TFLOPS, ratio to cuDNN, rel-L2 against fp32.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older triton
    TensorDescriptor = None

MAGIC_F = 12582912.0  # 1.5 * 2**23
MAGIC_I = 0x4B400000  # its bits


@triton.jit
def _i2f(x, MAGIC: tl.constexpr):
    if MAGIC:
        return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return x.to(tl.float32)


@triton.jit
def _f2i8(x, MAGIC: tl.constexpr):
    """round-half-even of fp32 x in [-127, 127] to int8."""
    if MAGIC:
        return ((x + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)
    else:
        return ((x + 12582912.0) - 12582912.0).to(tl.int8)  # what forward.py does today


@triton.jit
def _study_kernel(Q, K, V, QS, KS, VS, O, desc_k, desc_v, sm_scale, H, S,
                  PV: tl.constexpr, MAGIC_CVT: tl.constexpr, TILE_MAX_P: tl.constexpr,
                  TMA: tl.constexpr, WS: tl.constexpr,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_nb = tl.arange(0, BLOCK_N)
    q = tl.load(Q + bh * S * D + offs_m[:, None] * D + offs_d[None, :])
    qs2 = tl.load(QS + bh * S + offs_m) * (sm_scale * 1.4426950408889634)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start_n in tl.range(0, S, BLOCK_N, warp_specialize=WS):
        offs_n = start_n + offs_nb
        if TMA:
            k = desc_k.load([(bh * S + start_n).to(tl.int32), 0])
        else:
            k = tl.load(K + bh * S * D + offs_n[:, None] * D + offs_d[None, :])
        qk = _i2f(tl.dot(q, tl.trans(k), out_dtype=tl.int32), MAGIC_CVT)
        ks = tl.load(KS + bh * S + offs_n)
        t = qk * ks[None, :]
        m_tile = tl.max(t, 1) * qs2
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.math.exp2(m_i - m_new)
        if PV == 1 and TILE_MAX_P:
            e = tl.math.exp2(t * qs2[:, None] - m_tile[:, None])
            beta = tl.math.exp2(m_tile - m_new)
            l_i = l_i * alpha + beta * tl.sum(e, 1)
        else:
            p = tl.math.exp2(t * qs2[:, None] - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        if PV == 0:
            if TMA:
                v = desc_v.load([(bh * S + start_n).to(tl.int32), 0])
            else:
                v = tl.load(V + bh * S * D + offs_n[:, None] * D + offs_d[None, :])
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            if TMA:
                vt = desc_v.load([(bh * D).to(tl.int32), start_n])
            else:  # V stored K-major: (B, H, D, S)
                vt = tl.load(V + bh * S * D + offs_d[:, None] * S + offs_n[None, :])
            if PV == 2:
                acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc, max_num_imprecise_acc=BLOCK_N)
            elif TILE_MAX_P:
                pq = _f2i8(e * 127.0, MAGIC_CVT)
                pv = _i2f(tl.dot(pq, tl.trans(vt), out_dtype=tl.int32), MAGIC_CVT)
                acc += pv * (beta * (1.0 / 127.0))[:, None]
            else:
                tmax = tl.max(p, 1)
                psc = tl.where(tmax > 0.0, tmax * (1.0 / 127.0), 1.0)
                pq = _f2i8(p / psc[:, None], MAGIC_CVT)
                acc += _i2f(tl.dot(pq, tl.trans(vt), out_dtype=tl.int32), MAGIC_CVT) * psc[:, None]
    out = acc / l_i[:, None]
    if PV != 0:
        out = out * tl.load(VS + bh * D + offs_d)[None, :]
    tl.store(O + bh * S * D + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty))


def _quantize(q, k, v, pv):
    """Per-token INT8 Q/K (K smoothed), V per the P·V mode; returns kernel operands."""
    def per_token(x):
        s = x.float().abs().amax(-1).clamp_min(1e-8) / 127.0
        return torch.round(x.float() / s[..., None]).clamp(-127, 127).to(torch.int8).contiguous(), s.contiguous()

    qi, qs = per_token(q)
    ki, ks = per_token(k - k.mean(dim=2, keepdim=True))
    if pv == 0:
        return qi, qs, ki, ks, v.contiguous(), qs  # VS unused
    vmax = v.float().abs().amax(dim=2)  # (B, H, D)
    if pv == 1:
        vs = vmax.clamp_min(1e-8) / 127.0
        vc = torch.round(v.float() / vs[:, :, None, :]).clamp(-127, 127).to(torch.int8)
    else:
        vs = vmax.clamp_min(1e-8) / 448.0
        vc = (v.float() / vs[:, :, None, :]).to(torch.float8_e4m3fn)
    return qi, qs, ki, ks, vc.transpose(2, 3).contiguous(), vs.contiguous()


def run_variant(q, k, v, pv, magic, tile_max, tma, ws, bm, bn, warps, stages, check=True):
    B, H, S, D = q.shape
    qi, qs, ki, ks, vc, vs = _quantize(q, k, v, pv)
    out = torch.empty_like(q)
    desc_k = desc_v = None
    if tma:
        desc_k = TensorDescriptor.from_tensor(ki.view(B * H * S, D), [bn, D])
        if pv == 0:
            desc_v = TensorDescriptor.from_tensor(vc.view(B * H * S, D), [bn, D])
        else:
            desc_v = TensorDescriptor.from_tensor(vc.view(B * H * D, S), [D, bn])
    grid = (S // bm, B * H)

    def launch():
        _study_kernel[grid](qi, ki, vc, qs, ks, vs, out, desc_k, desc_v, 1.0 / math.sqrt(D), H, S,
                            PV=pv, MAGIC_CVT=magic, TILE_MAX_P=tile_max, TMA=tma, WS=ws, D=D,
                            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

    launch()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(launch, warmup=25, rep=100, return_mode="median")
    err = float("nan")
    if check:
        sl = slice(0, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, sl].float(), k[:, sl].float(), v[:, sl].float())
        err = ((out[:, sl].float() - ref).norm() / ref.norm()).item()
    return ms, err


def product_ms(q, k, v, recipe, cfg):
    """flash_quant's own forward kernel on pre-quantized operands at a forced config.
    recipe: "accurate" (bf16 V), "accurate-vT" (bf16 V stored K-major), "fast" (INT8 P·V)."""
    from flash_quant.cuda import autotune
    from flash_quant.cuda.forward import attention_forward_launch

    ops = torch.ops.flash_quant
    a, s, _, _ = ops.quantize(q, "int8", "per_token", 1, "symmetric", False)
    b, t, _, m = ops.quantize(k, "int8", "per_token", 1, "symmetric", True)
    kw = dict(q_data=a, q_scale=s, k_data=b, k_scale=t, k_mean=m)
    vv, pv = v, "none"
    if recipe == "accurate-vT":
        vv = v.transpose(2, 3).contiguous().transpose(2, 3)
    elif recipe == "fast":
        c, u, _, _ = ops.quantize(v, "int8", "per_channel", 1, "symmetric", False)
        kw.update(v_data=c, v_scale=u)
        pv = "int8"
    ph = lambda x: torch.empty((), dtype=x.dtype, device=x.device).expand(x.shape)  # noqa: E731
    config = autotune.Config(*cfg)
    f = lambda: attention_forward_launch(ph(q), ph(k), ph(v) if recipe == "fast" else vv,  # noqa: E731
                                         pv_precision=pv, config=config, **kw)
    f()
    return triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")


def sdpa_ms(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel([be]):
        f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
        f()
        return triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")


SHAPES = {"flux": (1, 24, 4608, 128), "b4": (4, 32, 4096, 128), "d64": (8, 32, 2048, 64)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux,b4")
    ap.add_argument("--variants", default="", help="comma-separated substrings: run only matching variants")
    ap.add_argument("--product", action="store_true", help="also time flash_quant's kernel")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting variants after this")
    args = ap.parse_args()
    t_start = time.time()
    torch.manual_seed(0)
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    variants = []
    # (name, pv, magic, tile_max, tma, ws)
    for pv, magic, tma in itertools.product((0, 1, 2), (False, True), (False, True)):
        tile = pv == 1
        variants.append((f"pv{pv} magic={int(magic)} tma={int(tma)}", pv, magic, tile, tma, False))
    variants.append(("pv1 magic=1 tma=0 tilemax=0", 1, True, False, False, False))
    variants.append(("pv0 magic=1 tma=1 ws=1", 0, True, False, True, True))
    variants.append(("pv1 magic=1 tma=1 ws=1", 1, True, True, True, True))
    if args.variants:
        keep = args.variants.split(",")
        variants = [v for v in variants if any(k == v[0] for k in keep)]
    configs = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3)]
    for sname in args.shapes.split(","):
        B, H, S, D = SHAPES[sname]
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * S * S * D
        base = {be: sdpa_ms(q, k, v, be) for be in ("cudnn", "flash")}
        print(f"\n## {sname} {B}x{H}x{S}x{D}: cuDNN {base['cudnn']:.3f} ms ({flops / base['cudnn'] / 1e9:.0f} TFLOPS), "
              f"flash {base['flash']:.3f} ms ({flops / base['flash'] / 1e9:.0f} TFLOPS)")
        print("| variant | config | ms | TFLOPS | x cuDNN | rel-L2 |")
        print("|---|---|---|---|---|---|")
        if args.product:
            import flash_quant  # noqa: F401  (registers the CUDA kernels)
            for recipe in ("accurate", "accurate-vT", "fast"):
                for cfg in configs:
                    try:
                        ms = product_ms(q, k, v, recipe, cfg)
                        print(f"| product {recipe} | {'/'.join(map(str, cfg))} | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                              f"{base['cudnn'] / ms:.2f} | |", flush=True)
                    except Exception as exc:
                        print(f"| product {recipe} | {'/'.join(map(str, cfg))} | failed: {str(exc)[:80]} | | | |")
        for name, pv, magic, tile, tma, ws in variants:
            if tma and TensorDescriptor is None:
                continue
            best = None
            each = []
            for bm, bn, w, st in configs:
                if time.time() - t_start > args.budget_s:
                    print("(budget reached)")
                    return
                try:
                    ms, err = run_variant(q, k, v, pv, magic, tile, tma, ws, bm, bn, w, st, check=False)
                except Exception as exc:  # a config the compiler refuses: report, go on
                    print(f"| {name} | {bm}/{bn}/{w}/{st} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]} | | | |")
                    continue
                each.append(f"{bm}/{bn}/{w}/{st}={ms:.3f}")
                if best is None or ms < best[0]:
                    best = (ms, (bm, bn, w, st))
            if best is None:
                continue
            ms, cfg = best
            _, err = run_variant(q, k, v, pv, magic, tile, tma, ws, *cfg, check=True)
            print(f"| {name} | {'/'.join(map(str, cfg))} | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                  f"{base['cudnn'] / ms:.2f} | {err * 100:.2f}% |  ({', '.join(each)})", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
