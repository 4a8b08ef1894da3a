// Flash attention forward with quantized operands (docs/op_contract.md,
// attention_forward).
//
// Design
// ------
// * Grid (ceil(Sq / 32), Hq, B); 128 threads = 4 simdgroups. Simdgroup g owns query
//   rows [8g, 8g + 8) of the block, so the softmax of a row never leaves its simdgroup
//   (simd_max / simd_sum, simdgroup_barrier) and threadgroup barriers are needed only
//   around shared K / V staging.
// * Registers: the simdgroup's Q rows (head_dim / 8 simdgroup_float8x8, loaded once) and
//   its output accumulator O (head_dim / 8 more). At head dim 256 that is 64 + 64 floats
//   per thread; smaller head dims leave the tail of the arrays unused (the loops are
//   bounded by the head-dim function constant, so the compiler unrolls and drops them).
// * Threadgroup memory (FQ_FWD_TG_FLOATS): K and V are staged FQ_CHUNK (64) columns at
//   a time, so its size does not depend on the head dim: the chunk (max(32, bk) x 64),
//   the 32 x bk score tile, row scales, running max / sum and a diagonal per simdgroup.
//   Block of keys bk: 64 for head dim <= 64, 32 above (host_logic.cpp), <= 26 KiB.
// * The running-max rescale of O and the final 1 / l multiply O by a diagonal matrix
//   (simdgroup_multiply) instead of touching its elements: Apple does not document how a
//   simdgroup_matrix is spread over the lanes, so no code here depends on it. A diagonal
//   product spreads an inf / NaN of one row to the others (0 * inf = NaN), so once O may
//   hold one (a NaN row of P, or an inf / NaN staged from V: one isfinite per staged V
//   value, a flag in threadgroup memory) the rescale goes row by row through threadgroup
//   memory instead; the final 1 / l is applied per element as O is written.
// * Dequantization happens at load (fq_stage); see fq_attention.h.
#include "fq_attention.h"

kernel void fq_attention_forward(
    device const uchar* q_data [[buffer(0)]], device const float* q_scale [[buffer(1)]],
    device const int* q_zp [[buffer(2)]], device const uchar* k_data [[buffer(3)]],
    device const float* k_scale [[buffer(4)]], device const int* k_zp [[buffer(5)]],
    device const float* k_mean [[buffer(6)]], device const uchar* v_data [[buffer(7)]],
    device const float* v_scale [[buffer(8)]], device const int* v_zp [[buffer(9)]],
    device const uchar* mask [[buffer(10)]], device uchar* out [[buffer(11)]],
    device float* lse [[buffer(12)]], constant FqAttnParams& p [[buffer(13)]],
    threadgroup float* tg FQ_TG_MEM(0), uint3 tgp FQ_TG_POS, uint tid FQ_TID,
    uint sg FQ_SIMDGROUP, uint lane FQ_LANE) {
  const int D = fq_head_dim, BK = fq_block_k;
  const int b = int(tgp.z), h = int(tgp.y), q0 = int(tgp.x) * FQ_BLOCK_Q;
  const int hk = h / (p.Hq / p.Hkv);
  const int r0 = int(sg) * 8;  // this simdgroup's rows within the block
  const FqOperand Q = fq_operand(q_data, q_scale, q_zp, p.q_str, p.qs_str, p.qz_str, b, h, fq_q_mode, p.has_qz);
  const FqOperand K = fq_operand(k_data, k_scale, k_zp, p.k_str, p.ks_str, p.kz_str, b, hk, fq_k_mode, p.has_kz);
  const FqOperand V = fq_operand(v_data, v_scale, v_zp, p.v_str, p.vs_str, p.vz_str, b, hk, fq_v_mode, p.has_vz);

  threadgroup float* chunk = tg;
  threadgroup float* S = chunk + FQ_FWD_CHUNK_ROWS(BK) * FQ_CHUNK;
  threadgroup float* qsc = S + FQ_BLOCK_Q * BK;
  threadgroup float* ksc = qsc + FQ_BLOCK_Q;
  threadgroup float* row_m = ksc + FQ_MAX_BLOCK_K;
  threadgroup float* row_l = row_m + FQ_BLOCK_Q;
  threadgroup float* diag = row_l + FQ_BLOCK_Q + sg * 64;
  threadgroup float* v_nonfinite = row_l + FQ_BLOCK_Q + FQ_ATTN_SIMDGROUPS * 64;

  for (int i = int(lane); i < 64; i += 32) diag[i] = 0.0f;
  if (tid == 0) *v_nonfinite = 0.0f;  // (ordered before any V staging by the Q barriers)
  // O may hold an inf / NaN (a NaN row of P, or one staged from V): the diagonal-matrix
  // rescale would then spread it to the simdgroup's other rows (0 * inf = NaN), so the
  // rows are scaled one by one through threadgroup memory instead (rare, slower path).
  bool o_nonfinite = false;
  if (tid < uint(FQ_BLOCK_Q)) {
    const int i = q0 + int(tid);
    // The softmax scale rides on the query row scale: s_ij = dot * qsc_i * ksc_j.
    qsc[tid] = i < p.Sq ? fq_scale_at(Q, i, 0) * p.scale : 0.0f;
    row_m[tid] = -INFINITY;
    row_l[tid] = 0.0f;
  }

  simdgroup_float8x8 qm[FQ_MAX_HEAD_DIM / 8];
  simdgroup_float8x8 o[FQ_MAX_HEAD_DIM / 8];
  for (int t = 0; t < D / 8; ++t) o[t] = fq_zero8x8();
  for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
    const int w = min(FQ_CHUNK, D - c0);
    fq_stage(chunk, Q, q0, p.Sq - q0, FQ_BLOCK_Q, c0, w, false, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int t = 0; t < w / 8; ++t) simdgroup_load(qm[c0 / 8 + t], chunk + r0 * FQ_CHUNK + t * 8, FQ_CHUNK);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Top-left causal: no key past the block's last query row is visible (skipped, unless
  // the host saw an inf / NaN: FqAttnParams::every_key).
  const int kv_end = fq_causal != 0 && p.every_key == 0 ? min(p.Skv, q0 + FQ_BLOCK_Q) : p.Skv;
  for (int j0 = 0; j0 < kv_end; j0 += BK) {
    // S = Q K^T for this simdgroup's 8 rows x BK keys.
    simdgroup_float8x8 s[FQ_MAX_BLOCK_K / 8];
    for (int kc = 0; kc < BK / 8; ++kc) s[kc] = fq_zero8x8();
    if (tid < uint(BK)) ksc[tid] = j0 + int(tid) < p.Skv ? fq_scale_at(K, j0 + int(tid), 0) : 0.0f;
    for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
      const int w = min(FQ_CHUNK, D - c0);
      fq_stage(chunk, K, j0, p.Skv - j0, BK, c0, w, false, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int kc = 0; kc < BK / 8; ++kc)
        for (int t = 0; t < w / 8; ++t) {
          simdgroup_float8x8 kt;
          simdgroup_load(kt, chunk + kc * 8 * FQ_CHUNK + t * 8, FQ_CHUNK, ulong2(0, 0), true);
          simdgroup_multiply_accumulate(s[kc], qm[c0 / 8 + t], kt, s[kc]);
        }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int kc = 0; kc < BK / 8; ++kc) simdgroup_store(s[kc], S + r0 * BK + kc * 8, BK);
    simdgroup_barrier(mem_flags::mem_threadgroup);

    // Online softmax, one row at a time; lane L holds columns L and L + 32.
    for (int r = 0; r < 8; ++r) {
      const int i = q0 + r0 + r;
      threadgroup float* srow = S + (r0 + r) * BK;
      float sv[2];
      float mx = -INFINITY;
      for (int u = 0; u < 2; ++u) {
        const int jj = int(lane) + 32 * u;
        float x = -INFINITY;
        if (jj < BK) x = fq_visible_score(p, mask, b, h, i, j0 + jj, srow[jj] * qsc[r0 + r] * ksc[jj]);
        sv[u] = x;
        mx = max(mx, x);
      }
      const float m_old = row_m[r0 + r];
      const float m_new = max(m_old, simd_max(mx));
      float sum = 0.0f;
      float pexp[2];
      float pmax = 0.0f;
      for (int u = 0; u < 2; ++u) {
        // (a masked score is -inf; a NaN / +inf one gives NaN P, whatever max() made of it)
        pexp[u] = sv[u] == -INFINITY ? 0.0f : exp(sv[u] - m_new);
        sum += pexp[u];
        pmax = max(pmax, pexp[u]);
      }
      const float tile_max = simd_max(pmax);
      for (int u = 0; u < 2; ++u) {
        const int jj = int(lane) + 32 * u;
        if (jj < BK) srow[jj] = fq_round_p(pexp[u], tile_max);
      }
      sum = simd_sum(sum);
      o_nonfinite = o_nonfinite || isnan(sum);  // (P <= 1: the sum is finite or NaN)
      if (lane == 0) {
        const float alpha = m_old == -INFINITY ? 0.0f : exp(m_old - m_new);
        row_m[r0 + r] = m_new;
        row_l[r0 + r] = row_l[r0 + r] * alpha + sum;
        diag[r * 9] = alpha;
      }
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    simdgroup_float8x8 pm[FQ_MAX_BLOCK_K / 8];
    for (int kc = 0; kc < BK / 8; ++kc) simdgroup_load(pm[kc], S + r0 * BK + kc * 8, BK);
    if (!o_nonfinite) {
      simdgroup_float8x8 alpha;
      simdgroup_load(alpha, diag, 8);
      for (int t = 0; t < D / 8; ++t) simdgroup_multiply(o[t], alpha, o[t]);
    } else {  // this simdgroup's rows of S are free once P is loaded
      threadgroup float* scratch = S + r0 * BK;
      simdgroup_barrier(mem_flags::mem_threadgroup);  // every lane has loaded its P
      for (int t = 0; t < D / 8; ++t) {
        simdgroup_store(o[t], scratch, 8);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (int e = int(lane); e < 64; e += 32) scratch[e] *= diag[(e / 8) * 9];
        simdgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_load(o[t], scratch, 8);
        simdgroup_barrier(mem_flags::mem_threadgroup);
      }
    }

    // O += P V, V staged dequantized.
    for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
      const int w = min(FQ_CHUNK, D - c0);
      fq_stage(chunk, V, j0, p.Skv - j0, BK, c0, w, true, tid, v_nonfinite);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      o_nonfinite = o_nonfinite || *v_nonfinite != 0.0f;
      for (int t = 0; t < w / 8; ++t)
        for (int kc = 0; kc < BK / 8; ++kc) {
          simdgroup_float8x8 vm;
          simdgroup_load(vm, chunk + kc * 8 * FQ_CHUNK + t * 8, FQ_CHUNK);
          simdgroup_multiply_accumulate(o[c0 / 8 + t], pm[kc], vm, o[c0 / 8 + t]);
        }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }

  // lse and 1 / l. With a smoothed K the scores lack scale * q_i . k_mean (softmax is
  // shift invariant, so only lse needs it back).
  for (int r = 0; r < 8; ++r) {
    const int i = q0 + r0 + r;
    const float m = row_m[r0 + r], l = row_l[r0 + r];
    float qk = 0.0f;
    if (p.has_kmean != 0 && i < p.Sq) {
      const long mb = long(b) * p.km_str[0] + long(hk) * p.km_str[1];
      float part = 0.0f;
      for (int d = int(lane); d < D; d += 32) part += fq_raw(Q, i, d) * k_mean[mb + long(d) * p.km_str[3]];
      qk = simd_sum(part) * qsc[r0 + r];
    }
    if (lane == 0) {
      // l == 0: no visible key (O = 0 * V: zeros, or NaN from an inf / NaN V); a NaN l
      // (NaN P) gives a NaN row and lse
      diag[r * 9] = l == 0.0f ? 0.0f : 1.0f / l;
      if (i < p.Sq) lse[(long(b) * p.Hq + h) * p.Sq + i] = l == 0.0f ? -INFINITY : m + log(l) + qk;
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);

  // Write O through this simdgroup's rows of the chunk buffer (dtype conversion, tails).
  const long ob = long(b) * p.o_str[0] + long(h) * p.o_str[1];
  for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
    const int w = min(FQ_CHUNK, D - c0);
    // 1 / l per element (not through a diagonal matrix: exact per row for inf / NaN too)
    for (int t = 0; t < w / 8; ++t) simdgroup_store(o[c0 / 8 + t], chunk + r0 * FQ_CHUNK + t * 8, FQ_CHUNK);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (int e = int(lane); e < 8 * w; e += 32) {
      const int r = e / w, c = e - r * w, i = q0 + r0 + r;
      if (i < p.Sq)
        fq_store(out, ob + long(i) * p.o_str[2] + long(c0 + c) * p.o_str[3], fq_io_dtype,
                 chunk[(r0 + r) * FQ_CHUNK + c] * diag[r * 9]);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
  }
}
