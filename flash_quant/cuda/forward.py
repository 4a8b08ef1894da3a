"""Triton attention forward for flash_quant::attention_forward (CUDA key).

One program computes a BLOCK_M tile of query rows of one (batch, query head) against
all visible keys with an online softmax in fp32 (base 2: ``scale * log2(e)`` and the
per-row Q scale are folded into one factor). Q·Kᵀ modes (``QK_MODE``):

* QK_INT8: INT8 x INT8 on the tensor cores, int32 accumulation, times the two row
  scales;
* QK_INT4: packed INT4 x INT4: nibbles unpacked in registers to int8, two INT8 dots
  (even and odd columns of D) summed in int32;
* QK_FP8: FP8 x FP8 (e4m3 / e5m2, any mix), fp32 accumulation;
* QK_GENERIC: each operand's codes (minus its zero point) or float values converted to
  the 16-bit input type (exact for every code) — asymmetric, mixed-precision and
  unquantized inputs; fp32 inputs use tf32 dots.

P·V modes (``PV_MODE``): PV_16BIT P in the input's 16-bit type, V dequantized (or its
codes with the per-channel scale applied after the loop); PV_FP8_DOT P rounded to e4m3
times FP8 V on the tensor cores (V per-channel scale after the loop, fp32 promotion every
BLOCK_N <= 128 keys through ``max_num_imprecise_acc``); PV_INT8_DOT P quantized to int8
(scale: the row's max over the key tile / 127, computed as round(127 * exp2(s - tile
max))) times INT8 V, int32 per key block, rescaled per row; PV_FP8_ROUNDED /
PV_INT8_ROUNDED the same P roundings with a 16-bit dot for any other V.

Unmasked key blocks fold the per-row factor (Q scale * scale * log2 e) into one FMA per
score, which needs that factor > 0: the quantizers' scales are (an all-zero row gets 1)
and a non-positive softmax scale takes the explicit path (``SCALE_POS``). A K scale
constant along the keys (per head / per tensor, ``KS_CONST``) joins that factor, and on
full INT8 tiles the int32 -> fp32 conversion's offset joins the FMA's per-row constant
(``_folded_max``): 8.5 instead of 11.2 SASS instructions per score in the key loop,
0.55 -> 0.50 ms at the Flux shape (docs/studies.md, K scale constant along the keys).

Split-KV: when the query blocks cannot fill the GPU (decode: Sq <= 64), a third grid axis
splits the keys into ranges; each program writes its range's normalised fp32 output and
lse, and ``_combine_splits_kernel`` merges them (lse = logsumexp of the ranges' lse).

Causal blocks above the diagonal are skipped; only the diagonal / sequence-tail blocks
pay for masking. Tails are masked loads, the head dim is padded to a power of two by
masks. GQA maps query head h to kv head h // (Hq / Hkv); for short queries (Sq <= 64,
non-causal, no mask) the group's query heads are packed into one program's rows
(``PACK_GQA``), so each K/V tile is read once per kv head rather than once per query head. Fully masked rows give out 0 and
lse -inf. ``attention_forward_launch`` works on tensors of any device (CPU under
``TRITON_INTERPRET=1``); ``attention_forward_cuda`` is the op kernel registered at import:
it serves a call with this kernel or, on Hopper, the sm90 CUDA C++ kernel, as
flash_quant/cuda/dispatch.py decides (docs/hopper.md).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _C  # noqa: F401  (defines the op schemas)
from ..support import HEAD_DIM_RULE, head_dim_supported
from . import autotune
from .common import (
    KIND_FLOAT,
    KIND_FP8,
    KIND_INT4,
    KIND_INT8,
    MASK_ADDITIVE,
    MASK_BOOL,
    MASK_NONE,
    KernelConstant,
    load_codes,
    load_dequant,
    operand_kind,
    int_to_float,
    round_to_fp8,
    round_to_int,
    score_mask,
)
from . import dispatch, host
from .host import PlanCache, cdiv, next_pow2, tensor_signature
from ..config import Precision

__all__ = ["attention_forward_launch", "attention_forward_cuda", "dispatched_forward", "plan", "split_count"]

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_PV_PRECISIONS = ("none", "int8", "fp8_e4m3")

# Q·Kᵀ modes (the QK_MODE constexpr; the module docstring says what each computes).
QK_INT8 = KernelConstant(0)
QK_INT4 = KernelConstant(1)
QK_FP8 = KernelConstant(2)
QK_GENERIC = KernelConstant(3)

# P·V modes (the PV_MODE constexpr; see the module docstring).
PV_16BIT = KernelConstant(0)  # P in the input's 16-bit type
PV_FP8_DOT = KernelConstant(1)  # P rounded to e4m3 times FP8 V on the tensor cores
PV_INT8_DOT = KernelConstant(2)  # P as int8 codes times INT8 V, int32 per key block
PV_FP8_ROUNDED = KernelConstant(3)  # P rounded to e4m3, 16-bit dot with any other V
PV_INT8_ROUNDED = KernelConstant(4)  # P as int8 codes, 16-bit dot with any other V


@triton.jit
def _to_fp8e4(p, INTERPRET: tl.constexpr):
    if INTERPRET:  # interpreter: its fp32 -> fp8 cast mis-rounds carries; round explicitly
        return round_to_fp8(p, 3, -6).to(tl.float8e4nv)
    else:
        return p.to(tl.float8e4nv)


@triton.jit
def _dot16(a, b, acc, DOT_F32: tl.constexpr):
    """a @ b (+ acc) of 16-bit (or fp32) tiles with fp32 accumulation. DOT_F32 widens the
    operands first: the interpreter's bf16 dot is wrong (numpy has no bf16)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_tile(ptrs, rmask, cmask, RCHECK: tl.constexpr, CCHECK: tl.constexpr):
    """Load a 2-D tile, masking rows / columns only where they can be out of range (the
    key blocks before the last one are full: unmasked loads pipeline and vectorize best)."""
    if RCHECK and CCHECK:
        return tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
    elif RCHECK:
        return tl.load(ptrs, mask=rmask[:, None], other=0.0)
    elif CCHECK:
        return tl.load(ptrs, mask=cmask[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _folded_max(m, mq):
    """For the folded exponent: c = mq + m rounded up to an fp32 (mq = 1.5 * 2**23 * qs2 >
    0 is exact, see the kernel) and the reference max m' = c - mq >= m, exact (Sterbenz).
    exp2(bits * qs2 - c) is then exp2(score - m') with m' >= the true max: P <= 1, as the
    INT8 P codes need, and every later use of the max takes m' (consistent to the ulp)."""
    c = mq + m
    c = tl.where(c - mq < m, (c.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True), c)
    return c, c - mq


@triton.jit
def _exp2_arg(t, qk_i, qs2, m, c, FOLD: tl.constexpr, INTERPRET: tl.constexpr):
    """The base-2 exponent qs2 * t - m per score, one FMA. FOLD: t is the int32 tile qk_i
    (times constants already in qs2): qk_i's bits plus those of 1.5 * 2**23, read as fp32,
    are qk_i + 1.5 * 2**23 exactly (|qk_i| < 2**22), and the offset sits in the per-row
    constant c from _folded_max — the conversion costs one integer add per score instead
    of an add and a subtract. The product must not round before the subtraction (a fused
    multiply-add, as the GPU compiles it); the interpreter's is not fused, so there it is
    formed in fp64 (exact for two fp32 factors)."""
    if FOLD:
        bits = (qk_i + 0x4B400000).to(tl.float32, bitcast=True)
        if INTERPRET:
            return (bits.to(tl.float64) * qs2.to(tl.float64)[:, None] - c.to(tl.float64)[:, None]).to(tl.float32)
        return tl.fma(bits, qs2[:, None], -c[:, None])
    else:
        return t * qs2[:, None] - m[:, None]


#: INT8 P's largest code: a tile's P / (tile max) in [0, 1] is stored as round(P_QMAX * it).
P_QMAX = tl.constexpr(Precision.INT8.qmax)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q0, q1, qs2,
                    k_base, v_base, ks_base, kz_base, vs_base, vz_base, mask_base,
                    offs_m, start, stop, Sq, Skv,
                    sks, skd, svs, svd, sks_s, skz_s, svs_s, svs_d, svz_s, svz_d, smm, smn,
                    K_KIND: tl.constexpr, V_KIND: tl.constexpr, QK_MODE: tl.constexpr,
                    PV_MODE: tl.constexpr, K_QUANT: tl.constexpr, KS_CONST: tl.constexpr, K_ZP: tl.constexpr,
                    V_ZP: tl.constexpr, V_DEQ_IN_LOOP: tl.constexpr, V_TRANS: tl.constexpr,
                    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK: tl.constexpr,
                    SCALE_POS: tl.constexpr, COMPUTE: tl.constexpr, INTERPRET: tl.constexpr, DOT_F32: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < Skv
        # ---- S = Q Kᵀ (base-2 logits)
        if QK_MODE == QK_INT4:
            klo, khi = load_codes(k_base, offs_n, offs_d, sks, skd, nmask, HEAD_DIM, K_KIND, BLOCK_D)
            qk = tl.dot(q0, tl.trans(klo), out_dtype=tl.int32)
            qk = tl.dot(q1, tl.trans(khi), qk, out_dtype=tl.int32)
            qk = qk.to(tl.float32)
            qk_i = qk  # (unused: only QK_INT8 folds)
        elif QK_MODE == QK_INT8:
            k = _load_tile(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, nmask, dmask,
                           CHECK, HEAD_DIM != BLOCK_D)
            qk_i = tl.dot(q0, tl.trans(k), out_dtype=tl.int32)
            qk = qk_i.to(tl.float32)  # (dead on the folded path below)
        elif QK_MODE == QK_FP8:
            k = _load_tile(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, nmask, dmask,
                           CHECK, HEAD_DIM != BLOCK_D)
            qk = tl.dot(q0, tl.trans(k))
            qk_i = qk
        else:
            k = load_dequant(k_base, offs_n, offs_d, sks, skd, nmask, HEAD_DIM,
                             ks_base, 0, 0, kz_base, skz_s, 0,
                             K_KIND, False, K_ZP, BLOCK_N, BLOCK_D)
            qk = _dot16(q0, tl.trans(k.to(COMPUTE)), tl.zeros((q0.shape[0], BLOCK_N), dtype=tl.float32),
                        DOT_F32)
            qk_i = qk
        # t: the scores without the per-row factor qs2 (Q scale * scale * log2 e, and the K
        # scale when it is constant along the keys: KS_CONST), > 0
        if K_QUANT and not KS_CONST:
            if CHECK:
                ks = tl.load(ks_base + offs_n * sks_s, mask=nmask, other=0.0)
            else:
                ks = tl.load(ks_base + offs_n * sks_s)
            t = qk * ks[None, :]
        else:
            t = qk
        if CHECK or MASK_KIND != MASK_NONE or not SCALE_POS:
            visible, bias = score_mask(offs_m, offs_n, Sq, Skv, mask_base, smm, smn,
                                       IS_CAUSAL and CHECK, CHECK, MASK_KIND)
            s = t * qs2[:, None]
            if MASK_KIND == MASK_ADDITIVE:
                s = s + bias * 1.4426950408889634
            # causal / bool masks ADD -inf, as SDPA's math backend does: a NaN or +inf
            # score stays (becomes) NaN where masked (docs/op_contract.md, non-finite
            # values); keys past Skv are no keys at all and are assigned -inf
            s = tl.where(visible, s, s + float("-inf"))
            if CHECK:
                s = tl.where(nmask[None, :], s, float("-inf"))
            # (tl.max / tl.maximum drop NaN on the GPU: harmless here, P = exp2(NaN - m)
            # stays NaN, so l_i, the output row and its lse do too, whatever m is)
            m_tile = tl.max(s, 1)
        elif QK_MODE == QK_INT8 and KS_CONST:  # the row max of the int32 tile, converted per row
            m_tile = tl.max(qk_i, 1).to(tl.float32) * qs2
        else:
            # unmasked blocks: qs2 > 0 commutes with the max, and one FMA per score
            # then applies it and subtracts the max (saves a multiply per score)
            m_tile = tl.max(t, 1) * qs2
        # ---- online softmax (fp32, exp2)
        FOLD: tl.constexpr = QK_MODE == QK_INT8 and KS_CONST and not (MASK_KIND != MASK_NONE or CHECK or not SCALE_POS)
        mq = 12582912.0 * qs2
        if FOLD and (PV_MODE == PV_INT8_DOT or PV_MODE == PV_INT8_ROUNDED):  # the tile's reference max, P <= 1
            c_tile, m_tile = _folded_max(m_tile, mq)
        else:
            c_tile = m_tile
        m_new = tl.maximum(m_i, m_tile)
        if FOLD and not (PV_MODE == PV_INT8_DOT or PV_MODE == PV_INT8_ROUNDED):
            c_new, m_new = _folded_max(m_new, mq)
        else:
            c_new = m_new
        if MASK_KIND != MASK_NONE or CHECK or not SCALE_POS:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        if PV_MODE == PV_INT8_DOT or PV_MODE == PV_INT8_ROUNDED:
            # int8 P per row and key tile, relative to the tile's own row max: e lies in
            # [0, 1] with max 1, so the tile scale 1/127 needs no extra reduction and the
            # tile's factor beta = exp2(tile max - running max) goes on the product.
            # (A fixed 1/127 on exp2(s - running max) rounds away the small probabilities
            # of flat rows: 2.8 % vs 1.7 % rel-L2.)
            if CHECK or MASK_KIND != MASK_NONE or not SCALE_POS:
                mt_use = tl.where(m_tile == float("-inf"), 0.0, m_tile)
                e = tl.math.exp2(s - mt_use[:, None])
            else:
                e = tl.math.exp2(_exp2_arg(t, qk_i, qs2, m_tile, c_tile, FOLD, INTERPRET))
            beta = tl.math.exp2(m_tile - m_use)
            l_i = l_i * alpha + beta * tl.sum(e, 1)
            pq = round_to_int(e * P_QMAX)
        else:
            if CHECK or MASK_KIND != MASK_NONE or not SCALE_POS:
                p = tl.math.exp2(s - m_use[:, None])
            else:
                p = tl.math.exp2(_exp2_arg(t, qk_i, qs2, m_use, c_new, FOLD, INTERPRET))
            l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        # ---- acc += P V
        if PV_MODE == PV_FP8_DOT or PV_MODE == PV_INT8_DOT:
            if V_TRANS:
                v = tl.trans(_load_tile(v_base + offs_d[:, None] * svd + offs_n[None, :] * svs,
                                        dmask, nmask, HEAD_DIM != BLOCK_D, CHECK))
            else:
                v = _load_tile(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, nmask, dmask,
                               CHECK, HEAD_DIM != BLOCK_D)
            if PV_MODE == PV_FP8_DOT:
                acc = tl.dot(_to_fp8e4(p, INTERPRET), v, acc, max_num_imprecise_acc=BLOCK_N)
            else:
                pv = int_to_float(tl.dot(pq.to(tl.int8), v, out_dtype=tl.int32))
                acc += pv * (beta * (1.0 / P_QMAX))[:, None]
        else:
            if V_KIND == KIND_FLOAT and not V_DEQ_IN_LOOP:
                if V_TRANS:
                    vc = tl.trans(_load_tile(v_base + offs_d[:, None] * svd + offs_n[None, :] * svs,
                                             dmask, nmask, HEAD_DIM != BLOCK_D, CHECK)).to(COMPUTE)
                else:
                    vc = _load_tile(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, nmask,
                                    dmask, CHECK, HEAD_DIM != BLOCK_D).to(COMPUTE)
            else:
                vc = load_dequant(v_base, offs_n, offs_d, svs, svd, nmask, HEAD_DIM,
                                  vs_base, svs_s, svs_d, vz_base, svz_s, svz_d,
                                  V_KIND, V_DEQ_IN_LOOP, V_ZP, BLOCK_N, BLOCK_D).to(COMPUTE)
            if PV_MODE == PV_INT8_ROUNDED:  # the int8 P codes are exact in 16 bits
                pv = _dot16(int_to_float(pq).to(COMPUTE), vc,
                            tl.zeros((pq.shape[0], BLOCK_D), dtype=tl.float32), DOT_F32)
                acc += pv * (beta * (1.0 / P_QMAX))[:, None]
            else:
                if PV_MODE == PV_FP8_ROUNDED:
                    pc = _to_fp8e4(p, INTERPRET).to(COMPUTE)
                else:
                    pc = p.to(COMPUTE)
                acc = _dot16(pc, vc, acc, DOT_F32)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, QS, KS, VS, QZ, KZ, VZ, KM, MASK, O, LSE, NONFINITE,
                     sm_scale, Hq, kv_group, Sq, Skv, split_len, split_so, split_sl,
                     sqb, sqh, sqs, sqd,
                     skb, skh, sks, skd,
                     svb, svh, svs, svd,
                     sqs_b, sqs_h, sqs_s,
                     sqz_b, sqz_h, sqz_s,
                     sks_b, sks_h, sks_s,
                     skz_b, skz_h, skz_s,
                     svs_b, svs_h, svs_s, svs_d,
                     svz_b, svz_h, svz_s, svz_d,
                     skm_b, skm_h, skm_d,
                     smb, smh, smm, smn,
                     sob, soh, som, sod,
                     Q_KIND: tl.constexpr, K_KIND: tl.constexpr, V_KIND: tl.constexpr,
                     QK_MODE: tl.constexpr, PV_MODE: tl.constexpr,
                     Q_QUANT: tl.constexpr, K_QUANT: tl.constexpr, KS_CONST: tl.constexpr, V_QUANT: tl.constexpr,
                     Q_ZP: tl.constexpr, K_ZP: tl.constexpr, V_ZP: tl.constexpr,
                     V_DEQ_IN_LOOP: tl.constexpr, V_TRANS: tl.constexpr, HAS_KM: tl.constexpr,
                     MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, SCALE_POS: tl.constexpr,
                     EVEN_KV: tl.constexpr, SPLIT: tl.constexpr, PACK_GQA: tl.constexpr,
                     COMPUTE: tl.constexpr, INTERPRET: tl.constexpr,
                     DOT_F32: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    n_m = tl.num_programs(0)
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = n_m - 1 - pid_m  # heaviest (longest) rows first
    pid_bh = tl.program_id(1)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    if PACK_GQA:
        # one program per kv head: its rows are the (query head of the group, query row)
        # pairs, so the group's queries share each K/V tile load (decode reads the cache
        # once per kv head instead of once per query head); no causal, no mask, no Q zp
        b = (pid_bh // (Hq // kv_group)).to(tl.int64)
        hk = (pid_bh % (Hq // kv_group)).to(tl.int64)
        mmask = offs_m < kv_group * Sq
        h = hk * kv_group + (offs_m // Sq).to(tl.int64)  # per row
        pos = offs_m % Sq
        h0 = hk * kv_group  # (the mask / zero-point bases below are unused when packed)
    else:
        b = (pid_bh // Hq).to(tl.int64)
        h = (pid_bh % Hq).to(tl.int64)
        hk = h // kv_group
        mmask = offs_m < Sq
        pos = offs_m
        h0 = h
    if PACK_GQA:  # Q rows addressed by element offsets from the batch's base
        q_base = Q + b * sqb
        q_rows = h * sqh + pos * sqs
        q_rstride = 1
    else:
        q_base = Q + b * sqb + h * sqh
        q_rows = offs_m
        q_rstride = sqs

    # ---- Q tile, its row scale folded with scale * log2(e)
    if QK_MODE == QK_INT4:
        q0, q1 = load_codes(q_base, q_rows, offs_d, q_rstride, sqd, mmask, HEAD_DIM, Q_KIND, BLOCK_D)
    elif QK_MODE == QK_GENERIC:
        q0 = load_dequant(q_base, q_rows, offs_d, q_rstride, sqd, mmask, HEAD_DIM,
                          QS, 0, 0, QZ + b * sqz_b + h0 * sqz_h, sqz_s, 0,
                          Q_KIND, False, Q_ZP, BLOCK_M, BLOCK_D).to(COMPUTE)
        q1 = q0
    else:
        q0 = load_codes(q_base, q_rows, offs_d, q_rstride, sqd, mmask, HEAD_DIM, Q_KIND, BLOCK_D)
        q1 = q0
    if Q_QUANT:
        q_scale = tl.load(QS + b * sqs_b + h * sqs_h + pos * sqs_s, mask=mmask, other=0.0)
    else:
        q_scale = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    qs2 = q_scale * (sm_scale * 1.4426950408889634)
    if KS_CONST:  # one K scale for every key of this head (per head / per tensor): a row factor
        qs2 = qs2 * tl.load(KS + b * sks_b + hk * sks_h)
        if QK_MODE == QK_INT8:  # 2 low mantissa bits cleared (relative 5e-7): 1.5 * 2**23 * qs2 is
            # then exact, which the folded exponent needs (_folded_max)
            qs2 = (qs2.to(tl.int32, bitcast=True) & -4).to(tl.float32, bitcast=True)

    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    ks_base = KS + b * sks_b + hk * sks_h
    kz_base = KZ + b * skz_b + hk * skz_h
    vs_base = VS + b * svs_b + hk * svs_h
    vz_base = VZ + b * svz_b + hk * svz_h
    mask_base = MASK + b * smb + h0 * smh

    # k_mean's lse term, before the loop: the Q tile need not stay live past it (keeping
    # it live for the epilogue spilled registers at BLOCK_M 128)
    if HAS_KM:
        km_base = KM + b * skm_b + hk * skm_h
        if QK_MODE == QK_INT4:
            half = tl.arange(0, BLOCK_D // 2)
            hm = half < HEAD_DIM // 2
            km_e = tl.load(km_base + (2 * half) * skm_d, mask=hm, other=0.0)
            km_o = tl.load(km_base + (2 * half + 1) * skm_d, mask=hm, other=0.0)
            qkm = tl.sum(q0.to(tl.float32) * km_e[None, :], 1) + tl.sum(q1.to(tl.float32) * km_o[None, :], 1)
        else:
            km = tl.load(km_base + offs_d * skm_d, mask=dmask, other=0.0)
            qkm = tl.sum(q0.to(tl.float32) * km[None, :], 1)
        qkm = qkm * q_scale * sm_scale
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # blocks fully visible to every row of the tile need no causal / bounds masking
    if IS_CAUSAL:
        # key tiles after the tile's last row are skipped, exact only for finite inputs
        # (SDPA adds the causal -inf: NaN stays NaN; its P @ V meets every V row: 0 * NaN);
        # a (batch, head) flagged by _nonfinite_heads visits them all (never packed)
        every_key = tl.load(NONFINITE + b * Hq + h) != 0
        hi = tl.where(every_key, Skv, tl.minimum(Skv, start_m + BLOCK_M))
        full_end = tl.minimum((start_m + 1) // BLOCK_N, Skv // BLOCK_N) * BLOCK_N
    else:
        hi = Skv
        full_end = (Skv // BLOCK_N) * BLOCK_N
    # split-KV (short query blocks against long contexts): this program's key range;
    # without splitting split_len exceeds Skv and the range is everything
    lo = tl.program_id(2) * split_len
    hi = tl.minimum(hi, lo + split_len)
    full_hi = tl.maximum(lo, tl.minimum(full_end, hi))
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q0, q1, qs2, k_base, v_base, ks_base, kz_base, vs_base, vz_base, mask_base,
        offs_m, lo, full_hi, Sq, Skv,
        sks, skd, svs, svd, sks_s, skz_s, svs_s, svs_d, svz_s, svz_d, smm, smn,
        K_KIND, V_KIND, QK_MODE, PV_MODE, K_QUANT, KS_CONST, K_ZP, V_ZP, V_DEQ_IN_LOOP, V_TRANS,
        MASK_KIND, IS_CAUSAL, False, SCALE_POS, COMPUTE, INTERPRET, DOT_F32, HEAD_DIM, BLOCK_N, BLOCK_D)
    if not EVEN_KV:  # the diagonal / tail blocks (no second loop at all when none exist)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q0, q1, qs2, k_base, v_base, ks_base, kz_base, vs_base, vz_base, mask_base,
            offs_m, full_hi, hi, Sq, Skv,
            sks, skd, svs, svd, sks_s, skz_s, svs_s, svs_d, svz_s, svz_d, smm, smn,
            K_KIND, V_KIND, QK_MODE, PV_MODE, K_QUANT, KS_CONST, K_ZP, V_ZP, V_DEQ_IN_LOOP, V_TRANS,
            MASK_KIND, IS_CAUSAL, True, SCALE_POS, COMPUTE, INTERPRET, DOT_F32, HEAD_DIM, BLOCK_N, BLOCK_D)

    # ---- epilogue
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if V_QUANT and not V_DEQ_IN_LOOP:  # per-channel (or coarser) V scale, after the loop
        vsc = tl.load(vs_base + offs_d * svs_d, mask=dmask, other=0.0)
        out = out * vsc[None, :]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if HAS_KM:
        lse = lse + qkm
    # SPLIT: O / LSE are the fp32 partial buffers, split_so / split_sl apart per split
    pid_s = tl.program_id(2).to(tl.int64)
    o_ptrs = O + pid_s * split_so + b * sob + (h * soh + pos * som)[:, None] + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + pid_s * split_sl + (b * Hq + h) * Sq + pos, lse, mask=mmask)


@triton.jit
def _combine_splits_kernel(OP, LSEP, O, LSE, n_splits, rows, Hq, Sq,
                           sob, soh, som, sod,
                           HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the split-KV partials of `rows` = B·Hq·Sq query rows: lse = logsumexp_s lse_s,
    out = sum_s exp(lse_s - lse) out_s (splits without a visible key carry lse -inf)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = offs_r < rows
    dmask = offs_d < HEAD_DIM
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    for sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(LSEP + sp * rows + offs_r, mask=rmask, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for sp in range(0, n_splits):
        w = tl.exp(tl.load(LSEP + sp * rows + offs_r, mask=rmask, other=float("-inf")) - m_use)
        o = tl.load(OP + (sp * rows + offs_r)[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc += w[:, None] * o
        wsum += w
    empty = wsum == 0.0
    out = acc / tl.where(empty, 1.0, wsum)[:, None]
    lse = tl.where(empty, float("-inf"), m_use + tl.log(tl.where(empty, 1.0, wsum)))
    bh = offs_r // Sq
    mm = (offs_r % Sq).to(tl.int64)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    o_ptrs = O + (b * sob + h * soh + mm * som)[:, None] + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + offs_r, lse, mask=rmask)


# ------------------------------------------------------------------------------- host
def _bcast(t: Optional[torch.Tensor], shape, name: str, dtype=None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flash_quant.attention_forward: {name} must be a tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"flash_quant.attention_forward: {name} must be {dtype}, got {t.dtype}")
    if t.dim() > len(shape):
        raise ValueError(f"flash_quant.attention_forward: {name} of shape {tuple(t.shape)} has more dims "
                         f"than {tuple(shape)}")
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(f"flash_quant.attention_forward: {name} of shape {tuple(t.shape)} does not broadcast "
                         f"to {tuple(shape)}") from None


def _check_operand(name, x, data, scale, zp, shape):
    """Validate one (maybe quantized) operand; returns (tensor to read, kind, scale4, zp4)."""
    b, h, s, d = shape
    if data is None:
        if scale is not None or zp is not None:
            raise ValueError(f"flash_quant.attention_forward: {name}_scale / {name}_zero_point given "
                             f"without {name}_data")
        return x, KIND_FLOAT, None, None
    if data.device != x.device:
        raise RuntimeError(f"flash_quant.attention_forward: {name}_data is on {data.device}, {name} on {x.device}")
    kind = operand_kind(data.dtype) if data.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2) else None
    if kind is None:
        raise TypeError(f"flash_quant.attention_forward: {name}_data must be int8, uint8 (packed int4) or "
                        f"float8, got {data.dtype}")
    want = (b, h, s, d // 2) if kind == KIND_INT4 else (b, h, s, d)
    if kind == KIND_INT4 and d % 2:
        raise ValueError(f"flash_quant.attention_forward: packed int4 {name}_data needs an even head dim")
    if tuple(data.shape) != want:
        raise ValueError(f"flash_quant.attention_forward: {name}_data has shape {tuple(data.shape)}, "
                         f"expected {want}")
    if scale is None:
        raise ValueError(f"flash_quant.attention_forward: {name}_data given without {name}_scale")
    sshape = (b, h, s, d) if name == "v" else (b, h, s, 1)
    s4 = _bcast(scale, sshape, f"{name}_scale", torch.float32)
    z4 = _bcast(zp, sshape, f"{name}_zero_point", torch.int32)
    for t, n in ((s4, "scale"), (z4, "zero_point")):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"flash_quant.attention_forward: {name}_{n} is on {t.device}, {name} on {x.device}")
    return data, kind, s4, z4


def plan(q, k, v, q_data=None, q_scale=None, q_zero_point=None, k_data=None, k_scale=None,
         k_zero_point=None, k_mean=None, v_data=None, v_scale=None, v_zero_point=None,
         attn_mask=None, is_causal=False, scale=None, pv_precision="none"):
    """Check the arguments (before any kernel runs) and resolve the kernel's modes.
    Returns a dict of launch arguments; raises TypeError / ValueError / RuntimeError with
    the argument's name otherwise."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_quant.attention_forward: {name} must be a tensor")
        if t.dim() != 4:
            raise ValueError(f"flash_quant.attention_forward: {name} must have rank 4 (B, H, S, D), got {t.dim()}")
        if t.dtype not in _TL_DTYPE:
            raise TypeError(f"flash_quant.attention_forward: {name} must be float32/float16/bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_quant.attention_forward: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise RuntimeError(f"flash_quant.attention_forward: q, k, v devices differ ({q.device}, {k.device}, {v.device})")
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Skv, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"flash_quant.attention_forward: v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"flash_quant.attention_forward: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"flash_quant.attention_forward: Hq={Hq} is not a multiple of Hkv={Hkv}")
    if not head_dim_supported(D):
        raise ValueError(f"flash_quant.attention_forward: head dim {D} must be {HEAD_DIM_RULE}")
    if Sq < 1 or Skv < 1 or B < 1:
        raise ValueError(f"flash_quant.attention_forward: empty batch or sequence ({tuple(q.shape)}, {tuple(k.shape)})")
    if pv_precision not in _PV_PRECISIONS:
        raise ValueError(f"flash_quant.attention_forward: pv_precision must be one of {_PV_PRECISIONS}, got {pv_precision!r}")
    qt, qkind, qs, qz = _check_operand("q", q, q_data, q_scale, q_zero_point, (B, Hq, Sq, D))
    kt, kkind, ks, kz = _check_operand("k", k, k_data, k_scale, k_zero_point, (B, Hkv, Skv, D))
    vt, vkind, vs, vz = _check_operand("v", v, v_data, v_scale, v_zero_point, (B, Hkv, Skv, D))
    km = _bcast(k_mean, (B, Hkv, 1, D), "k_mean", torch.float32)
    if km is not None and km.device != q.device:
        raise RuntimeError(f"flash_quant.attention_forward: k_mean is on {km.device}, q on {q.device}")
    mask = None
    mask_kind = MASK_NONE
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask_kind = MASK_BOOL
        elif attn_mask.dtype in (torch.float32, torch.float16, torch.bfloat16):
            mask_kind = MASK_ADDITIVE
        else:
            raise TypeError(f"flash_quant.attention_forward: attn_mask must be bool or floating, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise RuntimeError(f"flash_quant.attention_forward: attn_mask is on {attn_mask.device}, q on {q.device}")
        mask = _bcast(attn_mask, (B, Hq, Sq, Skv), "attn_mask")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)

    if qkind == kkind == KIND_INT8 and qz is None and kz is None:
        qk_mode = QK_INT8
    elif qkind == kkind == KIND_INT4 and qz is None and kz is None:
        qk_mode = QK_INT4
    elif qkind == kkind == KIND_FP8 and qz is None and kz is None:
        qk_mode = QK_FP8
    else:
        qk_mode = QK_GENERIC
    v_quant = vkind != KIND_FLOAT
    v_per_col = v_quant and vs.stride(2) == 0 and vz is None and vkind != KIND_INT4
    v_deq_in_loop = v_quant and not v_per_col
    if pv_precision == "fp8_e4m3":
        pv_mode = PV_FP8_DOT if (vkind == KIND_FP8 and v_per_col) else PV_FP8_ROUNDED
    elif pv_precision == "int8":
        pv_mode = PV_INT8_DOT if (vkind == KIND_INT8 and v_per_col) else PV_INT8_ROUNDED
    else:
        pv_mode = PV_16BIT
    v_trans = vt.stride(2) == 1 and vt.stride(3) != 1 and vkind != KIND_INT4
    return dict(
        q=qt, k=kt, v=vt, qs=qs, qz=qz, ks=ks, kz=kz, vs=vs, vz=vz, km=km, mask=mask,
        B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Skv=Skv, D=D, scale=scale, dtype=q.dtype, device=q.device,
        Q_KIND=qkind, K_KIND=kkind, V_KIND=vkind, QK_MODE=qk_mode, PV_MODE=pv_mode,
        Q_QUANT=qkind != KIND_FLOAT, K_QUANT=kkind != KIND_FLOAT, V_QUANT=v_quant,
        KS_CONST=kkind != KIND_FLOAT and qk_mode != QK_GENERIC and ks.stride(2) == 0,
        Q_ZP=qz is not None, K_ZP=kz is not None, V_ZP=vz is not None,
        V_DEQ_IN_LOOP=v_deq_in_loop, V_TRANS=v_trans, HAS_KM=km is not None,
        MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal),
        # short query blocks of a GQA group share their K/V loads (see _attn_fwd_kernel)
        PACK_GQA=Hq > Hkv and Sq <= 64 and not is_causal and mask_kind == MASK_NONE and qz is None,
    )


def _strides(t, n):
    return tuple(t.stride()) if t is not None else (0,) * n


# The call's tensor arguments, in attention_forward_launch's order; a plan names the
# kernel's pointer arguments by their index here (-1: a dummy pointer, never read).
_Q, _K, _V, _QD, _QS, _QZ, _KD, _KS, _KZ, _KM, _VD, _VS, _VZ, _MASK = range(14)


class _ForwardPlan(NamedTuple):
    """What attention_forward_launch derives from a call's signature (host.PlanCache)."""
    pointers: Tuple[int, ...]  # q, k, v, qs, ks, vs, qz, kz, vz, km, mask: tensor index or -1
    strides: Tuple[int, ...]  # the kernel's stride arguments (of the broadcast views)
    consts: Dict
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Skv: int
    D: int
    scale: float
    out_dtype: torch.dtype
    device: torch.device
    block_d: int
    pack: bool
    tune_key: Tuple
    candidates: Tuple
    default: autotune.Config
    grids: Dict  # (config, num_splits) -> (grid, splits, split_len, meta), filled by launches
    kernels: Dict  # compiled kernels of host.launch, filled by launches


_PLANS = PlanCache()


def _plan_forward(tensors, is_causal, scale, pv_precision, pack_gqa) -> _ForwardPlan:
    p = plan(*tensors[:_MASK], attn_mask=tensors[_MASK], is_causal=is_causal, scale=scale,
             pv_precision=pv_precision)
    B, Hq, Hkv, Sq, Skv, D = p["B"], p["Hq"], p["Hkv"], p["Sq"], p["Skv"], p["D"]
    dev = p["device"]
    block_d = max(16, next_pow2(D))
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if p["Q_KIND"] == KIND_INT4 or p["K_KIND"] == KIND_INT4:
        block_d = max(32, block_d)  # int4 dots need >= 16 packed columns
    given = lambda i, on: i if on else -1  # noqa: E731
    pointers = (
        _QD if tensors[_QD] is not None else _Q, _KD if tensors[_KD] is not None else _K,
        _VD if tensors[_VD] is not None else _V,
        given(_QS, p["qs"] is not None), given(_KS, p["ks"] is not None), given(_VS, p["vs"] is not None),
        given(_QZ, p["qz"] is not None), given(_KZ, p["kz"] is not None), given(_VZ, p["vz"] is not None),
        given(_KM, p["km"] is not None), given(_MASK, p["mask"] is not None),
    )
    qs, qz, ks, kz, vs, vz, km, mask = (p[n] for n in ("qs", "qz", "ks", "kz", "vs", "vz", "km", "mask"))
    strides = (
        *p["q"].stride(), *p["k"].stride(), *p["v"].stride(),
        *_strides(qs, 4)[:3], *_strides(qz, 4)[:3],
        *_strides(ks, 4)[:3], *_strides(kz, 4)[:3],
        *_strides(vs, 4)[:2], *_strides(vs, 4)[2:], *_strides(vz, 4),
        *(tuple(km.stride()[:2]) + (km.stride(3),) if km is not None else (0, 0, 0)),
        *_strides(mask, 4),
    )
    consts = dict(
        Q_KIND=p["Q_KIND"], K_KIND=p["K_KIND"], V_KIND=p["V_KIND"], QK_MODE=p["QK_MODE"],
        PV_MODE=p["PV_MODE"], Q_QUANT=p["Q_QUANT"], K_QUANT=p["K_QUANT"], KS_CONST=p["KS_CONST"],
        V_QUANT=p["V_QUANT"],
        Q_ZP=p["Q_ZP"], K_ZP=p["K_ZP"], V_ZP=p["V_ZP"], V_DEQ_IN_LOOP=p["V_DEQ_IN_LOOP"],
        V_TRANS=p["V_TRANS"], HAS_KM=p["HAS_KM"], MASK_KIND=p["MASK_KIND"], IS_CAUSAL=p["IS_CAUSAL"],
        SCALE_POS=p["scale"] > 0, COMPUTE=_TL_DTYPE[p["dtype"]], INTERPRET=interpreting,
        DOT_F32=interpreting and p["dtype"] == torch.bfloat16,
        HEAD_DIM=D, BLOCK_D=block_d,
    )
    pack = p["PACK_GQA"]
    if pack_gqa is not None:
        if pack_gqa and not pack:
            raise ValueError("flash_quant.attention_forward: pack_gqa=True needs Hq > Hkv, Sq <= 64, "
                             "no causal flag, no mask and no Q zero point")
        pack = bool(pack_gqa)
    eight_bit = p["QK_MODE"] != QK_GENERIC
    nbytes = p["dtype"].itemsize
    sq_bucket = "Sq<=64" if Sq <= 64 else ("Sq<=1024" if Sq <= 1024 else "Sq>1024")
    tune_key = ("attention_forward", dev.type, block_d, p["QK_MODE"], p["PV_MODE"], p["V_KIND"],
                p["IS_CAUSAL"], p["MASK_KIND"], str(p["dtype"]).replace("torch.", ""), sq_bucket,
                "packed" if pack else "")
    return _ForwardPlan(
        pointers=pointers, strides=strides, consts=consts, B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Skv=Skv, D=D,
        scale=p["scale"], out_dtype=p["dtype"], device=dev, block_d=block_d, pack=pack, tune_key=tune_key,
        candidates=tuple(autotune.forward_candidates(block_d, eight_bit, nbytes)),
        default=autotune.forward_default(block_d, eight_bit, nbytes, Sq), grids={}, kernels={})


def _grid(p: _ForwardPlan, cfg: autotune.Config, num_splits: Optional[int]):
    """(grid, splits, split_len, launch meta) of one config; cached on the plan."""
    g = p.grids.get((cfg, num_splits))
    if g is None:
        # packed: one program row-block per kv head over its group's (head, query row) pairs
        rows_per_head, heads = ((p.Hq // p.Hkv) * p.Sq, p.Hkv) if p.pack else (p.Sq, p.Hq)
        n_m = cdiv(rows_per_head, cfg.block_m)
        splits = num_splits if num_splits is not None else split_count(
            p.B * heads * n_m, p.Sq, p.Skv, cfg.block_n, p.device)
        split_len = cdiv(cdiv(p.Skv, splits), cfg.block_n) * cfg.block_n
        splits = cdiv(p.Skv, split_len)
        even_kv = not p.consts["IS_CAUSAL"] and p.Skv % cfg.block_n == 0
        meta = dict(p.consts, EVEN_KV=even_kv, SPLIT=splits > 1, PACK_GQA=p.pack, BLOCK_M=cfg.block_m,
                    BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        g = p.grids[(cfg, num_splits)] = ((n_m, p.B * heads, splits), splits, split_len, meta)
    return g


def attention_forward_launch(q, k, v, q_data=None, q_scale=None, q_zero_point=None, k_data=None,
                             k_scale=None, k_zero_point=None, k_mean=None, v_data=None, v_scale=None,
                             v_zero_point=None, attn_mask=None, is_causal=False, scale=None,
                             pv_precision="none", config: Optional[autotune.Config] = None,
                             num_splits: Optional[int] = None,
                             pack_gqa: Optional[bool] = None,
                             signature: Optional[tuple] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel; returns (out, lse). `config` forces a launch config,
    `num_splits` the number of key ranges (split-KV; default: :func:`split_count`),
    `pack_gqa=False` turns off the packing of a GQA group's short queries (default: on
    where it applies; True where it does not apply is refused). `signature`: the 14
    tensors' host.tensor_signature when the caller has it (dispatch.signature)."""
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"flash_quant.attention_forward: num_splits must be an int >= 1, got {num_splits!r}")
    tensors = (q, k, v, q_data, q_scale, q_zero_point, k_data, k_scale, k_zero_point, k_mean,
               v_data, v_scale, v_zero_point, attn_mask)
    key = (signature if signature is not None else tuple(tensor_signature(t) for t in tensors), is_causal, scale,
           pv_precision, pack_gqa)
    p = _PLANS.get_or_put(key, lambda: _plan_forward(tensors, is_causal, scale, pv_precision, pack_gqa))
    out = torch.empty((p.B, p.Hq, p.Sq, p.D), dtype=p.out_dtype, device=p.device)
    lse = torch.empty((p.B, p.Hq, p.Sq), dtype=torch.float32, device=p.device)
    ptrs = [tensors[i] if i >= 0 else lse for i in p.pointers]  # lse: a dummy, never dereferenced
    nonfinite = _nonfinite_heads(tensors, p) if p.consts["IS_CAUSAL"] else lse  # (dummy when not causal)

    def launch(cfg: autotune.Config):
        grid, splits, split_len, meta = _grid(p, cfg, num_splits)
        key = (cfg, num_splits)  # with the plan's signature, fixes grid, meta and the scalars
        if splits == 1:
            host.launch(_attn_fwd_kernel, grid,
                        (*ptrs, out, lse, nonfinite, p.scale, p.Hq, p.Hq // p.Hkv, p.Sq, p.Skv,
                         p.Skv + cfg.block_n, 0, 0, *p.strides, *out.stride()), meta, p.kernels, key)
            return
        rows = p.B * p.Hq * p.Sq
        o_part = torch.empty((splits, p.B, p.Hq, p.Sq, p.D), dtype=torch.float32, device=p.device)
        lse_part = torch.empty((splits, rows), dtype=torch.float32, device=p.device)
        host.launch(_attn_fwd_kernel, grid,
                    (*ptrs, o_part, lse_part, nonfinite, p.scale, p.Hq, p.Hq // p.Hkv, p.Sq, p.Skv,
                     split_len, rows * p.D, rows, *p.strides, *o_part.stride()[1:]), meta, p.kernels, key)
        br = 16
        host.launch(_combine_splits_kernel, (cdiv(rows, br),),
                    (o_part, lse_part, out, lse, splits, rows, p.Hq, p.Sq, *out.stride()),
                    dict(HEAD_DIM=p.D, BLOCK_R=br, BLOCK_D=p.block_d), p.kernels, ("combine",) + key)

    if config is None:
        config = autotune.select(p.tune_key, list(p.candidates), p.default, launch)
    launch(config)
    return out, lse


class _Heads(NamedTuple):
    """What _nonfinite_heads reads of a plan (the sm90 path has no Triton plan)."""
    B: int
    Hq: int
    Hkv: int
    device: torch.device


def _head_sum(x: torch.Tensor) -> torch.Tensor:
    return torch.sum(x, dim=(2, 3), dtype=torch.float32)


def _nonfinite_heads(tensors, p: _ForwardPlan) -> torch.Tensor:
    """int32 (B, Hq): 1 where the causal tile skip would not be exact — an inf / NaN in
    that head's floating Q, K or V, or a NaN / +inf anywhere in a float mask (quantized
    operands are finite by construction). Computed on the device, no host sync: a sum is
    finite iff every term is (an fp32 overflow of huge finite values only flags a head
    needlessly: slower, same result), and a mask's amax is NaN / +inf iff it has one.
    Cost, causal calls only: Q, K, V (and the float mask) read once more, ~8 small
    launches; the kernel then loads one int per program."""
    q, k, v, mask = tensors[_Q], tensors[_K], tensors[_V], tensors[_MASK]
    bad = torch.zeros((p.B, p.Hq), dtype=torch.bool, device=p.device)
    if tensors[_QD] is None:
        bad |= ~torch.isfinite(_head_sum(q))
    kv = None
    for x, data in ((k, tensors[_KD]), (v, tensors[_VD])):
        if data is None:
            kv = _head_sum(x) if kv is None else kv + _head_sum(x)
    if kv is not None:
        bad |= ~torch.isfinite(kv).repeat_interleave(p.Hq // p.Hkv, dim=1)
    if mask is not None and mask.is_floating_point():
        bad |= ~(mask.amax() < float("inf"))
    return bad.to(torch.int32)


_SM_COUNT = {}


def split_count(programs: int, Sq: int, Skv: int, block_n: int, device: torch.device) -> int:
    """Key ranges per query block for split-KV: only for short query blocks (Sq <= 64, e.g.
    decode) whose programs cannot fill the GPU, about two programs per SM, each range at
    least two key tiles. 1 = no splitting."""
    if Sq > 64 or device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SM_COUNT.get(idx)
    if sms is None:
        sms = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, programs), cdiv(Skv, 2 * block_n), 128))


def attention_forward_cuda(q, k, v, q_data, q_scale, q_zero_point, k_data, k_scale, k_zero_point,
                           k_mean, v_data, v_scale, v_zero_point, attn_mask, is_causal, scale,
                           pv_precision):
    """The op's CUDA kernel: the sm90 CUDA C++ kernel or this file's Triton kernel, as
    flash_quant.cuda.dispatch decides."""
    if q.device.type != "cuda":
        raise RuntimeError(f"flash_quant.attention_forward (CUDA kernel): q is on {q.device}")
    return dispatched_forward(q, k, v, q_data, q_scale, q_zero_point, k_data, k_scale, k_zero_point, k_mean,
                              v_data, v_scale, v_zero_point, attn_mask, is_causal, scale, pv_precision)


def dispatched_forward(*args):
    """One attention_forward call (the op's 17 arguments in schema order) on the kernel
    that dispatch picks (validation first, the same for both kernels). Device-agnostic,
    so CPU tests route calls under TRITON_INTERPRET=1 with the device mocked."""
    decision, sig = dispatch.decide_signed(args)
    if decision.kernel == dispatch.SM90:  # (the C++ op guards the device itself)
        nonfinite = None  # quantized Q / K / V are finite: only a causal call's 16-bit V needs the flag
        if args[14] and args[10] is None:
            B, Hq, Hkv = decision.dims[:3]
            nonfinite = _nonfinite_heads(args[:14], _Heads(B, Hq, Hkv, args[0].device))
        return torch.ops.flash_quant._sm90_attention_forward(*dispatch.sm90_arguments(decision, args, nonfinite))
    dispatch.record(decision)
    q = args[0]
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        return attention_forward_launch(*args, signature=sig)


dispatch.use_validator(plan)
torch.library.register_kernel("flash_quant::attention_forward", "cuda", attention_forward_cuda)
