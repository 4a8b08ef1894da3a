"""Study kernels (not used by the package): a Hopper (sm_90) attention forward in Gluon
with explicit asynchronous warpgroup MMAs, timed by benchmarks/wgmma_study.py against
flash_quant's Triton kernel (flash_quant/cuda/forward.py), which serves every case of
the op contract. On Hopper its key
loop is bound by the softmax instruction stream, and Triton's scheduler leaves the tensor
cores idle while the softmax runs (benchmarks/results/forward_study_2026-11-23.md). This
kernel covers the presets' common case with the schedule written out by hand:

* K / V tiles stream through a ring of ``NUM_BUF`` shared-memory slots, filled by TMA
  (4-D descriptors over (B, H, S, D): any batch / head / sequence strides, tails
  zero-filled by the copy engine), each slot with its own mbarrier;
* the loop issues Q·K_jᵀ and P_{j-1}·V_{j-1} as asynchronous wgmmas, waits for the first
  only, and computes the softmax of tile j while the tensor cores run P_{j-1}·V_{j-1}
  (FlashAttention-3's intra-warpgroup overlap);
* the math is that of forward.py's QK_MODE 0 (INT8 Q·Kᵀ, int32 accumulation, per-row Q
  and per-key K scales) with PV_MODE 0 (16-bit P, 16-bit V) or PV_MODE 2 (INT8 P per key
  tile against the tile's row max, INT8 V per channel, stored transposed: K-major).

``attention_fwd_ws_kernel`` adds FA3's ping-pong: two consumer warpgroups of BLOCK_M
rows (a warp_specialize default partition and worker) alternate their matmul issue
through mbarriers while a producer warp runs the TMA ring.

Scope: the presets' common case only (no masks, zero points, INT4 / FP8 operands,
split-KV, packed GQA; head dims 64 and 128; fp16 / bf16). Outcome on the H200 of
2026-12-02 (benchmarks/results/wgmma_study_2026-12-02_h200.md): correct, but no faster
than the Triton kernel where it matters, so the package does not ship it.
"""
from __future__ import annotations

from typing import Optional

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from flash_quant.cuda.common import KIND_FLOAT
from flash_quant.cuda.host import cdiv

LOG2E = 1.4426950408889634


@gluon.jit
def _i2f(x):
    """int32 (|x| < 2**22) -> fp32 exactly: integer add + float subtract (full-rate
    instructions) instead of the quarter-rate conversion."""
    return (x + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0


@gluon.jit
def _f2i(x):
    """fp32 (|x| < 2**22) -> nearest int32 (ties to even) by the same bit trick."""
    return (x + 12582912.0).to(gl.int32, bitcast=True) - 0x4B400000


@gluon.jit
def _softmax_step(S, m_i, l_i, qs2, ks_base, sks_s, n0, offs_m, Skv,
                  MASKED: gl.constexpr, IS_CAUSAL: gl.constexpr, PV_INT8: gl.constexpr,
                  P_DTYPE: gl.constexpr, p_layout: gl.constexpr, s_layout: gl.constexpr,
                  BLOCK_N: gl.constexpr):
    """Online-softmax update of one key tile. S: the int32 Q·Kᵀ tile. Returns the new
    row max and sum, alpha (the old accumulator's factor), P in the P·V operand layout
    and c (INT8 P: the factor of the tile's int32 P·V; 16-bit P: unused)."""
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    if MASKED:
        ks = gl.load(ks_base + offs_n * sks_s, mask=offs_n < Skv, other=0.0)
    else:
        ks = gl.load(ks_base + offs_n * sks_s)
    t = _i2f(S) * ks[None, :]  # the base-2 logits without the per-row factor qs2 (> 0)
    if MASKED:
        visible = offs_n[None, :] < Skv
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = gl.where(visible, t * qs2[:, None], float("-inf"))
        m_tile = gl.max(s, 1)
        m_new = gl.maximum(m_i, m_tile)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        if PV_INT8:
            mt_use = gl.where(m_tile == float("-inf"), 0.0, m_tile)
            e = gl.exp2(s - mt_use[:, None])
        else:
            e = gl.exp2(s - m_use[:, None])
    else:
        # qs2 > 0 commutes with the max; one FMA per score applies it and subtracts
        m_tile = gl.max(t, 1) * qs2
        m_new = gl.maximum(m_i, m_tile)
        m_use = m_new
        if PV_INT8:
            e = gl.exp2(t * qs2[:, None] - m_tile[:, None])
        else:
            e = gl.exp2(t * qs2[:, None] - m_new[:, None])
    alpha = gl.exp2(m_i - m_use)
    if PV_INT8:
        # int8 P against the tile's own row max (codes round(127 e), e in [0, 1]); the
        # tile's factor beta = exp2(tile max - running max) goes on its product
        beta = gl.exp2(m_tile - m_use)  # (m_tile, not mt_use: a row with no visible key here gets 0)
        l_new = l_i * alpha + beta * gl.sum(e, 1)
        p = gl.convert_layout(_f2i(e * 127.0).to(gl.int8), p_layout)
        c = beta * (1.0 / 127.0)
    else:
        l_new = l_i * alpha + gl.sum(e, 1)
        p = gl.convert_layout(e.to(P_DTYPE), p_layout)
        c = alpha  # (unused)
    return m_new, l_new, alpha, p, c


@gluon.jit
def _softmax_tile(S, m_i, l_i, qs2, ks_base, sks_s, j, n_full, offs_m, Skv,
                  IS_CAUSAL: gl.constexpr, PV_INT8: gl.constexpr, P_DTYPE: gl.constexpr,
                  p_layout: gl.constexpr, s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """_softmax_step of key tile j, masked only past the full tiles (causal diagonal, tail)."""
    if j < n_full:
        return _softmax_step(S, m_i, l_i, qs2, ks_base, sks_s, j * BLOCK_N, offs_m, Skv,
                             False, IS_CAUSAL, PV_INT8, P_DTYPE, p_layout, s_layout, BLOCK_N)
    else:
        return _softmax_step(S, m_i, l_i, qs2, ks_base, sks_s, j * BLOCK_N, offs_m, Skv,
                             True, IS_CAUSAL, PV_INT8, P_DTYPE, p_layout, s_layout, BLOCK_N)


@gluon.jit
def _rescale(acc, pv, alpha, c_prev, PV_INT8: gl.constexpr, o_layout: gl.constexpr):
    """The accumulator after the previous tile's P·V, moved to the new running max."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    alpha_o = gl.convert_layout(alpha, row_o)
    if PV_INT8:
        return (acc + _i2f(pv) * gl.convert_layout(c_prev, row_o)[:, None]) * alpha_o[:, None]
    else:
        return pv * alpha_o[:, None]


@gluon.jit
def _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, b, hk, tile, n_tiles,
              DO_K: gl.constexpr, DO_V: gl.constexpr, PV_INT8: gl.constexpr,
              BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr):
    """TMA copies of key tile `tile` (K and / or V) into its ring slot, if it exists."""
    slot = tile % NUM_BUF
    pred = tile < n_tiles
    if DO_K:
        kb = k_bars.index(slot)
        mbarrier.expect(kb, k_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [b, hk, tile * BLOCK_N, 0], kb, k_smem.index(slot), pred=pred)
    if DO_V:
        vb = v_bars.index(slot)
        mbarrier.expect(vb, v_desc.block_type.nbytes, pred=pred)
        if PV_INT8:  # V codes stored (B, H, D, S): the tile is (D, BLOCK_N)
            tma.async_copy_global_to_shared(v_desc, [b, hk, 0, tile * BLOCK_N], vb, v_smem.index(slot), pred=pred)
        else:
            tma.async_copy_global_to_shared(v_desc, [b, hk, tile * BLOCK_N, 0], vb, v_smem.index(slot), pred=pred)


@gluon.jit
def _pv(p, v_smem, v_bars, tile, acc, PV_INT8: gl.constexpr, HEAD_DIM: gl.constexpr,
        BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr, o_layout: gl.constexpr):
    """Issue P·V of key tile `tile` (asynchronous): into acc (16-bit P) or into a fresh
    int32 tile (INT8 P, rescaled per row by the caller)."""
    slot = tile % NUM_BUF
    mbarrier.wait(v_bars.index(slot), (tile // NUM_BUF) & 1)
    if PV_INT8:
        v = v_smem.index(slot).reshape([HEAD_DIM, BLOCK_N]).permute((1, 0))
        zero = gl.zeros([acc.shape[0], HEAD_DIM], gl.int32, layout=o_layout)
        return warpgroup_mma(p, v, zero, use_acc=False, is_async=True)
    else:
        v = v_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        return warpgroup_mma(p, v, acc, is_async=True)


@gluon.jit
def _store_out(acc, l_i, m_i, qkm, VS, O, LSE, b, h, hk, m0, Sq, Hq, svs_b, svs_h, svs_d,
               sob, soh, som, sod, PV_INT8: gl.constexpr, HAS_KM: gl.constexpr,
               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, s_layout: gl.constexpr,
               o_layout: gl.constexpr):
    """Epilogue of BLOCK_M rows from m0: normalise, V's per-channel scale, store O and lse."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    if PV_INT8:
        vsc = gl.load(VS + b * svs_b + hk * svs_h + offs_d * svs_d)
        out = out * vsc[None, :]
    offs_mo = m0 + gl.arange(0, BLOCK_M, layout=row_o)
    o_ptrs = (O + b.to(gl.int64) * sob + h.to(gl.int64) * soh
              + offs_mo.to(gl.int64)[:, None] * som + offs_d[None, :] * sod)
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_mo < Sq)[:, None])
    empty = l_i == 0.0
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(gl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if HAS_KM:
        lse = lse + qkm
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + (b * Hq + h).to(gl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)


@gluon.jit
def attention_fwd_wgmma_kernel(
        q_desc, k_desc, v_desc, QS, KS, KM, VS, O, LSE,
        qk_scale, sm_scale, Hq, kv_group, Sq, Skv,
        sqs_b, sqs_h, sqs_s, sks_b, sks_h, sks_s, skm_b, skm_h, skm_d, svs_b, svs_h, svs_d,
        sob, soh, som, sod,
        PV_INT8: gl.constexpr, HAS_KM: gl.constexpr, IS_CAUSAL: gl.constexpr,
        P_DTYPE: gl.constexpr, PV_K: gl.constexpr, PV_KWIDTH: gl.constexpr,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        NUM_BUF: gl.constexpr, num_warps: gl.constexpr):
    # ---- layouts: the wgmma accumulators, P as the register A operand of P·V
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, PV_K])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=PV_KWIDTH)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    n_m = gl.num_programs(0)
    pid_m = gl.program_id(0)
    if IS_CAUSAL:
        pid_m = n_m - 1 - pid_m  # heaviest (longest) rows first
    pid_bh = gl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // kv_group
    start_m = pid_m * BLOCK_M

    # ---- key range: full tiles need no masking; the causal diagonal and the tail do
    if IS_CAUSAL:
        hi = gl.minimum(Skv, start_m + BLOCK_M)
        n_full = gl.minimum((start_m + 1) // BLOCK_N, Skv // BLOCK_N)
    else:
        hi = Skv
        n_full = Skv // BLOCK_N
    n_tiles = gl.cdiv(hi, BLOCK_N)

    # ---- shared memory and barriers
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_BUF, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    if PV_INT8:
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, 1, 1, HEAD_DIM, BLOCK_N], v_desc.layout)
    else:
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, start_m, 0], q_bar, q_smem)
    for i in gl.static_range(NUM_BUF):
        _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, b, hk, i, n_tiles,
                  True, True, PV_INT8, BLOCK_N, NUM_BUF)

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=row_s)
    mmask = offs_m < Sq
    q_scale = gl.load(QS + b * sqs_b + h * sqs_h + offs_m * sqs_s, mask=mmask, other=0.0)
    qs2 = q_scale * qk_scale
    ks_base = KS + b * sks_b + hk * sks_h

    mbarrier.wait(q_bar, 0)
    q = q_smem.reshape([BLOCK_M, HEAD_DIM])
    qkm = q_scale  # (a placeholder when there is no k_mean)
    if HAS_KM:  # k_mean's lse term: (Q codes . k_mean) * q_scale * scale
        kml: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        qc = q.load(kml).to(gl.float32)
        km = gl.load(KM + b * skm_b + hk * skm_h
                     + gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kml)) * skm_d)
        qkm = gl.convert_layout(gl.sum(qc * km[None, :], 1), row_s) * q_scale * sm_scale

    # ---- tile 0
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    mbarrier.wait(k_bars.index(0), 0)
    S = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                      use_acc=False, is_async=True)
    S = warpgroup_mma_wait(0, deps=(S,))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    m_i, l_i, alpha, p, c = _softmax_tile(S, m_i, l_i, qs2, ks_base, sks_s, 0, n_full, offs_m, Skv,
                                          IS_CAUSAL, PV_INT8, P_DTYPE, p_layout, s_layout, BLOCK_N)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    if num_warps > 4:  # every warpgroup is done with K slot 0 (one warpgroup: its wait says so)
        gl.thread_barrier()
    _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, b, hk, NUM_BUF, n_tiles,
              True, False, PV_INT8, BLOCK_N, NUM_BUF)

    # ---- steady state: Q·K_jᵀ and P_{j-1}·V_{j-1} in flight, softmax of j under the second
    for j in range(1, n_tiles):
        slot = j % NUM_BUF
        mbarrier.wait(k_bars.index(slot), (j // NUM_BUF) & 1)
        S = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                          use_acc=False, is_async=True)
        pv = _pv(p, v_smem, v_bars, j - 1, acc, PV_INT8, HEAD_DIM, BLOCK_N, NUM_BUF, o_layout)
        S = warpgroup_mma_wait(1, deps=(S,))
        c_prev = c
        m_i, l_i, alpha, p, c = _softmax_tile(S, m_i, l_i, qs2, ks_base, sks_s, j, n_full, offs_m, Skv,
                                              IS_CAUSAL, PV_INT8, P_DTYPE, p_layout, s_layout, BLOCK_N)
        pv = warpgroup_mma_wait(0, deps=(pv,))
        acc = _rescale(acc, pv, alpha, c_prev, PV_INT8, o_layout)
        if num_warps > 4:  # every warpgroup is done with K slot j and V slot j-1
            gl.thread_barrier()
        _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, b, hk, j + NUM_BUF, n_tiles,
                  True, False, PV_INT8, BLOCK_N, NUM_BUF)
        _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, b, hk, j - 1 + NUM_BUF, n_tiles,
                  False, True, PV_INT8, BLOCK_N, NUM_BUF)

    # ---- the last tile's P·V
    pv = _pv(p, v_smem, v_bars, n_tiles - 1, acc, PV_INT8, HEAD_DIM, BLOCK_N, NUM_BUF, o_layout)
    pv = warpgroup_mma_wait(0, deps=(pv,))
    if PV_INT8:
        acc = acc + _i2f(pv) * gl.convert_layout(c, row_o)[:, None]
    else:
        acc = pv
    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    mbarrier.invalidate(q_bar)

    _store_out(acc, l_i, m_i, qkm, VS, O, LSE, b, h, hk, start_m, Sq, Hq, svs_b, svs_h, svs_d,
               sob, soh, som, sod, PV_INT8, HAS_KM, HEAD_DIM, BLOCK_M, s_layout, o_layout)


# ------------------------------------------------------- warp-specialized (ping-pong)
@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty,
                 b, h, hk, start_m, n_tiles, PV_INT8: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr):
    """One warp: the two Q halves, then K / V tiles into the ring as slots free up."""
    for w in gl.static_range(2):
        mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, start_m + w * BLOCK_M, 0], q_bars.index(w), q_smem.index(w))
    for j in range(n_tiles):
        slot = j % NUM_BUF
        free = ((j // NUM_BUF) & 1) ^ 1  # a fresh barrier's "previous phase" is complete
        mbarrier.wait(k_empty.index(slot), free)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, hk, j * BLOCK_N, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), free)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        if PV_INT8:
            tma.async_copy_global_to_shared(v_desc, [b, hk, 0, j * BLOCK_N], v_ready.index(slot), v_smem.index(slot))
        else:
            tma.async_copy_global_to_shared(v_desc, [b, hk, j * BLOCK_N, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _ws_consumer(WG: gl.constexpr, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty, turn,
                 QS, KS, KM, VS, O, LSE, qk_scale, sm_scale, b, h, hk, start_m, n_tiles, Sq, Skv, Hq,
                 sqs_b, sqs_h, sqs_s, sks_b, sks_h, sks_s, skm_b, skm_h, skm_d, svs_b, svs_h, svs_d,
                 sob, soh, som, sod,
                 PV_INT8: gl.constexpr, HAS_KM: gl.constexpr, IS_CAUSAL: gl.constexpr,
                 PV_K: gl.constexpr, PV_KWIDTH: gl.constexpr,
                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 NUM_BUF: gl.constexpr):
    """One warpgroup: BLOCK_M query rows against the CTA's key tiles. GEMM issue rounds
    alternate with the other warpgroup through the `turn` barriers, so one warpgroup's
    softmax runs while the other's matmuls occupy the tensor cores."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, PV_K])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=PV_KWIDTH)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    P_DTYPE: gl.constexpr = v_smem.dtype  # 16-bit P: V's type; INT8 P: int8 (= V's too)

    m0 = start_m + WG * BLOCK_M
    if IS_CAUSAL:
        n_full = gl.minimum((m0 + 1) // BLOCK_N, Skv // BLOCK_N)
    else:
        n_full = Skv // BLOCK_N
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=row_s)
    mmask = offs_m < Sq
    q_scale = gl.load(QS + b * sqs_b + h * sqs_h + offs_m * sqs_s, mask=mmask, other=0.0)
    qs2 = q_scale * qk_scale
    ks_base = KS + b * sks_b + hk * sks_h
    mbarrier.wait(q_bars.index(WG), 0)
    q = q_smem.index(WG).reshape([BLOCK_M, HEAD_DIM])
    qkm = q_scale  # (a placeholder when there is no k_mean)
    if HAS_KM:
        kml: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        qc = q.load(kml).to(gl.float32)
        km = gl.load(KM + b * skm_b + hk * skm_h
                     + gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kml)) * skm_d)
        qkm = gl.convert_layout(gl.sum(qc * km[None, :], 1), row_s) * q_scale * sm_scale

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)

    # round 0: Q·K_0ᵀ
    mbarrier.wait(turn.index(WG), 0)
    mbarrier.wait(k_ready.index(0), 0)
    S = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                      use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(1 - WG))
    S = warpgroup_mma_wait(0, deps=(S,))
    mbarrier.arrive(k_empty.index(0))
    m_i, l_i, alpha, p, c = _softmax_tile(S, m_i, l_i, qs2, ks_base, sks_s, 0, n_full, offs_m, Skv,
                                          IS_CAUSAL, PV_INT8, P_DTYPE, p_layout, s_layout, BLOCK_N)
    # rounds 1 .. n_tiles-1: Q·K_jᵀ and P_{j-1}·V_{j-1}
    for j in range(1, n_tiles):
        slot = j % NUM_BUF
        prev = (j - 1) % NUM_BUF
        mbarrier.wait(turn.index(WG), j & 1)
        mbarrier.wait(k_ready.index(slot), (j // NUM_BUF) & 1)
        S = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero_s,
                          use_acc=False, is_async=True)
        pv = _pv(p, v_smem, v_ready, j - 1, acc, PV_INT8, HEAD_DIM, BLOCK_N, NUM_BUF, o_layout)
        mbarrier.arrive(turn.index(1 - WG))
        S = warpgroup_mma_wait(1, deps=(S,))
        mbarrier.arrive(k_empty.index(slot))
        c_prev = c
        m_i, l_i, alpha, p, c = _softmax_tile(S, m_i, l_i, qs2, ks_base, sks_s, j, n_full, offs_m, Skv,
                                              IS_CAUSAL, PV_INT8, P_DTYPE, p_layout, s_layout, BLOCK_N)
        pv = warpgroup_mma_wait(0, deps=(pv,))
        mbarrier.arrive(v_empty.index(prev))
        acc = _rescale(acc, pv, alpha, c_prev, PV_INT8, o_layout)
    # last round: P·V of the last tile
    mbarrier.wait(turn.index(WG), n_tiles & 1)
    pv = _pv(p, v_smem, v_ready, n_tiles - 1, acc, PV_INT8, HEAD_DIM, BLOCK_N, NUM_BUF, o_layout)
    mbarrier.arrive(turn.index(1 - WG))
    pv = warpgroup_mma_wait(0, deps=(pv,))
    mbarrier.arrive(v_empty.index((n_tiles - 1) % NUM_BUF))
    if PV_INT8:
        acc = acc + _i2f(pv) * gl.convert_layout(c, row_o)[:, None]
    else:
        acc = pv

    _store_out(acc, l_i, m_i, qkm, VS, O, LSE, b, h, hk, m0, Sq, Hq, svs_b, svs_h, svs_d,
               sob, soh, som, sod, PV_INT8, HAS_KM, HEAD_DIM, BLOCK_M, s_layout, o_layout)


@gluon.jit
def attention_fwd_ws_kernel(
        q_desc, k_desc, v_desc, QS, KS, KM, VS, O, LSE,
        qk_scale, sm_scale, Hq, kv_group, Sq, Skv,
        sqs_b, sqs_h, sqs_s, sks_b, sks_h, sks_s, skm_b, skm_h, skm_d, svs_b, svs_h, svs_d,
        sob, soh, som, sod,
        PV_INT8: gl.constexpr, HAS_KM: gl.constexpr, IS_CAUSAL: gl.constexpr,
        PV_K: gl.constexpr, PV_KWIDTH: gl.constexpr,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        NUM_BUF: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """2·BLOCK_M query rows per program: two consumer warpgroups (the default partition
    and worker 0) of BLOCK_M rows each, in ping-pong, and a producer warp (worker 1)."""
    n_m = gl.num_programs(0)
    pid_m = gl.program_id(0)
    if IS_CAUSAL:
        pid_m = n_m - 1 - pid_m
    pid_bh = gl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // kv_group
    start_m = pid_m * (2 * BLOCK_M)
    if IS_CAUSAL:
        hi = gl.minimum(Skv, start_m + 2 * BLOCK_M)
    else:
        hi = Skv
    n_tiles = gl.cdiv(hi, BLOCK_N)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, 1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_BUF, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    if PV_INT8:
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, 1, 1, HEAD_DIM, BLOCK_N], v_desc.layout)
    else:
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_BUF, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release a slot
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first

    gl.warp_specialize([
        (_ws_consumer, (0, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty, turn,
                        QS, KS, KM, VS, O, LSE, qk_scale, sm_scale, b, h, hk, start_m, n_tiles, Sq, Skv, Hq,
                        sqs_b, sqs_h, sqs_s, sks_b, sks_h, sks_s, skm_b, skm_h, skm_d, svs_b, svs_h, svs_d,
                        sob, soh, som, sod, PV_INT8, HAS_KM, IS_CAUSAL, PV_K, PV_KWIDTH,
                        HEAD_DIM, BLOCK_M, BLOCK_N, NUM_BUF)),
        (_ws_consumer, (1, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty, turn,
                        QS, KS, KM, VS, O, LSE, qk_scale, sm_scale, b, h, hk, start_m, n_tiles, Sq, Skv, Hq,
                        sqs_b, sqs_h, sqs_s, sks_b, sks_h, sks_s, skm_b, skm_h, skm_d, svs_b, svs_h, svs_d,
                        sob, soh, som, sod, PV_INT8, HAS_KM, IS_CAUSAL, PV_K, PV_KWIDTH,
                        HEAD_DIM, BLOCK_M, BLOCK_N, NUM_BUF)),
        (_ws_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
                        k_empty, v_empty, b, h, hk, start_m, n_tiles, PV_INT8, BLOCK_M, BLOCK_N, NUM_BUF)),
    ], [4, 1], [CONSUMER_REGS, 24])
    for i in gl.static_range(2):
        mbarrier.invalidate(q_bars.index(i))
        mbarrier.invalidate(turn.index(i))
    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(k_ready.index(i))
        mbarrier.invalidate(v_ready.index(i))
        mbarrier.invalidate(k_empty.index(i))
        mbarrier.invalidate(v_empty.index(i))


# ------------------------------------------------------------------------------- host
_GL_DTYPE = {torch.int8: gl.int8, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor needs a 16-byte aligned base, 16-byte multiples as strides
    (but the last, which must be 1)."""
    isz = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * isz) % 16 == 0 for s in t.stride()[:-1]))


def _v_view(p: dict) -> torch.Tensor:
    """The V tensor the kernel's descriptor covers: the transposed (B, H, D, S) view of
    the INT8 codes (stored K-major), or V itself."""
    return p["v"].transpose(2, 3) if p["PV_MODE"] == 2 else p["v"]


def ineligible(p: dict) -> Optional[str]:
    """Why the call planned as `p` (forward.plan's dict) cannot run here, or None."""
    if p["device"].type != "cuda" or torch.cuda.get_device_capability(p["device"])[0] != 9:
        return "not a Hopper (sm_90) device"
    if p["QK_MODE"] != 0 or p["Q_ZP"] or p["K_ZP"] or not (p["Q_QUANT"] and p["K_QUANT"]):
        return "Q·Kᵀ is not symmetric INT8 x INT8"
    if p["PV_MODE"] == 0:
        if p["V_KIND"] != KIND_FLOAT or p["dtype"] not in (torch.float16, torch.bfloat16):
            return "P·V is neither 16-bit x unquantized 16-bit V nor INT8 x per-channel INT8 V"
    elif p["PV_MODE"] != 2 or not p["V_TRANS"]:
        return "P·V is neither 16-bit x unquantized 16-bit V nor INT8 x per-channel INT8 V (stored K-major)"
    if p["MASK_KIND"] != 0:
        return "an attention mask"
    if p["D"] not in (64, 128):
        return f"head dim {p['D']} (64 and 128 only)"
    if p["Sq"] <= 64 or p["PACK_GQA"]:
        return "short queries (split-KV / packed GQA)"
    if p["dtype"] not in (torch.float16, torch.bfloat16):
        return f"{p['dtype']} inputs"
    for name, t in (("Q codes", p["q"]), ("K codes", p["k"]), ("V", _v_view(p))):
        if not _tma_ok(t):
            return f"{name} not TMA-addressable (16-byte aligned base and strides, unit last stride)"
    return None


def _desc(t: torch.Tensor, block):
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPE[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def launch(p: dict, out: torch.Tensor, lse: torch.Tensor, block_m: int = 64, block_n: int = 128,
           num_buf: int = 2, num_warps: int = 4, ping_pong: bool = False, consumer_regs: int = 240) -> None:
    """Run the kernel for the call planned as `p` (see :func:`ineligible`) into out / lse.
    ping_pong: the warp-specialized kernel (2 x block_m rows per program)."""
    D = p["D"]
    pv_int8 = p["PV_MODE"] == 2
    v = _v_view(p)
    q_desc = _desc(p["q"], [1, 1, block_m, D])
    k_desc = _desc(p["k"], [1, 1, block_n, D])
    v_desc = _desc(v, [1, 1, D, block_n] if pv_int8 else [1, 1, block_n, D])
    qs, ks, km, vs = p["qs"], p["ks"], p["km"], p["vs"]
    dummy = lse
    rows = 2 * block_m if ping_pong else block_m
    grid = (cdiv(p["Sq"], rows), p["B"] * p["Hq"])
    args = (q_desc, k_desc, v_desc, qs, ks, km if km is not None else dummy, vs if vs is not None else dummy,
            out, lse, p["scale"] * LOG2E, p["scale"], p["Hq"], p["Hq"] // p["Hkv"], p["Sq"], p["Skv"],
            *qs.stride()[:3], *ks.stride()[:3],
            *((km.stride(0), km.stride(1), km.stride(3)) if km is not None else (0, 0, 0)),
            *((vs.stride(0), vs.stride(1), vs.stride(3)) if vs is not None else (0, 0, 0)),
            *out.stride())
    meta = dict(PV_INT8=pv_int8, HAS_KM=km is not None, IS_CAUSAL=p["IS_CAUSAL"],
                PV_K=32 if pv_int8 else 16, PV_KWIDTH=4 if pv_int8 else 2, HEAD_DIM=D,
                BLOCK_M=block_m, BLOCK_N=block_n, NUM_BUF=num_buf)
    if ping_pong:
        attention_fwd_ws_kernel[grid](*args, CONSUMER_REGS=consumer_regs, num_warps=4, **meta)
    else:
        attention_fwd_wgmma_kernel[grid](*args, P_DTYPE=gl.int8 if pv_int8 else _GL_DTYPE[p["dtype"]],
                                         num_warps=num_warps, **meta)
