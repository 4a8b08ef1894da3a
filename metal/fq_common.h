// Shared pieces of flash_quant's Metal kernels: how a kernel spells its attributes so the
// same source compiles as Metal and, through tools/metal_emu's stand-in <metal_stdlib>,
// as C++; element loads and stores for every dtype; FP8 and bf16 conversions done with
// integer bit operations (so they need neither Metal 3.1's bfloat nor a float8 type).
#pragma once

#include <metal_stdlib>
using namespace metal;

#include "fq_params.h"
// FQ_INT8_QMAX, FQ_FP8_E4M3_MAX, ...: the precisions' numbers, shared with the CPU kernels,
// the MPS host code and Python (flash_quant/config.py).
#include "../csrc/precision.h"

#ifdef __METAL_VERSION__
#define FQ_TG_POS [[threadgroup_position_in_grid]]
#define FQ_TID [[thread_index_in_threadgroup]]
#define FQ_SIMDGROUP [[simdgroup_index_in_threadgroup]]
#define FQ_LANE [[thread_index_in_simdgroup]]
#define FQ_TG_MEM(i) [[threadgroup(i)]]
#define FQ_FUNCTION_CONSTANT(T, name, i) constant T name [[function_constant(i)]];
#else
#define FQ_TG_POS METAL_EMU_THREADGROUP_POSITION_IN_GRID
#define FQ_TID METAL_EMU_THREAD_INDEX_IN_THREADGROUP
#define FQ_SIMDGROUP METAL_EMU_SIMDGROUP_INDEX_IN_THREADGROUP
#define FQ_LANE METAL_EMU_THREAD_INDEX_IN_SIMDGROUP
#define FQ_TG_MEM(i) METAL_EMU_THREADGROUP_MEMORY(float, i)
#define FQ_FUNCTION_CONSTANT(T, name, i) METAL_EMU_FUNCTION_CONSTANT(T, name, i)
#endif

// The floating dtype of the op's floating tensors (FQ_F32 / FQ_F16 / FQ_BF16).
FQ_FUNCTION_CONSTANT(int, fq_io_dtype, FQ_FC_IO_DTYPE)

// ------------------------------------------------------------------ FP8 and bf16
// Decodes one float8 byte. e4m3fn: bias 7, no infinities, 0x7F/0xFF are NaN.
// e5m2: bias 15, IEEE-like infinities and NaNs.
inline float fq_fp8_to_float(uint byte, int dtype) {
  const bool e4 = dtype == FQ_E4M3;
  const int mbits = e4 ? 3 : 2, bias = e4 ? 7 : 15, emax = e4 ? 15 : 31;
  const float sign = (byte & 0x80u) ? -1.0f : 1.0f;
  const int e = int((byte >> mbits) & uint(emax));
  const int m = int(byte & ((1u << mbits) - 1u));
  if (e4 && e == 15 && m == 7) return NAN;
  if (!e4 && e == 31) return m == 0 ? sign * INFINITY : NAN;
  if (e == 0) return sign * ldexp(float(m), 1 - bias - mbits);
  return sign * ldexp(float(m + (1 << mbits)), e - bias - mbits);
}

// Rounds x to the nearest value of the float8 format (ties to even), saturating at the
// format's largest finite value. Used for FP8 quantization and for P in "fp8_e4m3".
inline float fq_round_fp8(float x, int dtype) {
  const bool e4 = dtype == FQ_E4M3;
  const int mbits = e4 ? 3 : 2, min_exp = e4 ? -6 : -14;
  const float maxv = e4 ? FQ_FP8_E4M3_MAX : FQ_FP8_E5M2_MAX;
  const float a = fabs(x);
  if (isnan(a)) return x;
  const int e = max(int((as_type<uint>(a) >> 23) & 0xFFu) - 127, min_exp);
  // a / quantum is exact (a power-of-two division), so rint does the one rounding.
  const float r = min(rint(ldexp(a, mbits - e)) * ldexp(1.0f, e - mbits), maxv);
  return copysign(r, x);
}

// The float8 byte of a value already rounded by fq_round_fp8.
inline uint fq_fp8_bits(float r, int dtype) {
  const bool e4 = dtype == FQ_E4M3;
  const int mbits = e4 ? 3 : 2, bias = e4 ? 7 : 15, min_exp = e4 ? -6 : -14;
  const uint sign = (as_type<uint>(r) >> 24) & 0x80u;
  const float a = fabs(r);
  if (a == 0.0f) return sign;
  const int e = int((as_type<uint>(a) >> 23) & 0xFFu) - 127;
  // Subnormal: a = m * 2^(1 - bias - mbits).
  if (e < min_exp) return sign | uint(ldexp(a, bias + mbits - 1));
  const uint m = uint(ldexp(a, mbits - e)) - (1u << mbits);
  return sign | (uint(e + bias) << mbits) | m;
}

inline float fq_bf16_to_float(uint bits) { return as_type<float>(bits << 16); }

// Round to nearest even, NaN kept quiet.
inline uint fq_float_to_bf16(float x) {
  const uint u = as_type<uint>(x);
  if (isnan(x)) return 0x7FC0u;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// ------------------------------------------------------------------ element access
// Loads element `idx` (in units of the dtype; for FQ_I4 the logical element index whose
// byte is idx >> 1 is not meaningful with strides, so INT4 goes through fq_load_i4).
inline float fq_load(device const uchar* p, long idx, int dtype) {
  switch (dtype) {
    case FQ_F32: return ((device const float*)p)[idx];
    case FQ_F16: return float(((device const half*)p)[idx]);
    case FQ_BF16: return fq_bf16_to_float(uint(((device const ushort*)p)[idx]));
    case FQ_I8: {
      const int v = int(p[idx]);
      return float(v >= 128 ? v - 256 : v);
    }
    case FQ_BOOL: return p[idx] != 0 ? 1.0f : 0.0f;
    default: return fq_fp8_to_float(uint(p[idx]), dtype);
  }
}

// Signed nibble `hi` (0 = low, 1 = high) of byte p[byte_idx].
inline float fq_load_i4(device const uchar* p, long byte_idx, uint hi) {
  const int v = int((uint(p[byte_idx]) >> (hi * 4u)) & 0xFu);
  return float(v >= 8 ? v - 16 : v);
}

inline void fq_store(device uchar* p, long idx, int dtype, float v) {
  switch (dtype) {
    case FQ_F32: ((device float*)p)[idx] = v; break;
    case FQ_F16: ((device half*)p)[idx] = half(v); break;
    default: ((device ushort*)p)[idx] = ushort(fq_float_to_bf16(v)); break;
  }
}

inline int fq_ceil_div(int a, int b) { return (a + b - 1) / b; }
