"""Triton split-KV decode over a QuantizedKVCache (issue 18 item 1; layout and schemes in
flash_quant/kv_cache.py, semantics in flash_quant/decode.py).

Decode reads every cached byte once per step and does little arithmetic on it, so the
kernel is shaped around bandwidth:

* the key range is split across programs (grid = splits x B*Hkv); each split runs an
  online softmax over its keys and writes an unnormalised partial (O, m, l); a second
  kernel merges the partials by their log-sum-exp;
* one program serves every query of a GQA group: its tile's rows are the G = Hq/Hkv
  query heads times the Sq queries, so each K/V tile is loaded once for all of them;
* codes are dequantized in registers (int8: q is multiplied by the keys' per-channel
  smoothing once, the per-token scales are applied to the scores and folded into P;
  int4 K: a tile is one K group, whose per-channel scale folds into q and zero into a
  per-row bias, so the codes enter the dot unconverted but for the cast; int4 V: nibbles unpacked into the two channel halves of the
  half-split layout, then scale and zero applied);
* the token count is read from the cache's device ``length_tensor`` and each split's
  range is derived from it in the kernel, so a CUDA graph captured at one length replays
  correctly at any later one (no host sync anywhere);
* launch plans (grid, constexprs, strides) are cached per call signature and kernels
  launched through their compiled launchers (host.py), for a low eager host cost.

Registered as the CUDA kernel of ``torch.ops.flash_quant.decode_attention``. Tile sizes and
split counts: :data:`DEFAULTS`, overridable per call of :func:`decode_launch` so the
benchmark can sweep them (benchmarks/bench_decode.py --sweep).
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Dict

import torch
import triton
import triton.language as tl

from .. import _C  # noqa: F401  (defines the op schemas)
from .._checks import check_decode_op
from .host import PlanCache, cdiv, launch, next_pow2, tensor_signature

__all__ = ["decode_attention_cuda", "decode_launch", "decode_cache", "DEFAULTS", "choose_splits"]

LOG2E = 1.4426950408889634
MIN_ROWS = 16              # tl.dot needs >= 16 rows: the G*Sq query rows are padded to it
MAX_ROWS = 64              # more G*Sq rows (e.g. MQA with 16 queries) take several row blocks,
                           # each reading the K/V tiles (registers bound the tile)
MIN_KEYS_PER_SPLIT = 256   # below this a split's fixed cost (q load, partial store) dominates
WAVES = 2                  # programs to aim for, in multiples of the SM count

#: Kernel parameters; any may be overridden by ``config=`` (num_splits None: choose_splits).
#: Chosen by `bench_decode.py --sweep --quick` (H100, 2026-12-06 11:20 UTC, 32/8 heads,
#: hd 128, CUDA-graph µs; docs/decode.md): INT8 block 64 / 4 warps / choose_splits is
#: within 5 % of the best of 18 settings at 1x32k (48.6 vs 46.3) and 8x8k (87.6 vs 86.2);
#: INT4 wants v_expand=1 (84.8 vs 96.2 µs at 1x32k, 160.2 vs 274.9 at 8x8k).
DEFAULTS = {"block_n": 64, "num_warps": 4, "num_stages": 3, "num_splits": None,
            "merge_warps": 4, "v_expand": 1}

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2
CACHE_PLANS = 64           # launch plans kept per cache (decode_cache)
LOG2E_C = tl.constexpr(LOG2E)  # (the kernel's copy: an additive mask is in natural-log units)

_PLANS = PlanCache()
#: decode_cache's plans per cache object (dropped with the cache; a copy of a cache, whose
#: buffers are others, starts without)
_CACHE_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SM_COUNT: Dict[int, int] = {}


@triton.jit
def _dot(a, b, DT: tl.constexpr, INPUT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b with both operands rounded to DT (q's dtype), fp32 accumulation. DOT_F32
    widens the rounded operands: the interpreter's bf16 dot is wrong (numpy has no bf16),
    and so is its int -> bf16 cast (hence the float32 step first)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32).to(DT).to(tl.float32), b.to(tl.float32).to(DT).to(tl.float32))
    else:
        return tl.dot(a.to(DT), b.to(DT), input_precision=INPUT_PREC)


@triton.jit
def _v_group_params(g_rows, z_rows, nok, dh, BLOCK_N: tl.constexpr, HALF: tl.constexpr,
                    VG: tl.constexpr, V_EXPAND: tl.constexpr):
    """int4 V: each channel's scale and zero, (BLOCK_N, HALF) per channel half, fp32.
    V_EXPAND 0 gathers them per channel (one load per element, served by L1); 1 loads one
    per group and broadcasts it across the group's VG channels in registers (needs
    VG <= HALF). Which is faster is for the GPU to say (bench_decode.py --sweep)."""
    if V_EXPAND == 0:
        g_lo = (dh // VG)[None, :]
        g_hi = ((HALF + dh) // VG)[None, :]
        s_lo = tl.load(g_rows + g_lo, mask=nok[:, None], other=0.0).to(tl.float32)
        z_lo = tl.load(z_rows + g_lo, mask=nok[:, None], other=0.0).to(tl.float32)
        s_hi = tl.load(g_rows + g_hi, mask=nok[:, None], other=0.0).to(tl.float32)
        z_hi = tl.load(z_rows + g_hi, mask=nok[:, None], other=0.0).to(tl.float32)
    else:
        NGH: tl.constexpr = HALF // VG
        gi = tl.arange(0, NGH)[None, :]
        s_lo = tl.load(g_rows + gi, mask=nok[:, None], other=0.0).to(tl.float32)
        z_lo = tl.load(z_rows + gi, mask=nok[:, None], other=0.0).to(tl.float32)
        s_hi = tl.load(g_rows + NGH + gi, mask=nok[:, None], other=0.0).to(tl.float32)
        z_hi = tl.load(z_rows + NGH + gi, mask=nok[:, None], other=0.0).to(tl.float32)
        s_lo = tl.reshape(tl.broadcast_to(s_lo[:, :, None], (BLOCK_N, NGH, VG)), (BLOCK_N, HALF))
        z_lo = tl.reshape(tl.broadcast_to(z_lo[:, :, None], (BLOCK_N, NGH, VG)), (BLOCK_N, HALF))
        s_hi = tl.reshape(tl.broadcast_to(s_hi[:, :, None], (BLOCK_N, NGH, VG)), (BLOCK_N, HALF))
        z_hi = tl.reshape(tl.broadcast_to(z_hi[:, :, None], (BLOCK_N, NGH, VG)), (BLOCK_N, HALF))
    return s_lo, z_lo, s_hi, z_hi


@triton.jit
def _decode_split_kernel(
        q_ptr, sq_b, sq_h, sq_s,
        kc_ptr, ks_ptr, kz_ptr, kw_ptr, ksm_ptr, vc_ptr, vs_ptr, vz_ptr,
        skc, sks, skw, svc, svs,
        len_ptr,
        mask_ptr, sm_b, sm_h, sm_s, sm_n,
        ws_ptr, scale_log2,
        HKV: tl.constexpr, GQ: tl.constexpr, SQ: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, KG: tl.constexpr,
        VG: tl.constexpr, NUM_SPLITS: tl.constexpr, MASK_KIND: tl.constexpr,
        INPUT_PREC: tl.constexpr, DOT_F32: tl.constexpr, V_EXPAND: tl.constexpr,
        ROWS: tl.constexpr):
    HALF: tl.constexpr = D // 2
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    length = tl.load(len_ptr)
    tiles = tl.cdiv(tl.cdiv(length, BLOCK_N), NUM_SPLITS)
    start = split * tiles * BLOCK_N
    end = tl.minimum(start + tiles * BLOCK_N, length)

    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # (row blocks: GQ*SQ > MAX_ROWS)
    row_ok = rows < GQ * SQ
    qh = hkv * GQ + rows // SQ           # query head of each row
    qi = rows % SQ                       # query index (0 .. Sq-1) of each row
    dh = tl.arange(0, HALF)
    q_rows = q_ptr + b * sq_b + qh * sq_h + qi * sq_s
    q_lo = tl.load(q_rows[:, None] + dh[None, :], mask=row_ok[:, None], other=0.0)
    q_hi = tl.load(q_rows[:, None] + HALF + dh[None, :], mask=row_ok[:, None], other=0.0)
    DT = q_lo.dtype
    if BITS == 8:  # int8 keys are stored divided by the per-channel k_smooth: q takes it
        q_lo = (q_lo.to(tl.float32) * tl.load(ksm_ptr + bh * D + dh)[None, :]).to(DT)
        q_hi = (q_hi.to(tl.float32) * tl.load(ksm_ptr + bh * D + HALF + dh)[None, :]).to(DT)
    last_visible = length - SQ + qi      # bottom-right causal default

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_lo = tl.zeros((BLOCK_M, HALF), tl.float32)
    acc_hi = tl.zeros((BLOCK_M, HALF), tl.float32)
    nfull = (length // KG) * KG          # int4: keys before nfull are codes, after: window

    kc_base = kc_ptr + bh * skc
    vc_base = vc_ptr + bh * svc
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nok = offs < end
        # ---- scores
        if BITS == 8:
            k_lo = tl.load(kc_base + offs[:, None] * D + dh[None, :], mask=nok[:, None], other=0)
            k_hi = tl.load(kc_base + offs[:, None] * D + HALF + dh[None, :], mask=nok[:, None], other=0)
            s = _dot(q_lo, tl.trans(k_lo), DT, INPUT_PREC, DOT_F32)
            s += _dot(q_hi, tl.trans(k_hi), DT, INPUT_PREC, DOT_F32)
            k_scale = tl.load(ks_ptr + bh * sks + offs, mask=nok, other=0.0)
            s = s * (k_scale * scale_log2)[None, :]
        else:
            # int4 tiles are whole K groups (BLOCK_N == KG, and nfull is a multiple of
            # KG): a tile is all codes or all window. Both scores are computed and one
            # selected (the other's loads are masked off): a branch-free loop body is
            # what the compiler software-pipelines.
            coded = n0 < nfull
            # (the masks below are tensors, as the interpreter of Triton >= 3.9 wants: a
            # scalar condition and-ed into a mask fails there)
            coded_keys = offs < nfull  # (all or none of the tile)
            coded_ch = dh < tl.where(coded, HALF, 0)  # the half's channels, none in the window
            # The group's per-channel scale and zero fold into q: q.(c*sc + z) =
            # (q*sc).c + q.z, so codes enter the dot as they are (0..15, exact in DT).
            grp = ks_ptr + bh * sks + (n0 // KG) * D
            zgrp = kz_ptr + bh * sks + (n0 // KG) * D
            sc_lo = tl.load(grp + dh, mask=coded_ch, other=0.0).to(tl.float32)
            sc_hi = tl.load(grp + HALF + dh, mask=coded_ch, other=0.0).to(tl.float32)
            z_lo = tl.load(zgrp + dh, mask=coded_ch, other=0.0).to(tl.float32)
            z_hi = tl.load(zgrp + HALF + dh, mask=coded_ch, other=0.0).to(tl.float32)
            qf_lo = q_lo.to(tl.float32)
            qf_hi = q_hi.to(tl.float32)
            bias = tl.sum(qf_lo * z_lo[None, :], 1) + tl.sum(qf_hi * z_hi[None, :], 1)
            packed = tl.load(kc_base + offs[:, None] * HALF + dh[None, :], mask=(nok & coded_keys)[:, None], other=0)
            s_coded = _dot(qf_lo * sc_lo[None, :], tl.trans(packed & 0xF), DT, INPUT_PREC, DOT_F32)
            s_coded += _dot(qf_hi * sc_hi[None, :], tl.trans(packed >> 4), DT, INPUT_PREC, DOT_F32)
            s_coded += bias[:, None]
            windowed = nok & (offs >= nfull)
            w_rows = kw_ptr + bh * skw + (offs - nfull)[:, None] * D
            w_lo = tl.load(w_rows + dh[None, :], mask=windowed[:, None], other=0.0)
            w_hi = tl.load(w_rows + HALF + dh[None, :], mask=windowed[:, None], other=0.0)
            s_window = _dot(q_lo, tl.trans(w_lo), DT, INPUT_PREC, DOT_F32)
            s_window += _dot(q_hi, tl.trans(w_hi), DT, INPUT_PREC, DOT_F32)
            s = tl.where(coded, s_coded, s_window)
            s = s * scale_log2
        # ---- masks
        if MASK_KIND == 0:
            visible = nok[None, :] & (offs[None, :] <= last_visible[:, None])
            s = tl.where(visible, s, float("-inf"))
        else:
            mrow = mask_ptr + b * sm_b + qh * sm_h + qi * sm_s
            mval = tl.load(mrow[:, None] + offs[None, :] * sm_n, mask=row_ok[:, None] & nok[None, :], other=0)
            if MASK_KIND == 1:
                s = tl.where((mval != 0) & nok[None, :], s, float("-inf"))
            else:
                s = tl.where(nok[None, :], s + mval.to(tl.float32) * LOG2E_C, float("-inf"))
        # ---- online softmax (base 2)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
        # ---- values
        if BITS == 8:
            v_scale = tl.load(vs_ptr + bh * svs + offs, mask=nok, other=0.0)
            pv = p * v_scale[None, :]
            v_lo = tl.load(vc_base + offs[:, None] * D + dh[None, :], mask=nok[:, None], other=0)
            v_hi = tl.load(vc_base + offs[:, None] * D + HALF + dh[None, :], mask=nok[:, None], other=0)
            acc_lo += _dot(pv, v_lo, DT, INPUT_PREC, DOT_F32)
            acc_hi += _dot(pv, v_hi, DT, INPUT_PREC, DOT_F32)
        else:
            packed = tl.load(vc_base + offs[:, None] * HALF + dh[None, :], mask=nok[:, None], other=0)
            g_rows = vs_ptr + bh * svs + offs[:, None] * (D // VG)
            z_rows = vz_ptr + bh * svs + offs[:, None] * (D // VG)
            s_lo, z_lo, s_hi, z_hi = _v_group_params(g_rows, z_rows, nok, dh, BLOCK_N, HALF, VG, V_EXPAND)
            v_lo = (packed & 0xF).to(tl.float32) * s_lo + z_lo
            v_hi = (packed >> 4).to(tl.float32) * s_hi + z_hi
            acc_lo += _dot(p, v_lo, DT, INPUT_PREC, DOT_F32)
            acc_hi += _dot(p, v_hi, DT, INPUT_PREC, DOT_F32)
        m_i = m_new

    # partials of the real rows only (the padding rows are never merged)
    # (the workspace: O partials (ROWS, D), then m (ROWS,), then l (ROWS,); real rows only)
    part = (bh * NUM_SPLITS + split) * (GQ * SQ) + rows
    tl.store(ws_ptr + part[:, None] * D + dh[None, :], acc_lo, mask=row_ok[:, None])
    tl.store(ws_ptr + part[:, None] * D + HALF + dh[None, :], acc_hi, mask=row_ok[:, None])
    tl.store(ws_ptr + ROWS * D + part, m_i, mask=row_ok)
    tl.store(ws_ptr + ROWS * (D + 1) + part, l_i, mask=row_ok)


@triton.jit
def _decode_merge_kernel(ws_ptr, out_ptr, so_b, so_h, so_s,
                         HKV: tl.constexpr, GQ: tl.constexpr, SQ: tl.constexpr,
                         D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         SPLITS_P2: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // (GQ * SQ)
    r = pid % (GQ * SQ)
    sp = tl.arange(0, SPLITS_P2)
    ok = sp < NUM_SPLITS
    part = (bh * NUM_SPLITS + sp) * (GQ * SQ) + r
    m = tl.load(ws_ptr + ROWS * D + part, mask=ok, other=float("-inf"))
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)              # a split that saw no visible key: m = -inf, w = 0
    l = tl.sum(tl.load(ws_ptr + ROWS * (D + 1) + part, mask=ok, other=0.0) * w, 0)
    d = tl.arange(0, D)
    o = tl.load(ws_ptr + part[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    o = tl.sum(o * w[:, None], 0)
    out = tl.where(l > 0, o / tl.where(l > 0, l, 1.0), 0.0)  # no visible key: 0
    b = bh // HKV
    h = (bh % HKV) * GQ + r // SQ
    tl.store(out_ptr + b * so_b + h * so_h + (r % SQ) * so_s + d, out.to(out_ptr.dtype.element_ty))


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_splits(max_len: int, heads: int, sm_count: int) -> int:
    """Splits of the key range: enough programs for WAVES waves of the SMs, but no split
    shorter than MIN_KEYS_PER_SPLIT keys of the cache's capacity. (The capacity, not the
    current length: that is on the device, and a fixed grid is what a captured graph
    replays; the kernel spreads the actual keys evenly over the splits.)"""
    return max(1, min(cdiv(WAVES * sm_count, heads), cdiv(max_len, MIN_KEYS_PER_SPLIT)))


def _mask_view(attn_mask):
    """The mask as 4 dims with stride 0 where it broadcasts; bool as uint8 (same bytes)."""
    if attn_mask is None:
        return None
    m = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m.as_strided(m.shape, [st if n > 1 else 0 for n, st in zip(m.shape, m.stride())])


def _make_plan(q, k_codes, v_codes, mask, scale, precision, k_group, v_group, cfg):
    b, hq, sq, d = q.shape
    if d < 32 or d & (d - 1):
        raise ValueError(f"decode_attention (CUDA): head_dim must be a power of two >= 32, got {d}")
    hkv = k_codes.shape[1]
    gq = hq // hkv
    block_m = min(MAX_ROWS, max(MIN_ROWS, next_pow2(gq * sq)))
    int4 = precision == "int4"
    if int4 and (k_group < MIN_ROWS or k_group & (k_group - 1)):
        raise ValueError(f"decode_attention (CUDA): int4 tiles are K groups: k_group must be a power of "
                         f"two >= {MIN_ROWS}, got {k_group}")
    block_n = k_group if int4 else cfg["block_n"]  # int4: one K group a tile
    splits = cfg["num_splits"]
    if splits is None:
        splits = choose_splits(v_codes.shape[2], b * hkv, _sm_count(q.device))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kind = MASK_NONE if mask is None else (MASK_BOOL if mask.dtype == torch.uint8 else MASK_ADD)
    meta = dict(HKV=hkv, GQ=gq, SQ=sq, BLOCK_M=block_m, BLOCK_N=block_n, D=d,
                BITS=4 if int4 else 8, KG=k_group if int4 else 1, VG=v_group if int4 else 1,
                NUM_SPLITS=splits, MASK_KIND=kind,
                INPUT_PREC="ieee" if q.dtype == torch.float32 else None,  # fp32 q: no tf32
                DOT_F32=os.environ.get("TRITON_INTERPRET", "0") == "1" and q.dtype == torch.bfloat16,
                V_EXPAND=cfg["v_expand"] if int4 and v_group <= d // 2 and (d // 2) % v_group == 0 else 0,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    rows = b * hkv * splits * gq * sq
    meta["ROWS"] = rows
    merge_meta = dict(HKV=hkv, GQ=gq, SQ=sq, D=d, NUM_SPLITS=splits,
                      SPLITS_P2=next_pow2(splits), ROWS=rows, num_warps=cfg["merge_warps"])
    return {"grid": (splits, b * hkv, cdiv(gq * sq, block_m)), "merge_grid": (b * hkv * gq * sq,), "meta": meta,
            "merge_meta": merge_meta, "scale_log2": scale * LOG2E, "ws_numel": rows * (d + 2),
            "out_strides": (hq * sq * d, sq * d, d),  # out: contiguous, q's shape
            "kernels": {}, "merge_kernels": {}}


def _static_args(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale, v_zero, length):
    """The split kernel's arguments after q that depend only on the cache's buffers."""
    unused = k_scale  # a valid pointer for the buffers this precision has not
    kz, ksm, kw, vz = (t if t is not None else unused for t in (k_zero, k_smooth, k_window, v_zero))
    return (q.stride(0), q.stride(1), q.stride(2),
            k_codes, k_scale, kz, kw, ksm, v_codes, v_scale, vz,
            k_codes.stride(1), k_scale.stride(1), kw.stride(1), v_codes.stride(1), v_scale.stride(1),
            length)


def _run(plan, q, static, attn_mask, key):
    """Allocate the workspace and output, launch the split and merge kernels."""
    mask = _mask_view(attn_mask)
    ws = torch.empty(plan["ws_numel"], dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    m_args = (mask, *mask.stride()) if mask is not None else (q, 0, 0, 0, 0)
    launch(_decode_split_kernel, plan["grid"], (q, *static, *m_args, ws, plan["scale_log2"]),
           plan["meta"], plan["kernels"], key)
    launch(_decode_merge_kernel, plan["merge_grid"], (ws, out, *plan["out_strides"]),
           plan["merge_meta"], plan["merge_kernels"], key)
    return out


def decode_launch(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale, v_zero,
                  length, attn_mask, scale, precision, k_group, v_group, config=None):
    """The decode_attention op on CUDA (arguments as its schema, checked already);
    `config` overrides :data:`DEFAULTS` (benchmark sweeps)."""
    cfg = DEFAULTS if not config else {**DEFAULTS, **config}
    q = q if q.stride(-1) == 1 else q.contiguous()
    bufs = (k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale, v_zero)
    key = (tensor_signature(q), *(tensor_signature(t) for t in bufs), tensor_signature(_mask_view(attn_mask)),
           scale, precision, k_group, v_group, tuple(sorted(cfg.items())))
    plan = _PLANS.get_or_put(key, lambda: _make_plan(q, k_codes, v_codes, _mask_view(attn_mask), scale,
                                                      precision, k_group, v_group, cfg))
    static = _static_args(q, *bufs, length)
    return _run(plan, q, static, attn_mask, key)


def decode_cache(q, cache, attn_mask=None, scale=None, config=None):
    """flash_quant.decode_attention's eager CUDA path (its checks done): the op's kernel
    without the dispatcher, with the plan and the buffer arguments kept on the cache
    (``_CACHE_PLANS``) per query / mask signature, so a decode loop's call costs
    two allocations and two launches of host work. (torch.compile traces the op.)"""
    mask_sig = None if attn_mask is None else (attn_mask.shape, attn_mask.stride(), attn_mask.dtype)
    key = ("cuda", q.shape, q.stride(), q.dtype, q.device, mask_sig, scale,
           None if config is None else tuple(sorted(config.items())))
    plans = _CACHE_PLANS.get(cache)
    if plans is None:
        plans = _CACHE_PLANS[cache] = {}
    entry = plans.get(key)
    if entry is None:
        if q.stride(-1) != 1:
            return decode_launch(q, *cache.kernel_buffers(), cache.length_tensor, attn_mask, scale,
                                 cache.precision, cache.k_group or 0, cache.v_group or 0, config)
        cfg = DEFAULTS if not config else {**DEFAULTS, **config}
        bufs = cache.kernel_buffers()
        check_decode_op(q, *bufs, cache.length_tensor, attn_mask, cache.precision, cache.k_group or 0,
                        cache.v_group or 0)
        plan = _make_plan(q, cache.k_codes, cache.v_codes, _mask_view(attn_mask), scale, cache.precision,
                          cache.k_group or 0, cache.v_group or 0, cfg)
        entry = (plan, _static_args(q, *bufs, cache.length_tensor))
        if len(plans) >= CACHE_PLANS:  # (a masked loop makes one per length)
            plans.clear()
        plans[key] = entry
    plan, static = entry
    return _run(plan, q, static, attn_mask, "cache")  # (the plan's own kernels dict)


def decode_attention_cuda(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale,
                          v_zero, length, attn_mask, scale, precision, k_group, v_group):
    check_decode_op(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale, v_zero,
                    length, attn_mask, precision, k_group, v_group)
    return decode_launch(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale, v_zero,
                         length, attn_mask, scale, precision, k_group, v_group)


torch.library.register_kernel("flash_quant::decode_attention", "cuda", decode_attention_cuda)
