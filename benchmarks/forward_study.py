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
* ``FOLD``: the int32 -> fp32 magic subtraction folded into the K-scale multiply (one FMA).
* ``LAZY``: FA4's conditional rescale (only when a row max grew by more than 2**8).
* ``EXP16``: exponentials as ``ex2.approx.f16x2`` (inline PTX; on sm_90 ptxas splits it
  into two MUFU ops, so it saves nothing on Hopper).
* ``LSUM_DOT``: row sums of P by a tensor-core dot with a tile of ones.

``_pipe_kernel`` is the key loop software-pipelined by hand (Q·Kᵀ of tile j issued with
P·V of tile j-1). Results: benchmarks/results/forward_study_2026-11-23.md (runs 1-4; run 4
is the A/B of the winners inside the product kernel, where neither helped).

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


# P codes of the INT8 P·V through packed half-precision math, four scores per asm block:
# two cvt.rn.f16x2.f32, two ex2.approx.f16x2 (one MUFU op per two exponentials), one fma
# per pair computing 1536 + 127·e rounded to the nearest integer (the fp16 ulp in
# [1024, 2048) is 1), and a byte permute collecting the four low bytes (= the codes).
# Outputs: the int8 codes (one register) and the codes as fp16 values (for the row sum).
_EXP16_CODES = tl.constexpr("""
{
.reg .b32 h01, h23, c01, c23, k127, kbias;
mov.b32 k127, 0x57F057F0;
mov.b32 kbias, 0x66006600;
cvt.rn.f16x2.f32 h01, $4, $3;
cvt.rn.f16x2.f32 h23, $6, $5;
ex2.approx.f16x2 h01, h01;
ex2.approx.f16x2 h23, h23;
fma.rn.f16x2 c01, h01, k127, kbias;
fma.rn.f16x2 c23, h23, k127, kbias;
prmt.b32 $0, c01, c23, 0x6420;
sub.rn.f16x2 $1, c01, kbias;
sub.rn.f16x2 $2, c23, kbias;
}
""")
# The same without the fp16 code values (the row sum then comes from a tensor-core dot).
_EXP16_CODES_ONLY = tl.constexpr("""
{
.reg .b32 h01, h23, c01, c23, k127, kbias;
mov.b32 k127, 0x57F057F0;
mov.b32 kbias, 0x66006600;
cvt.rn.f16x2.f32 h01, $2, $1;
cvt.rn.f16x2.f32 h23, $4, $3;
ex2.approx.f16x2 h01, h01;
ex2.approx.f16x2 h23, h23;
fma.rn.f16x2 c01, h01, k127, kbias;
fma.rn.f16x2 c23, h23, k127, kbias;
prmt.b32 $0, c01, c23, 0x6420;
}
""")
# fp16 P = exp2(x) for a 16-bit P·V with fp16 V: one cvt and one MUFU op per two scores.
_EXP16_P = tl.constexpr("""
{
.reg .b32 h;
cvt.rn.f16x2.f32 h, $2, $1;
ex2.approx.f16x2 $0, h;
}
""")


@triton.jit
def _study_kernel(Q, K, V, QS, KS, VS, O, desc_k, desc_v, sm_scale, H, S,
                  PV: tl.constexpr, MAGIC_CVT: tl.constexpr, TILE_MAX_P: tl.constexpr,
                  TMA: tl.constexpr, WS: tl.constexpr, FOLD: tl.constexpr, LAZY: tl.constexpr,
                  EXP16: tl.constexpr, LSUM_DOT: tl.constexpr,
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
    l_acc = tl.zeros((BLOCK_M, 16), tl.float32)  # LSUM_DOT: row sums from P @ ones
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start_n in tl.range(0, S, BLOCK_N, warp_specialize=WS):
        offs_n = start_n + offs_nb
        if TMA:
            k = desc_k.load([(bh * S + start_n).to(tl.int32), 0])
        else:
            k = tl.load(K + bh * S * D + offs_n[:, None] * D + offs_d[None, :])
        qk_i = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
        ks = tl.load(KS + bh * S + offs_n)
        if FOLD:  # the magic constant's subtraction folded into the K-scale multiply
            t = tl.fma((qk_i + 0x4B400000).to(tl.float32, bitcast=True), ks[None, :],
                       (ks * -12582912.0)[None, :])
        else:
            t = _i2f(qk_i, MAGIC_CVT) * ks[None, :]
        m_tile = tl.max(t, 1) * qs2
        if LAZY:  # rescale only when some row's max grew by more than 2**8 (FA4's rule)
            if tl.max(m_tile - m_i, 0) > 8.0:
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                l_acc = l_acc * alpha[:, None]
                m_i = m_new
        else:
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.math.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            l_acc = l_acc * alpha[:, None]
            m_i = m_new
        if PV == 1 and TILE_MAX_P:
            x = t * qs2[:, None] - m_tile[:, None]
            beta = tl.math.exp2(m_tile - m_i)
            if EXP16:
                if LSUM_DOT:
                    pq = tl.inline_asm_elementwise(_EXP16_CODES_ONLY, "=r,r,r,r,r", [x], dtype=tl.int8,
                                                   is_pure=True, pack=4)
                else:
                    pq, c16 = tl.inline_asm_elementwise(_EXP16_CODES, "=r,=r,=r,r,r,r,r", [x],
                                                        dtype=(tl.int8, tl.float16), is_pure=True, pack=4)
                    l_i += beta * (tl.sum(c16.to(tl.float32), 1) * (1.0 / 127.0))
            else:
                e = tl.math.exp2(x)
                pq = _f2i8(e * 127.0, MAGIC_CVT)
                if not LSUM_DOT:
                    l_i += beta * tl.sum(e, 1)
            if LSUM_DOT:
                ones = tl.full((BLOCK_N, 16), 1, tl.int8)
                l_acc += _i2f(tl.dot(pq, ones, out_dtype=tl.int32), True) * (beta * (1.0 / 127.0))[:, None]
        else:
            x = t * qs2[:, None] - m_i[:, None]
            if EXP16:
                p = tl.inline_asm_elementwise(_EXP16_P, "=r,r,r", [x], dtype=tl.float16, is_pure=True, pack=2)
            else:
                p = tl.math.exp2(x)
            if PV == 0:
                p = p.to(tl.float16 if EXP16 else tl.bfloat16)
                if LSUM_DOT:
                    l_acc = tl.dot(p, tl.full((BLOCK_N, 16), 1.0, p.dtype), l_acc)
                else:
                    l_i += tl.sum(p.to(tl.float32), 1)
            else:
                l_i += tl.sum(p, 1)
        if PV == 0:
            if TMA:
                v = desc_v.load([(bh * S + start_n).to(tl.int32), 0])
            else:
                v = tl.load(V + bh * S * D + offs_n[:, None] * D + offs_d[None, :])
            acc = tl.dot(p, v, acc)
        else:
            if TMA:
                vt = desc_v.load([(bh * D).to(tl.int32), start_n])
            else:  # V stored K-major: (B, H, D, S)
                vt = tl.load(V + bh * S * D + offs_d[:, None] * S + offs_n[None, :])
            if PV == 2:
                acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc, max_num_imprecise_acc=BLOCK_N)
            elif TILE_MAX_P:
                pv = _i2f(tl.dot(pq, tl.trans(vt), out_dtype=tl.int32), MAGIC_CVT)
                acc += pv * (beta * (1.0 / 127.0))[:, None]
            else:
                tmax = tl.max(p, 1)
                psc = tl.where(tmax > 0.0, tmax * (1.0 / 127.0), 1.0)
                pq = _f2i8(p / psc[:, None], MAGIC_CVT)
                acc += _i2f(tl.dot(pq, tl.trans(vt), out_dtype=tl.int32), MAGIC_CVT) * psc[:, None]
    if LSUM_DOT:
        l_i = tl.sum(l_acc, 1) * (1.0 / 16.0)
    out = acc / l_i[:, None]
    if PV != 0:
        out = out * tl.load(VS + bh * D + offs_d)[None, :]
    tl.store(O + bh * S * D + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty))


@triton.jit
def _pipe_scores(q, K, KS, bh, S, start_n, offs_d, offs_nb, FOLD: tl.constexpr, D: tl.constexpr):
    """Scores of one key tile without the per-row factor: int32 Q·Kᵀ times the K scales."""
    offs_n = start_n + offs_nb
    k = tl.load(K + bh * S * D + offs_n[:, None] * D + offs_d[None, :])
    qk_i = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    ks = tl.load(KS + bh * S + offs_n)
    if FOLD:
        return tl.fma((qk_i + 0x4B400000).to(tl.float32, bitcast=True), ks[None, :], (ks * -12582912.0)[None, :])
    else:
        return _i2f(qk_i, True) * ks[None, :]


@triton.jit
def _pipe_kernel(Q, K, V, QS, KS, VS, O, sm_scale, H, S,
                 PV: tl.constexpr, FOLD: tl.constexpr, LAZY: tl.constexpr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Software-pipelined key loop (FA3's intra-warpgroup overlap, written by hand): the
    Q·Kᵀ of tile j and the P·V of tile j-1 are issued together, so the softmax of tile j
    runs while the tensor cores do P·V(j-1). PV 0: bf16 P·V; 1: INT8 P·V with the tile-max
    P codes (its int32 product is a separate accumulator, added after the softmax).
    Non-causal, S a multiple of BLOCK_N, (B, H, S, D) contiguous; V K-major for PV 1."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_nb = tl.arange(0, BLOCK_N)
    q = tl.load(Q + bh * S * D + offs_m[:, None] * D + offs_d[None, :])
    qs2 = tl.load(QS + bh * S + offs_m) * (sm_scale * 1.4426950408889634)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    # prologue: tile 0's softmax
    t = _pipe_scores(q, K, KS, bh, S, 0, offs_d, offs_nb, FOLD, D)
    m_tile = tl.max(t, 1) * qs2
    m_i = m_tile
    e = tl.math.exp2(t * qs2[:, None] - m_tile[:, None])
    l_i = tl.sum(e, 1)
    beta = tl.full((BLOCK_M,), 1.0, tl.float32)
    if PV == 0:
        p = e.to(V.dtype.element_ty)
    else:
        p = _f2i8(e * 127.0, True)
    for j in range(0, S - BLOCK_N, BLOCK_N):
        start_n = j + BLOCK_N
        t = _pipe_scores(q, K, KS, bh, S, start_n, offs_d, offs_nb, FOLD, D)  # QK(j) issued
        prev = start_n - BLOCK_N + offs_nb
        if PV == 0:
            v = tl.load(V + bh * S * D + prev[:, None] * D + offs_d[None, :])
            acc = tl.dot(p, v, acc)  # P·V(j-1) issued, in flight during the softmax below
        else:
            vt = tl.load(V + bh * S * D + offs_d[:, None] * S + prev[None, :])
            pv_i = tl.dot(p, tl.trans(vt), out_dtype=tl.int32)
        m_tile = tl.max(t, 1) * qs2
        if LAZY:
            if tl.max(m_tile - m_i, 0) > 8.0:
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                beta = beta * alpha
                m_i = m_new
            alpha = tl.full((BLOCK_M,), 1.0, tl.float32)
        else:
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            m_i = m_new
        if PV == 0:
            e = tl.math.exp2(t * qs2[:, None] - m_i[:, None])
            l_i += tl.sum(e, 1)
            if not LAZY:
                acc = acc * alpha[:, None]  # after the exponentials: the wait for P·V(j-1) comes late
            p = e.to(V.dtype.element_ty)
        else:
            e = tl.math.exp2(t * qs2[:, None] - m_tile[:, None])
            beta_new = tl.math.exp2(m_tile - m_i)
            l_i += beta_new * tl.sum(e, 1)
            p = _f2i8(e * 127.0, True)
            acc += _i2f(pv_i, True) * (beta * (1.0 / 127.0))[:, None]
            if not LAZY:
                acc = acc * alpha[:, None]
            beta = beta_new
    last = S - BLOCK_N + offs_nb
    if PV == 0:
        v = tl.load(V + bh * S * D + last[:, None] * D + offs_d[None, :])
        acc = tl.dot(p, v, acc)
        out = acc / l_i[:, None]
    else:
        vt = tl.load(V + bh * S * D + offs_d[:, None] * S + last[None, :])
        acc += _i2f(tl.dot(p, tl.trans(vt), out_dtype=tl.int32), True) * (beta * (1.0 / 127.0))[:, None]
        out = acc / l_i[:, None] * tl.load(VS + bh * D + offs_d)[None, :]
    tl.store(O + bh * S * D + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty))


def _quantize(q, k, v, pv, v16=False):
    """Per-token INT8 Q/K (K smoothed), V per the P·V mode (pv 0: bf16, or fp16 with
    `v16`); returns kernel operands."""
    def per_token(x):
        s = x.float().abs().amax(-1).clamp_min(1e-8) / 127.0
        return torch.round(x.float() / s[..., None]).clamp(-127, 127).to(torch.int8).contiguous(), s.contiguous()

    qi, qs = per_token(q)
    ki, ks = per_token(k - k.mean(dim=2, keepdim=True))
    if pv == 0:
        return qi, qs, ki, ks, (v.half() if v16 else v).contiguous(), qs  # VS unused
    vmax = v.float().abs().amax(dim=2)  # (B, H, D)
    if pv == 1:
        vs = vmax.clamp_min(1e-8) / 127.0
        vc = torch.round(v.float() / vs[:, :, None, :]).clamp(-127, 127).to(torch.int8)
    else:
        vs = vmax.clamp_min(1e-8) / 448.0
        vc = (v.float() / vs[:, :, None, :]).to(torch.float8_e4m3fn)
    return qi, qs, ki, ks, vc.transpose(2, 3).contiguous(), vs.contiguous()


KNOBS = dict(pv=0, magic=True, tile=False, tma=False, ws=False, fold=False, lazy=False, exp16=False, lsum=False,
             pipe=False)


def variant_name(knobs):
    """'pv1 magic=1 tma=0' plus every non-default technique knob."""
    name = f"pv{knobs['pv']} magic={int(knobs['magic'])} tma={int(knobs['tma'])}"
    if knobs["pv"] == 1 and not knobs["tile"]:
        name += " tilemax=0"
    for key in ("ws", "fold", "lazy", "exp16", "lsum", "pipe"):
        if knobs[key]:
            name += f" {key}=1"
    return name


def run_variant(q, k, v, knobs, bm, bn, warps, stages, check=True):
    B, H, S, D = q.shape
    pv = knobs["pv"]
    qi, qs, ki, ks, vc, vs = _quantize(q, k, v, pv, v16=knobs["exp16"])
    out = torch.empty_like(q)
    desc_k = desc_v = None
    if knobs["tma"]:
        desc_k = TensorDescriptor.from_tensor(ki.view(B * H * S, D), [bn, D])
        if pv == 0:
            desc_v = TensorDescriptor.from_tensor(vc.view(B * H * S, D), [bn, D])
        else:
            desc_v = TensorDescriptor.from_tensor(vc.view(B * H * D, S), [D, bn])
    grid = (S // bm, B * H)

    def launch():
        if knobs["pipe"]:
            _pipe_kernel[grid](qi, ki, vc, qs, ks, vs, out, 1.0 / math.sqrt(D), H, S, PV=pv, FOLD=knobs["fold"],
                               LAZY=knobs["lazy"], D=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                               num_stages=stages)
            return
        _study_kernel[grid](qi, ki, vc, qs, ks, vs, out, desc_k, desc_v, 1.0 / math.sqrt(D), H, S,
                            PV=pv, MAGIC_CVT=knobs["magic"], TILE_MAX_P=knobs["tile"], TMA=knobs["tma"],
                            WS=knobs["ws"], FOLD=knobs["fold"], LAZY=knobs["lazy"], EXP16=knobs["exp16"],
                            LSUM_DOT=knobs["lsum"], D=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                            num_stages=stages)

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
    ap.add_argument("--recipes", default="accurate,accurate-vT,fast", help="product recipes (--product)")
    ap.add_argument("--configs", default="", help="BLOCK_M/BLOCK_N/warps/stages,... (default: four)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting variants after this")
    args = ap.parse_args()
    t_start = time.time()
    torch.manual_seed(0)
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    variants = []
    for pv, magic, tma in itertools.product((0, 1, 2), (False, True), (False, True)):
        variants.append(dict(KNOBS, pv=pv, magic=magic, tma=tma, tile=pv == 1))
    variants.append(dict(KNOBS, pv=1, tile=False))
    variants.append(dict(KNOBS, pv=0, tma=True, ws=True))
    variants.append(dict(KNOBS, pv=1, tile=True, tma=True, ws=True))
    # instruction-count techniques (run 3): each alone on the two product recipes, then combined
    for pv in (0, 1):
        base = dict(KNOBS, pv=pv, tile=pv == 1)
        for extra in ({"fold": True}, {"lazy": True}, {"exp16": True}, {"lsum": True},
                      {"fold": True, "lazy": True, "exp16": True},
                      {"fold": True, "lazy": True, "exp16": True, "lsum": True}):
            variants.append(dict(base, **extra))
    # hand-pipelined key loop (run 4): Q·Kᵀ(j) and P·V(j-1) issued together
    for pv in (0, 1):
        for extra in ({}, {"fold": True}, {"fold": True, "lazy": True}):
            variants.append(dict(KNOBS, pv=pv, tile=pv == 1, pipe=True, **extra))
    variants = [(variant_name(v), v) for v in variants]
    if args.variants:
        keep = args.variants.split(",")
        variants = [v for v in variants if any(k == v[0] for k in keep)]
    configs = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3)]
    if args.configs:
        configs = [tuple(int(x) for x in c.split("/")) for c in args.configs.split(",")]
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
            for recipe in args.recipes.split(","):
                for cfg in configs:
                    try:
                        ms = product_ms(q, k, v, recipe, cfg)
                        print(f"| product {recipe} | {'/'.join(map(str, cfg))} | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                              f"{base['cudnn'] / ms:.2f} | |", flush=True)
                    except Exception as exc:
                        print(f"| product {recipe} | {'/'.join(map(str, cfg))} | failed: {str(exc)[:80]} | | | |")
        for name, knobs in variants:
            if knobs["tma"] and TensorDescriptor is None:
                continue
            best = None
            each = []
            for bm, bn, w, st in configs:
                if time.time() - t_start > args.budget_s:
                    print("(budget reached)")
                    return
                try:
                    ms, err = run_variant(q, k, v, knobs, bm, bn, w, st, check=False)
                except Exception as exc:  # a config the compiler refuses: report, go on
                    print(f"| {name} | {bm}/{bn}/{w}/{st} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]} | | | |")
                    continue
                each.append(f"{bm}/{bn}/{w}/{st}={ms:.3f}")
                if best is None or ms < best[0]:
                    best = (ms, (bm, bn, w, st))
            if best is None:
                continue
            ms, cfg = best
            _, err = run_variant(q, k, v, knobs, *cfg, check=True)
            print(f"| {name} | {'/'.join(map(str, cfg))} | {ms:.3f} | {flops / ms / 1e9:.0f} | "
                  f"{base['cudnn'] / ms:.2f} | {err * 100:.2f}% |  ({', '.join(each)})", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
