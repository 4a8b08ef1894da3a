// Flash attention backward with quantized operands (docs/op_contract.md,
// attention_backward). Straight-through: the gradient of the attention of the
// dequantized operands; P is recomputed unrounded from the saved lse, so pv_precision
// does not enter.
//
// Design
// ------
// Three launches, in order on one compute encoder:
// * fq_attention_backward_prep: per query row, delta = sum_d dO * O and
//   lse' = lse - scale * q . k_mean (the saved lse is that of the unsmoothed keys; the
//   recomputed scores use the smoothed ones). Simdgroup per 8 rows, no threadgroup memory.
// * fq_attention_backward_dq: grid (ceil(Sq / 32), Hq, B). Simdgroup g owns query rows
//   [8g, 8g + 8); its dQ rows stay in registers (head_dim / 8 simdgroup_float8x8). Per
//   block of 32 keys: S = Q K^T and dP = dO V^T, FQ_CHUNK columns at a time from
//   threadgroup memory; then P, dS = P (dP - delta) row by row inside the simdgroup;
//   then dQ += (scale * dS * k_scale) K_raw. Deterministic: no atomics, each dQ row has
//   one owner.
// * fq_attention_backward_dkdv: grid (ceil(Skv / 32), Hkv, B). Simdgroup g owns keys
//   [8g, 8g + 8); dK and dV rows stay in registers (2 * head_dim / 8 matrices: 128
//   floats per thread at head dim 256, where the compiler may spill). It walks every
//   query head of its GQA group and every query block (from its own position on when
//   causal), so dK / dV are summed over the group without atomics.
// Threadgroup memory (FQ_BWD_TG_FLOATS, 25 KiB): two 32 x FQ_CHUNK staging tiles, two
// 32 x 32 score tiles and four row vectors. As in the forward kernel, element-wise work
// goes through threadgroup memory and matrices are only loaded, stored and multiplied,
// so nothing depends on Apple's undocumented lane layout of simdgroup matrices.
#include "fq_attention.h"

#define FQ_BWD_TILES                                                   \
  threadgroup float* A = tg;                                           \
  threadgroup float* Bt = A + FQ_BWD_BLOCK * FQ_CHUNK;                 \
  threadgroup float* T1 = Bt + FQ_BWD_BLOCK * FQ_CHUNK;                \
  threadgroup float* T2 = T1 + FQ_BWD_BLOCK * FQ_BWD_BLOCK;            \
  threadgroup float* qsc = T2 + FQ_BWD_BLOCK * FQ_BWD_BLOCK;           \
  threadgroup float* ksc = qsc + FQ_BWD_BLOCK;                         \
  threadgroup float* rl = ksc + FQ_BWD_BLOCK;                          \
  threadgroup float* rd = rl + FQ_BWD_BLOCK;

inline long fq_row_index(constant FqAttnParams& p, int b, int h, int i) { return (long(b) * p.Hq + h) * p.Sq + i; }

// acc[c] += rows8 (8 x 8 block at `a`, FQ_CHUNK stride) times the transposed 8-row
// blocks of `bt`: the scores of 8 rows of one tile against 32 rows of another.
inline void fq_scores_chunk(thread simdgroup_float8x8* acc, threadgroup const float* a, threadgroup const float* bt,
                            int w) {
  for (int t = 0; t < w / 8; ++t) {
    simdgroup_float8x8 ra;
    simdgroup_load(ra, a + t * 8, FQ_CHUNK);
    for (int c = 0; c < FQ_BWD_BLOCK / 8; ++c) {
      simdgroup_float8x8 rb;
      simdgroup_load(rb, bt + c * 8 * FQ_CHUNK + t * 8, FQ_CHUNK, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc[c], ra, rb, acc[c]);
    }
  }
}

// out[c0/8 + t] += coef (8 x 32, as 4 matrices) times the 32 x w chunk `m`.
inline void fq_accumulate_chunk(thread simdgroup_float8x8* out, thread const simdgroup_float8x8* coef,
                                threadgroup const float* m, int c0, int w) {
  for (int t = 0; t < w / 8; ++t)
    for (int c = 0; c < FQ_BWD_BLOCK / 8; ++c) {
      simdgroup_float8x8 mm;
      simdgroup_load(mm, m + c * 8 * FQ_CHUNK + t * 8, FQ_CHUNK);
      simdgroup_multiply_accumulate(out[c0 / 8 + t], coef[c], mm, out[c0 / 8 + t]);
    }
}

// Writes 8 rows of a register tile (rows row0.., valid while < nrows) to a contiguous
// (rows, D) output in the io dtype, through this simdgroup's rows of `stage`.
inline void fq_write_rows(thread simdgroup_float8x8* acc, threadgroup float* stage, device uchar* out, long base,
                          int row0, int nrows, uint lane) {
  const int D = fq_head_dim;
  for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
    const int w = min(FQ_CHUNK, D - c0);
    for (int t = 0; t < w / 8; ++t) simdgroup_store(acc[c0 / 8 + t], stage + t * 8, FQ_CHUNK);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (int e = int(lane); e < 8 * w; e += 32) {
      const int r = e / w, c = e - r * w;
      if (row0 + r < nrows) fq_store(out, base + long(row0 + r) * D + c0 + c, fq_io_dtype, stage[r * FQ_CHUNK + c]);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
  }
}

kernel void fq_attention_backward_prep(
    device const uchar* q_data [[buffer(0)]], device const float* q_scale [[buffer(1)]],
    device const int* q_zp [[buffer(2)]], device const float* k_mean [[buffer(6)]],
    device const uchar* out [[buffer(11)]], device const float* lse [[buffer(12)]],
    constant FqAttnParams& p [[buffer(13)]], device const uchar* grad_out [[buffer(14)]],
    device float* delta [[buffer(15)]], device float* lse_adj [[buffer(16)]], uint3 tgp FQ_TG_POS,
    uint sg FQ_SIMDGROUP, uint lane FQ_LANE) {
  const int D = fq_head_dim;
  const int b = int(tgp.z), h = int(tgp.y), hk = h / (p.Hq / p.Hkv);
  const FqOperand Q = fq_operand(q_data, q_scale, q_zp, p.q_str, p.qs_str, p.qz_str, b, h, fq_q_mode, p.has_qz);
  const FqOperand dO = fq_operand(grad_out, q_scale, q_zp, p.do_str, p.do_str, p.do_str, b, h, fq_io_dtype, 0);
  const FqOperand O = fq_operand(out, q_scale, q_zp, p.o_str, p.o_str, p.o_str, b, h, fq_io_dtype, 0);
  for (int r = 0; r < 8; ++r) {
    const int i = int(tgp.x) * FQ_BWD_BLOCK + int(sg) * 8 + r;
    if (i >= p.Sq) break;  // uniform across the simdgroup
    float part = 0.0f;
    for (int d = int(lane); d < D; d += 32) part += fq_raw(dO, i, d) * fq_raw(O, i, d);
    const float dsum = simd_sum(part);
    float qk = 0.0f;
    if (p.has_kmean != 0) {
      const long mb = long(b) * p.km_str[0] + long(hk) * p.km_str[1];
      float mpart = 0.0f;
      for (int d = int(lane); d < D; d += 32) mpart += fq_raw(Q, i, d) * k_mean[mb + long(d) * p.km_str[3]];
      qk = simd_sum(mpart) * fq_scale_at(Q, i, 0) * p.scale;
    }
    if (lane == 0) {
      const long ri = fq_row_index(p, b, h, i);
      delta[ri] = dsum;
      lse_adj[ri] = lse[ri] - qk;  // -inf stays -inf: the row saw no key
    }
  }
}

kernel void fq_attention_backward_dq(
    device const uchar* q_data [[buffer(0)]], device const float* q_scale [[buffer(1)]],
    device const int* q_zp [[buffer(2)]], device const uchar* k_data [[buffer(3)]],
    device const float* k_scale [[buffer(4)]], device const int* k_zp [[buffer(5)]],
    device const uchar* v_data [[buffer(7)]], device const float* v_scale [[buffer(8)]],
    device const int* v_zp [[buffer(9)]], device const uchar* mask [[buffer(10)]],
    constant FqAttnParams& p [[buffer(13)]], device const uchar* grad_out [[buffer(14)]],
    device const float* delta [[buffer(15)]], device const float* lse_adj [[buffer(16)]],
    device uchar* dq_out [[buffer(17)]], threadgroup float* tg FQ_TG_MEM(0), uint3 tgp FQ_TG_POS,
    uint tid FQ_TID, uint sg FQ_SIMDGROUP, uint lane FQ_LANE) {
  const int D = fq_head_dim;
  const int b = int(tgp.z), h = int(tgp.y), hk = h / (p.Hq / p.Hkv), i0 = int(tgp.x) * FQ_BWD_BLOCK;
  const int r0 = int(sg) * 8;
  const FqOperand Q = fq_operand(q_data, q_scale, q_zp, p.q_str, p.qs_str, p.qz_str, b, h, fq_q_mode, p.has_qz);
  const FqOperand K = fq_operand(k_data, k_scale, k_zp, p.k_str, p.ks_str, p.kz_str, b, hk, fq_k_mode, p.has_kz);
  const FqOperand V = fq_operand(v_data, v_scale, v_zp, p.v_str, p.vs_str, p.vz_str, b, hk, fq_v_mode, p.has_vz);
  const FqOperand dO = fq_operand(grad_out, q_scale, q_zp, p.do_str, p.do_str, p.do_str, b, h, fq_io_dtype, 0);
  FQ_BWD_TILES

  if (tid < uint(FQ_BWD_BLOCK)) {
    const int i = i0 + int(tid);
    qsc[tid] = i < p.Sq ? fq_scale_at(Q, i, 0) : 0.0f;
    rl[tid] = i < p.Sq ? lse_adj[fq_row_index(p, b, h, i)] : -INFINITY;
    rd[tid] = i < p.Sq ? delta[fq_row_index(p, b, h, i)] : 0.0f;
  }
  simdgroup_float8x8 dq[FQ_MAX_HEAD_DIM / 8];
  for (int t = 0; t < D / 8; ++t) dq[t] = fq_zero8x8();

  const int kv_end = fq_causal != 0 && p.every_key == 0 ? min(p.Skv, i0 + FQ_BWD_BLOCK) : p.Skv;
  for (int j0 = 0; j0 < kv_end; j0 += FQ_BWD_BLOCK) {
    if (tid < uint(FQ_BWD_BLOCK)) ksc[tid] = j0 + int(tid) < p.Skv ? fq_scale_at(K, j0 + int(tid), 0) : 0.0f;
    simdgroup_float8x8 s[FQ_BWD_BLOCK / 8], dp[FQ_BWD_BLOCK / 8];
    for (int c = 0; c < FQ_BWD_BLOCK / 8; ++c) { s[c] = fq_zero8x8(); dp[c] = fq_zero8x8(); }
    for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
      const int w = min(FQ_CHUNK, D - c0);
      fq_stage(A, Q, i0, p.Sq - i0, FQ_BWD_BLOCK, c0, w, false, tid);
      fq_stage(Bt, K, j0, p.Skv - j0, FQ_BWD_BLOCK, c0, w, false, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      fq_scores_chunk(s, A + r0 * FQ_CHUNK, Bt, w);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      fq_stage(A, dO, i0, p.Sq - i0, FQ_BWD_BLOCK, c0, w, false, tid);
      fq_stage(Bt, V, j0, p.Skv - j0, FQ_BWD_BLOCK, c0, w, true, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      fq_scores_chunk(dp, A + r0 * FQ_CHUNK, Bt, w);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int c = 0; c < FQ_BWD_BLOCK / 8; ++c) {
      simdgroup_store(s[c], T1 + r0 * FQ_BWD_BLOCK + c * 8, FQ_BWD_BLOCK);
      simdgroup_store(dp[c], T2 + r0 * FQ_BWD_BLOCK + c * 8, FQ_BWD_BLOCK);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    // Lane = key column. dS is pre-multiplied by scale and the key's row scale, so that
    // the product with the raw (data - zero point) K is scale * dS K_dequantized.
    for (int r = 0; r < 8; ++r) {
      const int rr = r0 + r, e = rr * FQ_BWD_BLOCK + int(lane);
      const float x = fq_visible_score(p, mask, b, h, i0 + rr, j0 + int(lane), T1[e] * qsc[rr] * ksc[lane] * p.scale);
      // P = exp(s - lse): 0 for a masked key (s = -inf) or a row with no visible key
      // (lse = -inf); NaN where the lse is NaN (the row has a NaN / +inf score), as SDPA
      const float pr = rl[rr] == -INFINITY ? 0.0f : exp(x - rl[rr]);
      T1[e] = pr * (T2[e] - rd[rr]) * p.scale * ksc[lane];
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 ds[FQ_BWD_BLOCK / 8];
    for (int c = 0; c < FQ_BWD_BLOCK / 8; ++c) simdgroup_load(ds[c], T1 + r0 * FQ_BWD_BLOCK + c * 8, FQ_BWD_BLOCK);
    for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
      const int w = min(FQ_CHUNK, D - c0);
      fq_stage(Bt, K, j0, p.Skv - j0, FQ_BWD_BLOCK, c0, w, false, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      fq_accumulate_chunk(dq, ds, Bt, c0, w);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
  fq_write_rows(dq, A + r0 * FQ_CHUNK, dq_out, (long(b) * p.Hq + h) * long(p.Sq) * D, i0 + r0, p.Sq, lane);
}

kernel void fq_attention_backward_dkdv(
    device const uchar* q_data [[buffer(0)]], device const float* q_scale [[buffer(1)]],
    device const int* q_zp [[buffer(2)]], device const uchar* k_data [[buffer(3)]],
    device const float* k_scale [[buffer(4)]], device const int* k_zp [[buffer(5)]],
    device const uchar* v_data [[buffer(7)]], device const float* v_scale [[buffer(8)]],
    device const int* v_zp [[buffer(9)]], device const uchar* mask [[buffer(10)]],
    constant FqAttnParams& p [[buffer(13)]], device const uchar* grad_out [[buffer(14)]],
    device const float* delta [[buffer(15)]], device const float* lse_adj [[buffer(16)]],
    device uchar* dk_out [[buffer(18)]], device uchar* dv_out [[buffer(19)]], threadgroup float* tg FQ_TG_MEM(0),
    uint3 tgp FQ_TG_POS, uint tid FQ_TID, uint sg FQ_SIMDGROUP, uint lane FQ_LANE) {
  const int D = fq_head_dim;
  const int b = int(tgp.z), hk = int(tgp.y), j0 = int(tgp.x) * FQ_BWD_BLOCK, group = p.Hq / p.Hkv;
  const int r0 = int(sg) * 8;
  const FqOperand K = fq_operand(k_data, k_scale, k_zp, p.k_str, p.ks_str, p.kz_str, b, hk, fq_k_mode, p.has_kz);
  const FqOperand V = fq_operand(v_data, v_scale, v_zp, p.v_str, p.vs_str, p.vz_str, b, hk, fq_v_mode, p.has_vz);
  FQ_BWD_TILES

  if (tid < uint(FQ_BWD_BLOCK)) ksc[tid] = j0 + int(tid) < p.Skv ? fq_scale_at(K, j0 + int(tid), 0) : 0.0f;
  simdgroup_float8x8 dk[FQ_MAX_HEAD_DIM / 8], dv[FQ_MAX_HEAD_DIM / 8];
  for (int t = 0; t < D / 8; ++t) { dk[t] = fq_zero8x8(); dv[t] = fq_zero8x8(); }

  // Top-left causal: queries before j0 see none of this block's keys (blocks are aligned).
  const int i_begin = fq_causal != 0 && p.every_key == 0 ? j0 : 0;  // (FqAttnParams::every_key)
  for (int hh = 0; hh < group; ++hh) {
    const int h = hk * group + hh;
    const FqOperand Q = fq_operand(q_data, q_scale, q_zp, p.q_str, p.qs_str, p.qz_str, b, h, fq_q_mode, p.has_qz);
    const FqOperand dO = fq_operand(grad_out, q_scale, q_zp, p.do_str, p.do_str, p.do_str, b, h, fq_io_dtype, 0);
    for (int i0 = i_begin; i0 < p.Sq; i0 += FQ_BWD_BLOCK) {
      if (tid < uint(FQ_BWD_BLOCK)) {
        const int i = i0 + int(tid);
        qsc[tid] = i < p.Sq ? fq_scale_at(Q, i, 0) : 0.0f;
        rl[tid] = i < p.Sq ? lse_adj[fq_row_index(p, b, h, i)] : -INFINITY;
        rd[tid] = i < p.Sq ? delta[fq_row_index(p, b, h, i)] : 0.0f;
      }
      // S^T and dP^T for this simdgroup's 8 keys x 32 queries.
      simdgroup_float8x8 st[FQ_BWD_BLOCK / 8], dpt[FQ_BWD_BLOCK / 8];
      for (int c = 0; c < FQ_BWD_BLOCK / 8; ++c) { st[c] = fq_zero8x8(); dpt[c] = fq_zero8x8(); }
      for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
        const int w = min(FQ_CHUNK, D - c0);
        fq_stage(A, Q, i0, p.Sq - i0, FQ_BWD_BLOCK, c0, w, false, tid);
        fq_stage(Bt, K, j0, p.Skv - j0, FQ_BWD_BLOCK, c0, w, false, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        fq_scores_chunk(st, Bt + r0 * FQ_CHUNK, A, w);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        fq_stage(A, dO, i0, p.Sq - i0, FQ_BWD_BLOCK, c0, w, false, tid);
        fq_stage(Bt, V, j0, p.Skv - j0, FQ_BWD_BLOCK, c0, w, true, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        fq_scores_chunk(dpt, Bt + r0 * FQ_CHUNK, A, w);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      for (int c = 0; c < FQ_BWD_BLOCK / 8; ++c) {
        simdgroup_store(st[c], T1 + r0 * FQ_BWD_BLOCK + c * 8, FQ_BWD_BLOCK);
        simdgroup_store(dpt[c], T2 + r0 * FQ_BWD_BLOCK + c * 8, FQ_BWD_BLOCK);
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      // Lane = query column. T1 becomes P^T (for dV), T2 scale * dS^T * q_scale (for dK
      // against the raw Q).
      for (int r = 0; r < 8; ++r) {
        const int rr = r0 + r, e = rr * FQ_BWD_BLOCK + int(lane);
        const float x = fq_visible_score(p, mask, b, h, i0 + int(lane), j0 + rr, T1[e] * ksc[rr] * qsc[lane] * p.scale);
        const float pr = rl[lane] == -INFINITY ? 0.0f : exp(x - rl[lane]);  // (as in the dQ kernel)
        T1[e] = pr;
        T2[e] = pr * (T2[e] - rd[lane]) * p.scale * qsc[lane];
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      simdgroup_float8x8 pt[FQ_BWD_BLOCK / 8], dst[FQ_BWD_BLOCK / 8];
      for (int c = 0; c < FQ_BWD_BLOCK / 8; ++c) {
        simdgroup_load(pt[c], T1 + r0 * FQ_BWD_BLOCK + c * 8, FQ_BWD_BLOCK);
        simdgroup_load(dst[c], T2 + r0 * FQ_BWD_BLOCK + c * 8, FQ_BWD_BLOCK);
      }
      for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
        const int w = min(FQ_CHUNK, D - c0);
        fq_stage(A, dO, i0, p.Sq - i0, FQ_BWD_BLOCK, c0, w, false, tid);
        fq_stage(Bt, Q, i0, p.Sq - i0, FQ_BWD_BLOCK, c0, w, false, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        fq_accumulate_chunk(dv, pt, A, c0, w);
        fq_accumulate_chunk(dk, dst, Bt, c0, w);
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
    }
  }
  const long base = (long(b) * p.Hkv + hk) * long(p.Skv) * D;
  fq_write_rows(dk, A + r0 * FQ_CHUNK, dk_out, base, j0 + r0, p.Skv, lane);
  fq_write_rows(dv, Bt + r0 * FQ_CHUNK, dv_out, base, j0 + r0, p.Skv, lane);
}
