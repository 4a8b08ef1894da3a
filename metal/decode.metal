// Decode attention over a quantized KV cache (issue 18 item 5): the MPS kernels of the
// decode_attention op (csrc/schema.cpp; flash_quant/kv_cache.py for the cache layout,
// csrc/mps/host_logic.cpp plan_decode for how its buffers map onto FqDecodeParams).
//
// Design
// ------
// Short query blocks (1..16 queries: decode, speculative verification) attend to a long
// quantized cache, so the work is reading K / V once, not arithmetic.
// * Split-KV. fq_decode_partial runs on grid (n_splits, Hkv * row_blocks, B): split s owns
//   keys [s * split_len, min((s + 1) * split_len, length)) and writes, for each of its
//   query rows, the softmax-normalised partial output and its lse (float32 temporaries).
//   fq_decode_merge, one threadgroup per query row, combines the splits by their lse
//   (out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M)).
// * The token count is read from the cache's device counter (buffer 9), not passed by the
//   host: the plan (splits over the cache's capacity) depends only on the buffers' shapes,
//   and a split past the length holds no key (lse -inf, weight 0 in the merge).
// * GQA packing. The G = Hq / Hkv query heads of one KV head times the Sq queries form the
//   rows r = g * Sq + i of one K / V read; a threadgroup takes FQ_DEC_ROWS (8) of them, the
//   height of a simdgroup matrix, so a typical decode step (G <= 8, Sq = 1) reads every
//   K / V tile exactly once.
// * Dequantize at load. A tile of FQ_DEC_BLOCK_K keys is staged FQ_CHUNK columns at a time
//   into threadgroup memory as fp32, fully dequantized (codes, group scales and offsets,
//   the K centre; the newest tokens from the cache's 16-bit window): per-channel K groups
//   cannot be factored out of the dot product as per-row scales can.
// * 128 threads = 4 simdgroups. Scores: simdgroup g computes the 8 rows x 8 keys
//   [8g, 8g + 8) of the tile against Q (head_dim / 8 matrices in registers; int8 K's
//   per-channel smoothing divisors are multiplied into Q as it is staged). Softmax:
//   simdgroup g handles rows 2g, 2g + 1, one key per lane. P V: simdgroup g owns the
//   output column tiles t with t % 4 == g. O lives in threadgroup memory (8 x head_dim
//   floats), so the running-max rescale is per element (exact for inf / NaN rows) and
//   nothing depends on Apple's undocumented lane layout of simdgroup matrices.
// Threadgroup memory: FQ_DEC_TG_FLOATS(D) (fq_params.h), 17.1 KiB at D = 256.
#include "fq_attention.h"

// The dtype of the cache's scales and offsets (FQ_F32 / FQ_F16 / FQ_BF16).
FQ_FUNCTION_CONSTANT(int, fq_dec_scale_dtype, FQ_FC_DEC_SCALE_DTYPE)

// One quantized cache operand (K or V) of one (batch, KV head).
struct FqDecOperand {
  device const uchar* codes;
  device const uchar* scale;
  device const uchar* offset;
  device const uchar* window;
  long base, rs, cs;      // codes: element (j, d) at base + j * rs + (d or d / 2) * cs
  long sbase, srs, scs;   // scale of the group (j / grows, d / gcols)
  long obase, ors, ocs;   // offset, same groups
  long wbase, wrs, wcs;   // window: token j - n_coded
  int n_coded;            // tokens [0, n_coded) are codes, the rest the window
  int grows, gcols, mode, wmode;
  bool has_offset;
};

inline FqDecOperand fq_dec_operand(device const uchar* codes, device const uchar* scale, device const uchar* offset,
                                   device const uchar* window, constant FqDecCacheStrides& s, int b, int hk,
                                   int n_coded, int mode, int grows, int gcols, int has_offset, int window_dtype) {
  FqDecOperand o;
  o.codes = codes, o.scale = scale, o.offset = offset, o.window = window;
  o.base = long(b) * s.code[0] + long(hk) * s.code[1], o.rs = s.code[2], o.cs = s.code[3];
  o.sbase = long(b) * s.scale[0] + long(hk) * s.scale[1], o.srs = s.scale[2], o.scs = s.scale[3];
  o.obase = long(b) * s.offset[0] + long(hk) * s.offset[1], o.ors = s.offset[2], o.ocs = s.offset[3];
  o.wbase = long(b) * s.window[0] + long(hk) * s.window[1], o.wrs = s.window[2], o.wcs = s.window[3];
  o.n_coded = n_coded;
  o.grows = grows, o.gcols = gcols, o.mode = mode, o.wmode = window_dtype;
  o.has_offset = has_offset != 0;
  return o;
}

// The dequantized value of token j, channel d: codes * scale + offset for the first
// n_coded tokens, the 16-bit window after them.
inline float fq_dec_value(thread const FqDecOperand& o, int j, int d) {
  float v;
  if (j < o.n_coded) {
    float c;
    if (o.mode == FQ_U4_SPLIT) {
      const int half = fq_head_dim / 2, hi = d >= half ? 1 : 0;
      c = float((uint(o.codes[o.base + long(j) * o.rs + long(d - hi * half) * o.cs]) >> (4 * hi)) & 0xFu);
    } else
      c = fq_load(o.codes, o.base + long(j) * o.rs + long(d) * o.cs, o.mode);
    const long gr = j / o.grows, gc = d / o.gcols;
    v = c * fq_load(o.scale, o.sbase + gr * o.srs + gc * o.scs, fq_dec_scale_dtype);
    if (o.has_offset) v += fq_load(o.offset, o.obase + gr * o.ors + gc * o.ocs, fq_dec_scale_dtype);
  } else {
    v = fq_load(o.window, o.wbase + long(j - o.n_coded) * o.wrs + long(d) * o.wcs, o.wmode);
  }
  return v;
}

// Stages keys [j0, j0 + FQ_DEC_BLOCK_K) x columns [c0, c0 + w) of `o`, dequantized, into
// `dst` (row stride FQ_CHUNK); keys at or past j_end are zero. All threads take part.
inline void fq_dec_stage(threadgroup float* dst, thread const FqDecOperand& o, int j0, int j_end,
                         int c0, int w, uint tid) {
  for (int e = int(tid); e < FQ_DEC_BLOCK_K * w; e += FQ_ATTN_THREADS) {
    const int r = e / w, c = e - r * w;
    dst[r * FQ_CHUNK + c] = j0 + r < j_end ? fq_dec_value(o, j0 + r, c0 + c) : 0.0f;
  }
}

// Query row r of a row block: head g of the GQA group, query i. Rows past G * Sq are padding.
inline int fq_dec_head(constant FqDecodeParams& p, int hk, int r) { return hk * (p.Hq / p.Hkv) + r / p.Sq; }

// The score of row r and key j (already scaled): -inf past the split's end or for padding
// rows; bottom-right causal (query i sees keys [0, length - Sq + i]) unless a mask is
// given, in which case the mask alone decides. Masks add -inf (SDPA's math backend).
inline float fq_dec_visible(constant FqDecodeParams& p, device const uchar* mask, int b, int hk, int r, int j,
                            int j_end, int length, float s) {
  if (r >= p.rows || j >= j_end) return -INFINITY;
  const int i = r % p.Sq;
  if (fq_mask_mode == FQ_NONE) return j > length - p.Sq + i ? s + -INFINITY : s;
  const long mi = long(b) * p.mask_str[0] + long(fq_dec_head(p, hk, r)) * p.mask_str[1] + long(i) * p.mask_str[2] +
                  long(j) * p.mask_str[3];
  const float m = fq_load(mask, mi, fq_mask_mode);
  if (fq_mask_mode == FQ_BOOL) return m == 0.0f ? s + -INFINITY : s;
  return s + m;
}

kernel void fq_decode_partial(
    device const uchar* q [[buffer(0)]], device const uchar* k_codes [[buffer(1)]],
    device const uchar* k_scale [[buffer(2)]], device const uchar* k_offset [[buffer(3)]],
    device const uchar* k_window [[buffer(4)]], device const float* k_smooth [[buffer(5)]],
    device const uchar* v_codes [[buffer(6)]], device const uchar* v_scale [[buffer(7)]],
    device const uchar* v_offset [[buffer(8)]], device const int* length_counter [[buffer(9)]],
    device const uchar* mask [[buffer(10)]], device float* part_o [[buffer(11)]],
    device float* part_lse [[buffer(12)]], constant FqDecodeParams& p [[buffer(13)]],
    threadgroup float* tg FQ_TG_MEM(0), uint3 tgp FQ_TG_POS, uint tid FQ_TID, uint sg FQ_SIMDGROUP,
    uint lane FQ_LANE) {
  const int D = fq_head_dim;
  const int b = int(tgp.z), hk = int(tgp.y) / p.row_blocks, r0 = (int(tgp.y) % p.row_blocks) * FQ_DEC_ROWS;
  const int split = int(tgp.x);
  // (clamped: a counter past the buffers' capacity must not send reads out of them)
  const int length = clamp(length_counter[0], 0, p.capacity);
  const int j_begin = split * p.split_len, j_end = min(length, j_begin + p.split_len);
  const int k_coded = (length / p.k_coded_multiple) * p.k_coded_multiple;
  const int v_coded = (length / p.v_coded_multiple) * p.v_coded_multiple;
  const FqDecOperand K = fq_dec_operand(k_codes, k_scale, k_offset, k_window, p.k, b, hk, k_coded, fq_k_mode,
                                        p.k_group_rows, p.k_group_cols, p.has_k_offset, p.window_dtype);
  const FqDecOperand V = fq_dec_operand(v_codes, v_scale, v_offset, nullptr, p.v, b, hk, v_coded, fq_v_mode,
                                        p.v_group_rows, p.v_group_cols, p.has_v_offset, p.window_dtype);

  threadgroup float* chunk = tg;                                   // FQ_DEC_BLOCK_K x FQ_CHUNK
  threadgroup float* S = chunk + FQ_DEC_BLOCK_K * FQ_CHUNK;        // FQ_DEC_ROWS x FQ_DEC_BLOCK_K: scores, then P
  threadgroup float* row_m = S + FQ_DEC_ROWS * FQ_DEC_BLOCK_K;     // running max
  threadgroup float* row_l = row_m + FQ_DEC_ROWS;                  // running sum
  threadgroup float* row_a = row_l + FQ_DEC_ROWS;                  // this tile's rescale factor
  threadgroup float* O = row_a + FQ_DEC_ROWS;                      // FQ_DEC_ROWS x D accumulator

  for (int e = int(tid); e < FQ_DEC_ROWS * D; e += FQ_ATTN_THREADS) O[e] = 0.0f;
  if (tid < uint(FQ_DEC_ROWS)) {
    row_m[tid] = -INFINITY;
    row_l[tid] = 0.0f;
  }

  // Q rows of the block, times the softmax scale (and the K smoothing divisors: the codes
  // hold k / smooth), as D / 8 matrices in every simdgroup.
  simdgroup_float8x8 qm[FQ_MAX_HEAD_DIM / 8];
  for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
    const int w = min(FQ_CHUNK, D - c0);
    for (int e = int(tid); e < FQ_DEC_ROWS * w; e += FQ_ATTN_THREADS) {
      const int rr = e / w, c = e - rr * w, r = r0 + rr;
      float x = 0.0f;
      if (r < p.rows) {
        const long qi = long(b) * p.q_str[0] + long(fq_dec_head(p, hk, r)) * p.q_str[1] +
                        long(r % p.Sq) * p.q_str[2] + long(c0 + c) * p.q_str[3];
        x = fq_load(q, qi, fq_io_dtype) * p.scale;
        if (p.has_k_smooth != 0)
          x *= k_smooth[long(b) * p.k.smooth[0] + long(hk) * p.k.smooth[1] + long(c0 + c) * p.k.smooth[3]];
      }
      chunk[rr * FQ_CHUNK + c] = x;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int t = 0; t < w / 8; ++t) simdgroup_load(qm[c0 / 8 + t], chunk + t * 8, FQ_CHUNK);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  for (int j0 = j_begin; j0 < j_end; j0 += FQ_DEC_BLOCK_K) {
    // Scores of the 8 rows against this simdgroup's 8 keys of the tile.
    simdgroup_float8x8 s = fq_zero8x8();
    for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
      const int w = min(FQ_CHUNK, D - c0);
      fq_dec_stage(chunk, K, j0, j_end, c0, w, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int t = 0; t < w / 8; ++t) {
        simdgroup_float8x8 kt;
        simdgroup_load(kt, chunk + int(sg) * 8 * FQ_CHUNK + t * 8, FQ_CHUNK, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s, qm[c0 / 8 + t], kt, s);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    simdgroup_store(s, S + int(sg) * 8, FQ_DEC_BLOCK_K);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Online softmax: simdgroup g takes rows 2g and 2g + 1, lane = key of the tile.
    for (int rr = 2 * int(sg); rr < 2 * int(sg) + 2; ++rr) {
      const float x = fq_dec_visible(p, mask, b, hk, r0 + rr, j0 + int(lane), j_end, length,
                                     S[rr * FQ_DEC_BLOCK_K + lane]);
      const float m_old = row_m[rr];
      const float m_new = max(m_old, simd_max(x));
      // (a masked score is -inf; a NaN / +inf one gives a NaN P, whatever max() made of it)
      const float pe = x == -INFINITY ? 0.0f : exp(x - m_new);
      S[rr * FQ_DEC_BLOCK_K + lane] = pe;
      const float sum = simd_sum(pe);
      if (lane == 0) {
        const float alpha = m_old == -INFINITY ? 0.0f : exp(m_old - m_new);
        row_m[rr] = m_new;
        row_l[rr] = row_l[rr] * alpha + sum;
        row_a[rr] = alpha;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // O = diag(alpha) O + P V; simdgroup g owns the column tiles t % 4 == g.
    simdgroup_float8x8 pm[FQ_DEC_BLOCK_K / 8];
    for (int kc = 0; kc < FQ_DEC_BLOCK_K / 8; ++kc) simdgroup_load(pm[kc], S + kc * 8, FQ_DEC_BLOCK_K);
    for (int c0 = 0; c0 < D; c0 += FQ_CHUNK) {
      const int w = min(FQ_CHUNK, D - c0);
      fq_dec_stage(chunk, V, j0, j_end, c0, w, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int t = int(sg); t < w / 8; t += FQ_ATTN_SIMDGROUPS) {
        threadgroup float* ot = O + c0 + t * 8;  // rows of stride D
        for (int e = int(lane); e < 64; e += 32) ot[(e / 8) * D + e % 8] *= row_a[e / 8];
        simdgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_float8x8 acc;
        simdgroup_load(acc, ot, D);
        for (int kc = 0; kc < FQ_DEC_BLOCK_K / 8; ++kc) {
          simdgroup_float8x8 vm;
          simdgroup_load(vm, chunk + kc * 8 * FQ_CHUNK + t * 8, FQ_CHUNK);
          simdgroup_multiply_accumulate(acc, pm[kc], vm, acc);
        }
        simdgroup_store(acc, ot, D);
        simdgroup_barrier(mem_flags::mem_threadgroup);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }

  // The split's normalised output and lse per row (l == 0: no visible key in this split,
  // output 0 and lse -inf, which the merge weighs 0; a NaN l gives a NaN row).
  for (int e = int(tid); e < FQ_DEC_ROWS * D; e += FQ_ATTN_THREADS) {
    const int rr = e / D, d = e - rr * D, r = r0 + rr;
    if (r >= p.rows) continue;
    const float l = row_l[rr];
    const long row = ((long(split) * p.B + b) * p.Hq + fq_dec_head(p, hk, r)) * p.Sq + r % p.Sq;
    part_o[row * D + d] = l == 0.0f ? 0.0f : O[e] / l;
    if (d == 0) part_lse[row] = l == 0.0f ? -INFINITY : row_m[rr] + log(l);
  }
}

// Combines the splits of one query row (grid (Sq, Hq, B), one simdgroup per row).
kernel void fq_decode_merge(device const float* part_o [[buffer(11)]], device const float* part_lse [[buffer(12)]],
                            constant FqDecodeParams& p [[buffer(13)]], device uchar* out [[buffer(14)]],
                            device float* lse [[buffer(15)]], uint3 tgp FQ_TG_POS, uint tid FQ_TID) {
  const int D = fq_head_dim;
  const int i = int(tgp.x), h = int(tgp.y), b = int(tgp.z);
  const long row = (long(b) * p.Hq + h) * p.Sq + i;
  const long split_rows = long(p.B) * p.Hq * p.Sq;
  float mx = -INFINITY;  // (a NaN lse is skipped here and makes its weight NaN below)
  for (int s = 0; s < p.n_splits; ++s) mx = max(mx, part_lse[s * split_rows + row]);
  float den = 0.0f;
  for (int s = 0; s < p.n_splits; ++s) {
    const float x = part_lse[s * split_rows + row];
    den += x == -INFINITY ? 0.0f : exp(x - mx);
  }
  for (int d = int(tid); d < D; d += FQ_DEC_MERGE_THREADS) {
    float acc = 0.0f;
    for (int s = 0; s < p.n_splits; ++s) {
      const float x = part_lse[s * split_rows + row];
      if (x != -INFINITY) acc += exp(x - mx) * part_o[(s * split_rows + row) * D + d];
    }
    const long oi = long(b) * p.o_str[0] + long(h) * p.o_str[1] + long(i) * p.o_str[2] + long(d) * p.o_str[3];
    fq_store(out, oi, fq_io_dtype, den == 0.0f ? 0.0f : acc / den);
  }
  if (tid == 0) lse[row] = den == 0.0f ? -INFINITY : mx + log(den);
}
