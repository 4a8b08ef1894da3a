// Pieces shared by the attention forward and backward kernels: the pipeline's function
// constants, operand access with dequantization at load, staging of a tile into
// threadgroup memory, and the visibility / bias of one score.
//
// Why dequantize at load: Apple GPUs have no int8 matrix units, so every operand becomes
// fp32 in threadgroup memory and all products run on simdgroup_float8x8. What INT8 /
// INT4 / FP8 buy on Apple is bandwidth and memory, not arithmetic.
//
// For Q and K only (data - zero_point) is staged; their per-row scales multiply the
// finished dot product. Products of integers below 2^24 are exact in fp32, so an INT8
// score equals the int32-accumulated score of the contract times the two row scales.
// V (per-channel or per-row scales) is staged fully dequantized.
#pragma once

#include "fq_common.h"

FQ_FUNCTION_CONSTANT(int, fq_head_dim, FQ_FC_HEAD_DIM)
FQ_FUNCTION_CONSTANT(int, fq_q_mode, FQ_FC_Q_MODE)
FQ_FUNCTION_CONSTANT(int, fq_k_mode, FQ_FC_K_MODE)
FQ_FUNCTION_CONSTANT(int, fq_v_mode, FQ_FC_V_MODE)
FQ_FUNCTION_CONSTANT(int, fq_pv_mode, FQ_FC_PV_MODE)
FQ_FUNCTION_CONSTANT(int, fq_mask_mode, FQ_FC_MASK_MODE)
FQ_FUNCTION_CONSTANT(int, fq_causal, FQ_FC_CAUSAL)
FQ_FUNCTION_CONSTANT(int, fq_block_k, FQ_FC_BLOCK_K)

inline bool fq_is_quantized(int mode) { return mode >= FQ_I8 && mode <= FQ_E5M2; }

// One operand (Q, K, V, dO or O) of one (batch, head): where its elements, scales and
// zero points are.
struct FqOperand {
  device const uchar* data;
  device const float* scale;
  device const int* zp;
  long base, sbase, zbase;
  long rs, cs, srs, scs, zrs, zcs;
  int mode;
  bool has_zp;
};

inline FqOperand fq_operand(device const uchar* data, device const float* scale, device const int* zp,
                            constant fq_i64* str, constant fq_i64* sstr, constant fq_i64* zstr,
                            int b, int h, int mode, int has_zp) {
  FqOperand o;
  o.data = data;
  o.scale = scale;
  o.zp = zp;
  o.mode = mode;
  o.has_zp = fq_is_quantized(mode) && has_zp != 0;
  o.base = long(b) * str[0] + long(h) * str[1];
  o.rs = str[2];
  o.cs = str[3];
  const bool q = fq_is_quantized(mode);
  o.sbase = q ? long(b) * sstr[0] + long(h) * sstr[1] : 0;
  o.srs = q ? sstr[2] : 0;
  o.scs = q ? sstr[3] : 0;
  o.zbase = o.has_zp ? long(b) * zstr[0] + long(h) * zstr[1] : 0;
  o.zrs = o.has_zp ? zstr[2] : 0;
  o.zcs = o.has_zp ? zstr[3] : 0;
  return o;
}

// data - zero_point at (row, col), unscaled.
inline float fq_raw(thread const FqOperand& o, int row, int col) {
  float v;
  if (o.mode == FQ_I4)
    v = fq_load_i4(o.data, o.base + long(row) * o.rs + long(col >> 1) * o.cs, uint(col & 1));
  else
    v = fq_load(o.data, o.base + long(row) * o.rs + long(col) * o.cs, o.mode);
  if (o.has_zp) v -= float(o.zp[o.zbase + long(row) * o.zrs + long(col) * o.zcs]);
  return v;
}

inline float fq_scale_at(thread const FqOperand& o, int row, int col) {
  return fq_is_quantized(o.mode) ? o.scale[o.sbase + long(row) * o.srs + long(col) * o.scs] : 1.0f;
}

// Stages rows [row0, row0 + nrows) x columns [c0, c0 + w) of `o` into `dst` (row stride
// FQ_CHUNK), zero-filling rows at or past row0 + nvalid (tails), dequantized fully when
// `scaled`, else as data - zero_point. All threads of the threadgroup take part.
// `nonfinite` (optional): set to 1 by any thread that staged an inf / NaN (every writer
// writes the same value; read it after the barrier that follows).
inline void fq_stage(threadgroup float* dst, thread const FqOperand& o, int row0, int nvalid, int nrows,
                     int c0, int w, bool scaled, uint tid, threadgroup float* nonfinite = nullptr) {
  bool bad = false;
  for (int i = int(tid); i < nrows * w; i += FQ_ATTN_THREADS) {
    const int r = i / w, c = i - r * w;
    float v = 0.0f;
    if (r < nvalid) {
      v = fq_raw(o, row0 + r, c0 + c);
      if (scaled) v *= fq_scale_at(o, row0 + r, c0 + c);
    }
    if (nonfinite != nullptr) bad = bad || !isfinite(v);
    dst[r * FQ_CHUNK + c] = v;
  }
  if (bad) *nonfinite = 1.0f;
}

// The score s (already scaled) of query i and key j with causal masking, the boolean or
// additive mask and sequence tails applied. Masks ADD -inf, as SDPA's math backend does
// (docs/op_contract.md, non-finite values): a hidden key's finite score becomes -inf,
// a NaN / +inf one NaN. Keys and rows past the sequence ends are assigned -inf.
inline float fq_visible_score(constant FqAttnParams& p, device const uchar* mask, int b, int h, int i, int j,
                              float s) {
  if (i >= p.Sq || j >= p.Skv) return -INFINITY;
  if (fq_causal != 0 && j > i) return s + -INFINITY;
  if (fq_mask_mode != FQ_NONE) {
    const long mi = long(b) * p.mask_str[0] + long(h) * p.mask_str[1] + long(i) * p.mask_str[2] +
                    long(j) * p.mask_str[3];
    const float m = fq_load(mask, mi, fq_mask_mode);
    if (fq_mask_mode == FQ_BOOL) {
      if (m == 0.0f) return s + -INFINITY;
    } else {
      s += m;
    }
  }
  return s;
}

// P as it enters P·V: unquantized, INT8 with the scale (max of P over this key tile and
// row) / 127 — a fixed 1/127 scale loses the small probabilities of flat rows (2.8 % vs
// 1.7 % rel-L2 at S=1024, docs/op_contract.md) — or rounded to e4m3.
// A tile whose largest P is under 127 · FLT_MIN (~1.5e-36: ~83 nats below the row's
// running max) adds nothing representable to O, and its scale would be denormal, which
// Metal flushes to 0 (x / 0 = NaN): such a tile's P rounds to 0 (as in the CPU kernel).
inline float fq_round_p(float x, float tile_max) {
  if (fq_pv_mode == FQ_PV_INT8) {
    if (tile_max < 1.5e-36f) return 0.0f;
    const float s = tile_max / FQ_INT8_QMAX;
    return rint(x / s) * s;
  }
  if (fq_pv_mode == FQ_PV_E4M3) return fq_round_fp8(x, FQ_E4M3);
  return x;
}

inline simdgroup_float8x8 fq_zero8x8() { return make_filled_simdgroup_matrix<float, 8, 8>(0.0f); }
