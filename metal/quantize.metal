// Quantization kernels (docs/op_contract.md, quantize / dequantize).
//
// The tensor is viewed as (L, S, D), L the product of the leading dims. Every
// granularity is a box of that view (FqQuantParams): per_tensor the whole of it,
// per_head one (S, D) slice, per_token one row, per_block bs rows, per_channel one
// column of a slice. Three launches, in order on one compute encoder (dispatches of a
// serial encoder see each other's writes):
//   fq_quantize_mean   (smooth only) one thread per (l, d): the mean over S;
//   fq_quantize_reduce one threadgroup per group: min / max (of x - mean), reduced
//                      with simd_min / simd_max across lanes and threadgroup memory
//                      across the 8 simdgroups, then the group's scale and zero point;
//   fq_quantize_apply  one thread per output byte: round, clamp, pack (INT4: two
//                      nibbles, low first).
// fq_dequantize and fq_quantize_with_scale are one thread per output byte as well.
//
// Exact rounding matters here (scales and codes are compared with the CPU backend), so
// the host builds this library with fast math off: `/`, rint and the FP8 rounding are
// then IEEE-exact.
#include "fq_common.h"

FQ_FUNCTION_CONSTANT(int, fq_precision, FQ_FC_QUANT_PRECISION)
FQ_FUNCTION_CONSTANT(int, fq_asymmetric, FQ_FC_QUANT_ASYMMETRIC)

inline bool fq_is_fp8() { return fq_precision == FQ_E4M3 || fq_precision == FQ_E5M2; }

inline float fq_qmax() {
  switch (fq_precision) {
    case FQ_I8: return FQ_INT8_QMAX;
    case FQ_I4: return FQ_INT4_QMAX;
    case FQ_E4M3: return FQ_FP8_E4M3_MAX;
    default: return FQ_FP8_E5M2_MAX;
  }
}
inline float fq_qmin() { return fq_precision == FQ_I4 ? FQ_INT4_QMIN : FQ_INT8_QMIN; }

inline float fq_x_minus_mean(device const uchar* x, device const float* mean, constant FqQuantParams& p, int l,
                             int s, int d) {
  float v = fq_load(x, (long(l) * p.S + s) * p.D + d, fq_io_dtype);
  if (p.has_mean != 0) v -= mean[long(l) * p.D + d];
  return v;
}

inline int fq_group_of(constant FqQuantParams& p, int l, int s, int d) {
  return ((l / p.gl) * p.n_gs + s / p.gs) * p.n_gd + d / p.gd;
}

// Integer code (before packing) or FP8-rounded value of one element.
inline float fq_quantize_value(float v, float scale, float zp) {
  if (fq_is_fp8()) return fq_round_fp8(v / scale, fq_precision);
  const float lo = fq_asymmetric != 0 ? fq_qmin() : -fq_qmax();
  return clamp(rint(v / scale) + zp, lo, fq_qmax());
}

kernel void fq_quantize_mean(device const uchar* x [[buffer(0)]], device uchar* data [[buffer(1)]],
                             device float* scale [[buffer(2)]], device int* zero_point [[buffer(3)]],
                             device float* mean [[buffer(4)]], constant FqQuantParams& p [[buffer(5)]],
                             threadgroup float* tg FQ_TG_MEM(0), uint3 tgp FQ_TG_POS, uint tid FQ_TID) {
  const long gid = long(tgp.x) * FQ_QUANT_THREADS + tid;
  if (gid >= long(p.L) * p.D) return;
  const int l = int(gid / p.D), d = int(gid % p.D);
  float sum = 0.0f;
  for (int s = 0; s < p.S; ++s) sum += fq_load(x, (long(l) * p.S + s) * p.D + d, fq_io_dtype);
  mean[gid] = sum / float(p.S);
}

kernel void fq_quantize_reduce(device const uchar* x [[buffer(0)]], device uchar* data [[buffer(1)]],
                               device float* scale [[buffer(2)]], device int* zero_point [[buffer(3)]],
                               device float* mean [[buffer(4)]], constant FqQuantParams& p [[buffer(5)]],
                               threadgroup float* tg FQ_TG_MEM(0), uint3 tgp FQ_TG_POS, uint tid FQ_TID,
                               uint sg FQ_SIMDGROUP, uint lane FQ_LANE) {
  const int g = int(tgp.x);
  const int gi_d = g % p.n_gd, gi_s = (g / p.n_gd) % p.n_gs, gi_l = g / (p.n_gd * p.n_gs);
  const int l0 = gi_l * p.gl, s0 = gi_s * p.gs, d0 = gi_d * p.gd;
  const int nl = min(p.gl, p.L - l0), ns = min(p.gs, p.S - s0), nd = min(p.gd, p.D - d0);
  const long n = long(nl) * ns * nd;
  float lo = INFINITY, hi = -INFINITY;
  for (long e = tid; e < n; e += FQ_QUANT_THREADS) {
    const int d = d0 + int(e % nd), s = s0 + int((e / nd) % ns), l = l0 + int(e / (long(nd) * ns));
    const float v = fq_x_minus_mean(x, mean, p, l, s, d);
    lo = min(lo, v);
    hi = max(hi, v);
  }
  lo = simd_min(lo);
  hi = simd_max(hi);
  if (lane == 0) {
    tg[sg] = lo;
    tg[8 + sg] = hi;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    for (int i = 1; i < FQ_QUANT_THREADS / 32; ++i) {
      lo = min(lo, tg[i]);
      hi = max(hi, tg[8 + i]);
    }
    float s;
    float z = 0.0f;
    if (fq_asymmetric != 0) {
      lo = min(lo, 0.0f);
      hi = max(hi, 0.0f);
      s = (hi - lo) / (fq_qmax() - fq_qmin());
      if (s == 0.0f) s = 1.0f;  // an all-zero group
      z = clamp(rint(fq_qmin() - lo / s), fq_qmin(), fq_qmax());
    } else {
      const float amax = max(-lo, hi);
      s = amax == 0.0f ? 1.0f : amax / fq_qmax();
    }
    scale[g] = s;
    zero_point[g] = int(z);
  }
}

kernel void fq_quantize_apply(device const uchar* x [[buffer(0)]], device uchar* data [[buffer(1)]],
                              device float* scale [[buffer(2)]], device int* zero_point [[buffer(3)]],
                              device float* mean [[buffer(4)]], constant FqQuantParams& p [[buffer(5)]],
                              threadgroup float* tg FQ_TG_MEM(0), uint3 tgp FQ_TG_POS, uint tid FQ_TID) {
  const long gid = long(tgp.x) * FQ_QUANT_THREADS + tid;
  const int per = fq_precision == FQ_I4 ? FQ_INT4_PER_BYTE : 1;  // elements per output byte
  const long total = long(p.L) * p.S * p.D;
  if (gid * per >= total) return;
  uint byte = 0;
  for (int k = 0; k < per; ++k) {
    const long e = gid * per + k;
    const int d = int(e % p.D), s = int((e / p.D) % p.S), l = int(e / (long(p.D) * p.S));
    const int g = fq_group_of(p, l, s, d);
    const float q = fq_quantize_value(fq_x_minus_mean(x, mean, p, l, s, d), scale[g], float(zero_point[g]));
    if (fq_is_fp8())
      byte = fq_fp8_bits(q, fq_precision);
    else
      byte |= (uint(int(q)) & (per == 2 ? 0xFu : 0xFFu)) << (4 * k);
  }
  data[gid] = uchar(byte);
}

// Offsets of element e's scale / zero point and mean under the broadcasting strides of
// FqQuantParams (dequantize, quantize_with_scale).
inline void fq_group_offsets(constant FqQuantParams& p, long e, thread long& soff, thread long& moff) {
  const int d = int(e % p.D), s = int((e / p.D) % p.S);
  long l = e / (long(p.D) * p.S);
  soff = long(s / p.block_rows) * p.scale_row_str + long(d) * p.scale_col_str;
  moff = long(d) * p.mean_col_str;
  for (int i = 3; i >= 0; --i) {  // leading index, innermost dim first
    const long li = l % p.lead_size[i];
    l /= p.lead_size[i];
    soff += li * p.scale_lead_str[i];
    moff += li * p.mean_lead_str[i];
  }
}

// quantize_with_scale: the codes of x under given scales (and zero points when
// asymmetric), one thread per output byte.
kernel void fq_quantize_with_scale(device const uchar* x [[buffer(0)]], device uchar* data [[buffer(1)]],
                                   device const float* scale [[buffer(2)]], device const int* zero_point [[buffer(3)]],
                                   constant FqQuantParams& p [[buffer(5)]], uint3 tgp FQ_TG_POS, uint tid FQ_TID) {
  const long gid = long(tgp.x) * FQ_QUANT_THREADS + tid;
  const int per = fq_precision == FQ_I4 ? FQ_INT4_PER_BYTE : 1;
  if (gid * per >= long(p.L) * p.S * p.D) return;
  uint byte = 0;
  for (int k = 0; k < per; ++k) {
    const long e = gid * per + k;
    long soff, moff;
    fq_group_offsets(p, e, soff, moff);
    const float zp = p.has_zp != 0 ? float(zero_point[soff]) : 0.0f;
    const float q = fq_quantize_value(fq_load(x, e, fq_io_dtype), scale[soff], zp);
    if (fq_is_fp8())
      byte = fq_fp8_bits(q, fq_precision);
    else
      byte |= (uint(int(q)) & (per == 2 ? 0xFu : 0xFFu)) << (4 * k);
  }
  data[gid] = uchar(byte);
}

kernel void fq_dequantize(device const uchar* data [[buffer(0)]], device const float* scale [[buffer(1)]],
                          device const int* zero_point [[buffer(2)]], device const float* mean [[buffer(3)]],
                          device uchar* out [[buffer(4)]], constant FqQuantParams& p [[buffer(5)]],
                          uint3 tgp FQ_TG_POS, uint tid FQ_TID) {
  const long gid = long(tgp.x) * FQ_QUANT_THREADS + tid;
  const int per = fq_precision == FQ_I4 ? FQ_INT4_PER_BYTE : 1;
  const long total = long(p.L) * p.S * p.D;
  if (gid * per >= total) return;
  for (int k = 0; k < per; ++k) {
    const long e = gid * per + k;
    long soff, moff;
    fq_group_offsets(p, e, soff, moff);
    float q = per == 2 ? fq_load_i4(data, gid, uint(k)) : fq_load(data, e, fq_precision);
    if (p.has_zp != 0) q -= float(zero_point[soff]);
    float v = q * scale[soff];
    if (p.has_mean != 0) v += mean[moff];
    fq_store(out, e, fq_io_dtype, v);
  }
}
