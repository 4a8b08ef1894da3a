"""CUDA backward of `flash_quant::attention_backward`, in Triton.

Three launches, deterministic (no atomics), no O(S²) tensor:

1. `_bwd_preprocess`: per query row, `delta = rowsum(dO ∘ O)` and the base-2 log-sum-exp
   the scores are recomputed against, `lse2 = (lse - scale · q·k_mean) · log2 e`
   (`+inf` for a row whose lse is `-inf`, so its P is exactly 0).
2. `_bwd_dq`: one program per (query block, query head); loops over key blocks,
   recomputes `P = exp2(s · log2 e - lse2)`, `dP = dO Vᵀ`, `dS = P ∘ (dP - delta)` and
   accumulates `dQ = scale · dS K`.
3. `_bwd_dkdv`: one program per (key block, kv head); loops over the query heads of its
   GQA group and over query blocks, accumulating `dV = Pᵀ dO` and `dK = scale · dSᵀ Q` in
   registers: the sum over the group needs no atomics and is bitwise reproducible.

Precision (measured against float64, see docs/backward.md and
research/bwd_precision_study.py): the score product Q·Kᵀ runs on INT8 tensor cores
(int32 accumulation, the forward's own operands, so the recomputed scores are the
forward's) when Q and K come as symmetric INT8; dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K and
dK = dSᵀ Q run on 16-bit tensor cores (the input's type) with fp32 accumulation. dQ uses
the mean-centred K (the smoothed K, or K minus its mean over the sequence): rows of dS
sum to zero so this is the same gradient, but it removes the error that the 16-bit
rounding of O (through delta) would otherwise multiply by K's channel bias.

Quantized operands are dequantized on load: `(data - zero_point) * scale`, INT4 unpacked
from two nibbles per byte (low nibble = even element), FP8 upcast.

`attention_backward_triton(...)` is the raw launcher (it runs on CPU tensors under
TRITON_INTERPRET=1, which the interpreter tests use); importing this module registers it
as the CUDA kernel of `flash_quant::attention_backward`.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..support import FLOAT_DTYPES, HEAD_DIM_RULE, head_dim_supported
from . import autotune
from . import host
from .host import PlanCache, cdiv, next_pow2, tensor_signature
from .common import (KIND_FLOAT, KIND_FP8, KIND_INT4, KIND_INT8, LOG2E, MASK_ADDITIVE, MASK_BOOL,
                     MASK_NONE, load_codes, load_dequant, load_row_vector, score_mask)

__all__ = ["attention_backward_triton", "BACKWARD_PRECISION"]

# Which product runs in which precision (documented choice; see docs/backward.md).
BACKWARD_PRECISION = {
    "QK^T (recompute)": "int8 x int8 -> int32 when Q and K are symmetric INT8, else 16-bit",
    "dV = P^T dO": "16-bit (fp16/bf16 per input), fp32 accumulate",
    "dP = dO V^T": "16-bit, fp32 accumulate",
    "dQ = dS K": "16-bit, fp32 accumulate, K mean-centred",
    "dK = dS^T Q": "16-bit, fp32 accumulate",
}

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_KERNELS = PlanCache()  # call signature -> the compiled kernels of its launches (host.launch)


# ----------------------------------------------------------------------------- helpers
# Tile loads and dequantization come from flash_quant/cuda/common.py (shared with the
# forward kernel): load_codes, load_dequant, load_row_vector, score_mask.


@triton.jit
def _load_operand(base, sc_base, zp_base, rows, offs_d, row_ok, D, s_row, s_d, s_sc, s_zp,
                  KIND: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Value of a Q/K tile: floating operands as stored (no fp32 round trip), quantized
    ones dequantized to fp32 (per-row scale and zero point; stride 0 broadcasts)."""
    if KIND == KIND_FLOAT:
        return load_codes(base, rows, offs_d, s_row, s_d, row_ok, D, KIND_FLOAT, BLOCK_D)
    else:
        return load_dequant(base, rows, offs_d, s_row, s_d, row_ok, D,
                            sc_base, s_sc, 0, zp_base, s_zp, 0,
                            KIND, True, HAS_ZP, BLOCK_R, BLOCK_D)


@triton.jit
def _load_v(base, sc_base, zp_base, rows, offs_d, row_ok, D, s_row, s_d, s_sc_r, s_sc_d, s_zp_r, s_zp_d,
            KIND: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Value of a V tile: as stored when floating, else dequantized with an elementwise
    broadcast scale (per channel, per row or coarser)."""
    if KIND == KIND_FLOAT:
        return load_codes(base, rows, offs_d, s_row, s_d, row_ok, D, KIND_FLOAT, BLOCK_D)
    else:
        return load_dequant(base, rows, offs_d, s_row, s_d, row_ok, D, sc_base, s_sc_r, s_sc_d,
                            zp_base, s_zp_r, s_zp_d, KIND, True, HAS_ZP, BLOCK_R, BLOCK_D)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _bwd_preprocess(
    O, DO, LSE, DELTA, LSE2, Q, QS, QZ, KM,
    s_ob, s_oh, s_os, s_od,
    s_dob, s_doh, s_dos, s_dod,
    s_qb, s_qh, s_qs, s_qd,
    s_qsb, s_qsh, s_qss,
    s_qzb, s_qzh, s_qzs,
    s_kmb, s_kmh, s_kmd,
    H, GROUP, SQ, D, sm_scale,
    Q_MODE: tl.constexpr, Q_ZP: tl.constexpr, HAS_KMEAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SQ
    d_ok = offs_d < D
    ok = m_ok[:, None] & d_ok[None, :]
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :] * s_od, mask=ok, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dos + offs_d[None, :] * s_dod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse = load_row_vector(LSE + bh * SQ, offs_m, 1, m_ok, float("-inf"))
    if HAS_KMEAN:
        qf = _load_operand(Q + b * s_qb + h * s_qh, QS + b * s_qsb + h * s_qsh, QZ + b * s_qzb + h * s_qzh,
                           offs_m, offs_d, m_ok, D, s_qs, s_qd, s_qss, s_qzs, Q_MODE, Q_ZP, BLOCK_M,
                           BLOCK_D).to(tl.float32)
        km = tl.load(KM + b * s_kmb + (h // GROUP) * s_kmh + offs_d * s_kmd, mask=d_ok, other=0.0)
        lse = lse - sm_scale * tl.sum(qf * km[None, :], axis=1)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    tl.store(DELTA + bh * SQ + offs_m, delta, mask=m_ok)
    tl.store(LSE2 + bh * SQ + offs_m, lse2, mask=m_ok)


@triton.jit
def _bwd_dq(
    Q, K, V, DO, DQ, LSE2, DELTA, NONFINITE,
    QS, QZ, KS, KZ, KC, VS, VZ, MASK,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_dob, s_doh, s_dos, s_dod,
    s_dqb, s_dqh, s_dqs, s_dqd,
    s_qsb, s_qsh, s_qss, s_qzb, s_qzh, s_qzs,
    s_ksb, s_ksh, s_kss, s_kzb, s_kzh, s_kzs,
    s_kcb, s_kch, s_kcd,
    s_vsb, s_vsh, s_vss, s_vsd, s_vzb, s_vzh, s_vzs, s_vzd,
    s_mb, s_mh, s_mm, s_mn,
    H, GROUP, SQ, SKV, D, sm_scale,
    Q_MODE: tl.constexpr, K_MODE: tl.constexpr, V_MODE: tl.constexpr,
    Q_ZP: tl.constexpr, K_ZP: tl.constexpr, V_ZP: tl.constexpr,
    QK_INT8: tl.constexpr, HAS_KC: tl.constexpr, MASK_MODE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SQ
    d_ok = offs_d < D
    ok_md = m_ok[:, None] & d_ok[None, :]

    q_base = Q + b * s_qb + h * s_qh
    qs_base = QS + b * s_qsb + h * s_qsh
    if QK_INT8:
        q_codes = load_codes(q_base, offs_m, offs_d, s_qs, s_qd, m_ok, D, KIND_INT8, BLOCK_D)
        qs = load_row_vector(qs_base, offs_m, s_qss, m_ok, 0.0)
    else:
        q16 = _load_operand(q_base, qs_base, QZ + b * s_qzb + h * s_qzh, offs_m, offs_d, m_ok, D,
                            s_qs, s_qd, s_qss, s_qzs, Q_MODE, Q_ZP, BLOCK_M, BLOCK_D).to(DT)
    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dos + offs_d[None, :] * s_dod,
                 mask=ok_md, other=0.0).to(DT)
    lse2 = load_row_vector(LSE2 + bh * SQ, offs_m, 1, m_ok, float("inf"))
    delta = load_row_vector(DELTA + bh * SQ, offs_m, 1, m_ok, 0.0)
    if HAS_KC:
        kc = tl.load(KC + b * s_kcb + hk * s_kch + offs_d * s_kcd, mask=d_ok, other=0.0)

    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    ks_base = KS + b * s_ksb + hk * s_ksh
    kz_base = KZ + b * s_kzb + hk * s_kzh
    vs_base = VS + b * s_vsb + hk * s_vsh
    vz_base = VZ + b * s_vzb + hk * s_vzh
    m_base = MASK + b * s_mb + h * s_mh
    qk_scale = sm_scale * LOG2E

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = SKV
    if IS_CAUSAL:  # (every key tile where _nonfinite_heads flags the head: the skip is
        # exact only for finite inputs)
        hi = tl.where(tl.load(NONFINITE + bh) != 0, SKV, tl.minimum((pid_m + 1) * BLOCK_M, SKV))
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SKV
        if QK_INT8:
            k_codes = load_codes(k_base, offs_n, offs_d, s_ks, s_kd, n_ok, D, KIND_INT8, BLOCK_D)
            ks = load_row_vector(ks_base, offs_n, s_kss, n_ok, 0.0)
            s = tl.dot(q_codes, tl.trans(k_codes), out_dtype=tl.int32).to(tl.float32)
            s = s * (qs[:, None] * qk_scale) * ks[None, :]
            kf = k_codes.to(tl.float32) * ks[:, None]
        else:
            kf = _load_operand(k_base, ks_base, kz_base, offs_n, offs_d, n_ok, D, s_ks, s_kd, s_kss, s_kzs,
                               K_MODE, K_ZP, BLOCK_N, BLOCK_D)
            s = tl.dot(q16, tl.trans(kf.to(DT))) * qk_scale
        vis, bias = score_mask(offs_m, offs_n, SQ, SKV, m_base, s_mm, s_mn, IS_CAUSAL, True, MASK_MODE)
        if MASK_MODE == MASK_ADDITIVE:
            s = s + bias * LOG2E
        # masks ADD -inf as SDPA does (a NaN / +inf score gives NaN); keys past SKV: -inf
        s = tl.where(n_ok[None, :], tl.where(vis, s, s + float("-inf")), float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        vf = _load_v(v_base, vs_base, vz_base, offs_n, offs_d, n_ok, D, s_vs, s_vd, s_vss, s_vsd,
                     s_vzs, s_vzd, V_MODE, V_ZP, BLOCK_N, BLOCK_D).to(DT)
        dp = tl.dot(do, tl.trans(vf))
        ds = p * (dp - delta[:, None])
        if HAS_KC:
            kf = kf - kc[None, :]
        acc += tl.dot(ds.to(DT), kf.to(DT))
    acc = acc * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqs + offs_d[None, :] * s_dqd,
             acc.to(DQ.dtype.element_ty), mask=ok_md)


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE2, DELTA, NONFINITE,
    QS, QZ, KS, KZ, VS, VZ, MASK,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_dob, s_doh, s_dos, s_dod,
    s_dkb, s_dkh, s_dks, s_dkd,
    s_dvb, s_dvh, s_dvs, s_dvd,
    s_qsb, s_qsh, s_qss, s_qzb, s_qzh, s_qzs,
    s_ksb, s_ksh, s_kss, s_kzb, s_kzh, s_kzs,
    s_vsb, s_vsh, s_vss, s_vsd, s_vzb, s_vzh, s_vzs, s_vzd,
    s_mb, s_mh, s_mm, s_mn,
    HKV, GROUP, SQ, SKV, D, sm_scale,
    Q_MODE: tl.constexpr, K_MODE: tl.constexpr, V_MODE: tl.constexpr,
    Q_ZP: tl.constexpr, K_ZP: tl.constexpr, V_ZP: tl.constexpr,
    QK_INT8: tl.constexpr, MASK_MODE: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < SKV
    d_ok = offs_d < D
    ok_nd = n_ok[:, None] & d_ok[None, :]

    k_base = K + b * s_kb + hk * s_kh
    ks_base = KS + b * s_ksb + hk * s_ksh
    if QK_INT8:
        k_codes = load_codes(k_base, offs_n, offs_d, s_ks, s_kd, n_ok, D, KIND_INT8, BLOCK_D)
        ks = load_row_vector(ks_base, offs_n, s_kss, n_ok, 0.0)
    else:
        k16 = _load_operand(k_base, ks_base, KZ + b * s_kzb + hk * s_kzh, offs_n, offs_d, n_ok, D,
                            s_ks, s_kd, s_kss, s_kzs, K_MODE, K_ZP, BLOCK_N, BLOCK_D).to(DT)
    vf = _load_v(V + b * s_vb + hk * s_vh, VS + b * s_vsb + hk * s_vsh, VZ + b * s_vzb + hk * s_vzh,
                 offs_n, offs_d, n_ok, D, s_vs, s_vd, s_vss, s_vsd, s_vzs, s_vzd, V_MODE, V_ZP,
                 BLOCK_N, BLOCK_D).to(DT)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:  # (every query tile where a head of the group is flagged: _nonfinite_heads)
        lo = tl.where(tl.load(NONFINITE + bh) != 0, 0, ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * s_qb + h * s_qh
        qs_base = QS + b * s_qsb + h * s_qsh
        qz_base = QZ + b * s_qzb + h * s_qzh
        do_base = DO + b * s_dob + h * s_doh
        m_base = MASK + b * s_mb + h * s_mh
        row_base = (b * HKV * GROUP + h) * SQ
        for m0 in range(lo, SQ, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < SQ
            ok_md = m_ok[:, None] & d_ok[None, :]
            if QK_INT8:
                q_codes = load_codes(q_base, offs_m, offs_d, s_qs, s_qd, m_ok, D, KIND_INT8, BLOCK_D)
                qs = load_row_vector(qs_base, offs_m, s_qss, m_ok, 0.0)
                sT = tl.dot(k_codes, tl.trans(q_codes), out_dtype=tl.int32).to(tl.float32)
                sT = sT * (ks[:, None] * qk_scale) * qs[None, :]
                q16 = (q_codes.to(tl.float32) * qs[:, None]).to(DT)
            else:
                q16 = _load_operand(q_base, qs_base, qz_base, offs_m, offs_d, m_ok, D, s_qs, s_qd, s_qss,
                                    s_qzs, Q_MODE, Q_ZP, BLOCK_M, BLOCK_D).to(DT)
                sT = tl.dot(k16, tl.trans(q16)) * qk_scale
            # Transposed tile: rows are keys (n), columns queries (m). Causal and bool
            # masks ADD -inf (SDPA: a NaN / +inf score stays NaN); out of range: -inf.
            inb = n_ok[:, None] & m_ok[None, :]
            visT = inb
            if IS_CAUSAL:
                visT = visT & (offs_n[:, None] <= offs_m[None, :])
            if MASK_MODE == MASK_BOOL:
                mv = tl.load(m_base + offs_m[None, :] * s_mm + offs_n[:, None] * s_mn, mask=inb, other=0)
                visT = visT & (mv != 0)
            elif MASK_MODE == MASK_ADDITIVE:
                mv = tl.load(m_base + offs_m[None, :] * s_mm + offs_n[:, None] * s_mn, mask=inb, other=0.0)
                sT = sT + mv.to(tl.float32) * LOG2E
            sT = tl.where(inb, tl.where(visT, sT, sT + float("-inf")), float("-inf"))
            lse2 = load_row_vector(LSE2 + row_base, offs_m, 1, m_ok, float("inf"))
            delta = load_row_vector(DELTA + row_base, offs_m, 1, m_ok, 0.0)
            pT = tl.math.exp2(sT - lse2[None, :])
            do = tl.load(do_base + offs_m[:, None] * s_dos + offs_d[None, :] * s_dod, mask=ok_md,
                         other=0.0).to(DT)
            dv += tl.dot(pT.to(DT), do)
            dpT = tl.dot(vf, tl.trans(do))
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(DT), q16)
    dk = dk * sm_scale
    tl.store(DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dks + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=ok_nd)
    tl.store(DV + b * s_dvb + hk * s_dvh + offs_n[:, None] * s_dvs + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=ok_nd)


# ----------------------------------------------------------------------------- launcher
def _head_sum(x: torch.Tensor) -> torch.Tensor:
    return torch.sum(x, dim=(2, 3), dtype=torch.float32)


def _nonfinite_heads(grad_out, q, k, v, out, lse, attn_mask, group) -> torch.Tensor:
    """int32 (B, Hq): 1 where the causal tile skips would not be exact (SDPA's gradient
    multiplies the masked P = 0 by dP, delta and K: 0 * NaN = NaN) — an inf / NaN in that
    head's dO, O, floating Q (None: quantized, finite), K or V, a NaN lse, or a NaN / +inf
    anywhere in a float mask. On the device, no host sync: a sum is finite iff every term
    is (an overflow of huge finite values only flags a head needlessly: slower, same
    result). Cost, causal calls only: dO, O, Q, K, V (and the float mask) read once more,
    ~12 small launches; each program then loads one int."""
    kv = None
    for x in (k, v):
        if x is not None:
            kv = _head_sum(x) if kv is None else kv + _head_sum(x)
    total = _head_sum(grad_out) + _head_sum(out)
    if q is not None:
        total = total + _head_sum(q)
    if kv is not None:
        total = total + kv.repeat_interleave(group, dim=1)
    bad = ~torch.isfinite(total) | torch.isnan(lse).any(dim=2)
    if attn_mask is not None and attn_mask.is_floating_point():
        bad |= ~(attn_mask.amax() < float("inf"))
    return bad.to(torch.int32).contiguous()


def _mode(data: Optional[torch.Tensor]) -> int:
    """The operand's KIND constexpr (common.py)."""
    if data is None:
        return KIND_FLOAT
    if data.dtype == torch.int8:
        return KIND_INT8
    if data.dtype == torch.uint8:
        return KIND_INT4
    if data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return KIND_FP8
    raise ValueError(f"attention_backward: unsupported quantized data dtype {data.dtype}")


def _row_params(name, x, data, scale, zp, B, H, S):
    """(operand tensor, its 4 strides, scale view (B,H,S) and 3 strides, zp view and 3
    strides, has_zp) for Q / K: a per-row (broadcast) scale."""
    if data is None:
        dummy = torch.zeros(1, 1, 1, dtype=torch.float32, device=x.device)
        return x, x.stride(), dummy, (0, 0, 0), dummy, (0, 0, 0), False
    if scale is None:
        raise ValueError(f"attention_backward: {name}_scale is required with {name}_data")
    if scale.dim() != 4 or scale.shape[-1] != 1:
        raise ValueError(f"attention_backward: {name}_scale must be broadcastable to (B, H, S, 1), "
                         f"got {tuple(scale.shape)}")
    sc = scale.to(torch.float32).expand(B, H, S, 1)[..., 0]
    if zp is not None:
        z = zp.to(torch.int32).expand(B, H, S, 1)[..., 0]
        return data, data.stride(), sc, sc.stride(), z, z.stride(), True
    return data, data.stride(), sc, sc.stride(), sc, sc.stride(), False


def _pick_dt(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def _candidates(kernel: str, block_d: int, dtype_bytes: int):
    """Tile candidates (autotune.Config: block_m, block_n, warps, stages) of one kernel.
    dq: BLOCK_M query rows per program, BLOCK_N keys per step; dkdv: BLOCK_N keys per
    program, BLOCK_M queries per step. The first one is the untuned default."""
    C = autotune.Config
    if dtype_bytes == 4:
        return ([C(64, 32, 4, 2), C(32, 32, 4, 2)] if kernel == "dq" else [C(32, 64, 4, 2), C(32, 32, 4, 2)])
    if block_d <= 64:
        if kernel == "dq":
            return [C(128, 64, 4, 3), C(128, 64, 8, 3), C(64, 64, 4, 3), C(128, 32, 4, 3), C(128, 128, 8, 2)]
        return [C(64, 128, 8, 3), C(32, 128, 4, 3), C(64, 64, 4, 3), C(128, 128, 8, 2)]
    if block_d <= 128:
        if kernel == "dq":
            return [C(128, 64, 8, 2), C(128, 64, 8, 3), C(64, 64, 4, 3), C(128, 32, 4, 3), C(128, 64, 4, 2)]
        return [C(64, 128, 8, 2), C(64, 128, 8, 3), C(32, 128, 4, 3), C(64, 64, 4, 3), C(128, 64, 8, 2)]
    if kernel == "dq":
        return [C(64, 32, 4, 2), C(64, 64, 4, 2), C(32, 32, 4, 2)]
    return [C(32, 64, 4, 2), C(64, 64, 4, 2), C(32, 32, 4, 2)]


def attention_backward_triton(
    grad_out, q, k, v, out, lse,
    q_data=None, q_scale=None, q_zero_point=None,
    k_data=None, k_scale=None, k_zero_point=None, k_mean=None,
    v_data=None, v_scale=None, v_zero_point=None,
    attn_mask=None, is_causal=False, scale=None, pv_precision="none",
    *, blocks=None,
):
    """Launch the three backward kernels. Works on CUDA tensors, and on CPU tensors under
    TRITON_INTERPRET=1. Returns (dq, dk, dv). `blocks` overrides the tile configuration
    ((BM, BN, warps, stages) for dQ, same for dK/dV); tests use it to exercise tails.
    Without it, CUDA launches pick tiles through flash_quant.cuda.autotune (timed once per
    key; FLASH_QUANT_AUTOTUNE=0 takes the first candidate)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention_backward: q, k, v must be rank 4 (B, H, S, D)")
    B, HQ, SQ, D = q.shape
    Bk, HKV, SKV, Dk = k.shape
    if Bk != B or Dk != D or tuple(v.shape) != (B, HKV, SKV, D):
        raise ValueError(f"attention_backward: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not agree")
    if HQ % HKV != 0:
        raise ValueError(f"attention_backward: Hq ({HQ}) must be a multiple of Hkv ({HKV})")
    if tuple(grad_out.shape) != (B, HQ, SQ, D) or tuple(out.shape) != (B, HQ, SQ, D):
        raise ValueError("attention_backward: grad_out and out must have q's shape")
    if tuple(lse.shape) != (B, HQ, SQ):
        raise ValueError(f"attention_backward: lse must be (B, Hq, Sq), got {tuple(lse.shape)}")
    if pv_precision not in ("none", "int8", "fp8_e4m3"):
        raise ValueError(f"attention_backward: unknown pv_precision {pv_precision!r}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"attention_backward: q dtype {q.dtype} is not fp32/fp16/bf16")
    if not head_dim_supported(D):
        raise ValueError(f"attention_backward: head dim {D} must be {HEAD_DIM_RULE}")
    group = HQ // HKV
    dev = grad_out.device
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    dt = _pick_dt(q.dtype)

    qmode, kmode, vmode = _mode(q_data), _mode(k_data), _mode(v_data)
    qt, sq_, qsc, s_qsc, qzp, s_qzp, q_zp = _row_params("q", q, q_data, q_scale, q_zero_point, B, HQ, SQ)
    kt, sk_, ksc, s_ksc, kzp, s_kzp, k_zp = _row_params("k", k, k_data, k_scale, k_zero_point, B, HKV, SKV)
    if qmode == KIND_INT4 and qt.shape[-1] * 2 != D:
        raise ValueError("attention_backward: INT4 q_data must have last dim D/2")
    if kmode == KIND_INT4 and kt.shape[-1] * 2 != D:
        raise ValueError("attention_backward: INT4 k_data must have last dim D/2")
    # V: elementwise-broadcast scale.
    if v_data is None:
        vt = v
        dummy = torch.zeros(1, dtype=torch.float32, device=dev)
        vsc, s_vsc, vzp, s_vzp, v_zp = dummy, (0, 0, 0, 0), dummy, (0, 0, 0, 0), False
    else:
        if v_scale is None:
            raise ValueError("attention_backward: v_scale is required with v_data")
        if vmode == KIND_INT4 and v_data.shape[-1] * 2 != D:
            raise ValueError("attention_backward: INT4 v_data must have last dim D/2")
        vt = v_data
        vsc = v_scale.to(torch.float32).expand(B, HKV, SKV, D)
        s_vsc = vsc.stride()
        if v_zero_point is not None:
            vzp = v_zero_point.to(torch.int32).expand(B, HKV, SKV, D)
            s_vzp, v_zp = vzp.stride(), True
        else:
            vzp, s_vzp, v_zp = vsc, s_vsc, False
    # INT8 tensor-core scores: both operands symmetric INT8.
    qk_int8 = qmode == KIND_INT8 and kmode == KIND_INT8 and not q_zp and not k_zp
    # lse correction for smoothed K (only meaningful with quantized K, whose dequantized
    # value is the smoothed K).
    has_kmean = k_data is not None and k_mean is not None and k_mean.numel() > 0
    if has_kmean:
        km = k_mean.to(torch.float32).expand(B, HKV, 1, D)[:, :, 0, :]
    else:
        km = torch.zeros(1, 1, 1, dtype=torch.float32, device=dev)
    # Centre K for dQ: unquantized K minus its mean over the sequence (the smoothed,
    # quantized K is already centred). Exact: rows of dS sum to zero.
    if k_data is None:
        kc = k.mean(dim=2, dtype=torch.float32)  # (B, Hkv, D), no fp32 copy of K
        has_kc = True
    else:
        kc, has_kc = km, False
    # Mask.
    mask_mode = MASK_NONE
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m.expand(B, HQ, SQ, SKV)
        if m.dtype == torch.bool:
            mask_mode = MASK_BOOL
            m = m.view(torch.uint8)  # same item size: a view, never a copy of the expansion
        else:
            mask_mode = MASK_ADDITIVE
        s_m = m.stride()
    else:
        m = torch.zeros(1, dtype=torch.uint8, device=dev)
        s_m = (0, 0, 0, 0)

    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    delta = torch.empty(B, HQ, SQ, dtype=torch.float32, device=dev)
    lse2 = torch.empty(B, HQ, SQ, dtype=torch.float32, device=dev)
    lse_c = lse.to(torch.float32).contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    BLOCK_D = max(16, next_pow2(D))
    interp = _INTERPRET or dev.type != "cuda"

    # every integer argument below is a function of the call's tensor signatures and flags:
    # the compiled kernels of host.launch are kept per signature
    sig = (tuple(tensor_signature(t) for t in (grad_out, q, k, v, out, lse, q_data, q_scale, q_zero_point,
                                                 k_data, k_scale, k_zero_point, k_mean, v_data, v_scale,
                                                 v_zero_point, attn_mask)), bool(is_causal))
    kernels = _KERNELS.get_or_put(sig, dict)

    pm = 16 if interp else 64
    host.launch(_bwd_preprocess, (cdiv(SQ, pm), B * HQ), (
        out, grad_out, lse_c, delta, lse2, qt, qsc, qzp, km,
        *out.stride(), *grad_out.stride(), *sq_, *s_qsc, *s_qzp, *km.stride(),
        HQ, group, SQ, D, sm_scale,
    ), dict(Q_MODE=qmode, Q_ZP=q_zp, HAS_KMEAN=has_kmean, BLOCK_M=pm, BLOCK_D=BLOCK_D), kernels, "pre")
    common_strides = (*sq_, *sk_, *vt.stride(), *grad_out.stride())
    if is_causal:  # per (b, query head) for dQ, per (b, kv head) (any of its group) for dK / dV
        nonfinite_q = _nonfinite_heads(grad_out, q if q_data is None else None, k if k_data is None else None,
                                       v if v_data is None else None, out, lse_c, attn_mask, group)
        nonfinite_kv = nonfinite_q.view(B, HKV, group).amax(dim=2).contiguous()
    else:
        nonfinite_q = nonfinite_kv = lse2  # dummies, never read

    def launch_dq(cfg):
        host.launch(_bwd_dq, (cdiv(SQ, cfg.block_m), B * HQ), (
            qt, kt, vt, grad_out, dq, lse2, delta, nonfinite_q,
            qsc, qzp, ksc, kzp, kc, vsc, vzp, m,
            *common_strides, *dq.stride(),
            *s_qsc, *s_qzp, *s_ksc, *s_kzp, *kc.stride(), *s_vsc, *s_vzp, *s_m,
            HQ, group, SQ, SKV, D, sm_scale,
        ), dict(Q_MODE=qmode, K_MODE=kmode, V_MODE=vmode, Q_ZP=q_zp, K_ZP=k_zp, V_ZP=v_zp,
                QK_INT8=qk_int8, HAS_KC=has_kc, MASK_MODE=mask_mode, IS_CAUSAL=bool(is_causal),
                DT=dt, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=BLOCK_D,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages), kernels, ("dq", cfg))

    def launch_dkdv(cfg):
        host.launch(_bwd_dkdv, (cdiv(SKV, cfg.block_n), B * HKV), (
            qt, kt, vt, grad_out, dk, dv, lse2, delta, nonfinite_kv,
            qsc, qzp, ksc, kzp, vsc, vzp, m,
            *common_strides, *dk.stride(), *dv.stride(),
            *s_qsc, *s_qzp, *s_ksc, *s_kzp, *s_vsc, *s_vzp, *s_m,
            HKV, group, SQ, SKV, D, sm_scale,
        ), dict(Q_MODE=qmode, K_MODE=kmode, V_MODE=vmode, Q_ZP=q_zp, K_ZP=k_zp, V_ZP=v_zp,
                QK_INT8=qk_int8, MASK_MODE=mask_mode, IS_CAUSAL=bool(is_causal),
                DT=dt, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=BLOCK_D,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages), kernels, ("dkdv", cfg))

    if blocks is not None:
        cfg_dq, cfg_kv = autotune.Config(*blocks[0]), autotune.Config(*blocks[1])
    elif interp:
        cfg_dq = cfg_kv = autotune.Config(16, 16, 4, 1)
    else:
        nbytes = q.element_size()
        key = (BLOCK_D, qk_int8, qmode, kmode, vmode, bool(is_causal), mask_mode, str(q.dtype),
               group > 1, min(next_pow2(max(SQ, SKV)), 8192))
        cand_dq, cand_kv = _candidates("dq", BLOCK_D, nbytes), _candidates("dkdv", BLOCK_D, nbytes)
        cfg_dq = autotune.select(("attention_backward_dq",) + key, cand_dq, cand_dq[0], launch_dq)
        cfg_kv = autotune.select(("attention_backward_dkdv",) + key, cand_kv, cand_kv[0], launch_dkdv)
    launch_dq(cfg_dq)
    launch_dkdv(cfg_kv)
    return dq, dk, dv


def _cuda_attention_backward(grad_out, q, k, v, out, lse,
                             q_data, q_scale, q_zero_point,
                             k_data, k_scale, k_zero_point, k_mean,
                             v_data, v_scale, v_zero_point,
                             attn_mask, is_causal, scale, pv_precision):
    with torch.cuda.device(grad_out.device):  # launch on the tensors' device, as the forward does
        return attention_backward_triton(
            grad_out, q, k, v, out, lse, q_data, q_scale, q_zero_point,
            k_data, k_scale, k_zero_point, k_mean, v_data, v_scale, v_zero_point,
            attn_mask, is_causal, scale, pv_precision)


def _register():
    import flash_quant._C  # noqa: F401  (defines the schemas)

    try:
        torch.library.register_kernel("flash_quant::attention_backward", "cuda", _cuda_attention_backward)
    except Exception as e:  # the schema lives in flash_quant._C; it must be loaded first
        raise RuntimeError(
            "flash_quant.cuda.backward: could not register the CUDA kernel of "
            "flash_quant::attention_backward (is flash_quant._C loaded?)") from e


_register()
