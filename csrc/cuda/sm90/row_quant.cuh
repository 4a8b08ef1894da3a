// One row of the accurate preset's Q / K quantization (docs/op_contract.md), held by
// kLanesPerRow consecutive lanes of a warp, kPerLane consecutive channels each: the
// orthonormal Hadamard rotation along the head dim, scale = absmax / 127, codes =
// round-half-even of the correctly rounded quotient. Shared by the pre-pass's codes kernel
// (prepass.cu: K rows, and Q rows when the forward does not quantize Q itself) and the
// forward kernel's in-kernel Q quantization (fwd_kernel.cuh), so both make the same codes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "../../precision.h"
#include "float_bits.h"
#include "fwd_params.h"

namespace flash_quant_sm90 {

constexpr int kLanesPerRow = 4;
constexpr int kPerLane = kHeadDim / kLanesPerRow;
static_assert(kPerLane == 32, "the row quantizer's lane layout assumes a head dim of 128");
//: 16-bit values a 16-byte load holds.
constexpr int kValuesPerLoad = 8;
//: INT8 codes, symmetric: [-kQMax, kQMax] (csrc/precision.h).
constexpr float kQMax = FQ_INT8_QMAX;
//: 1 / sqrt(kHeadDim): the orthonormal Hadamard matrix is the ±1 one times this.
constexpr float kRotationScale = 0.08838834764831845f;
// y / s correctly rounded, as the other backends' quantizers divide (flash_quant/cuda/quantize.py
// _divide): with r = 1/s rounded, q = y r and one exact-residual step q + fma(-q, s, y) r
// (Markstein); scales below 2^-100 are lifted by 2^100 first, as _divide does, so that
// 1/s cannot overflow.
constexpr float kTinyScale = 7.888609052210118e-31f;  // 2^-100
constexpr float kTinyLift = 1.2676506002282294e30f;    // 2^100

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

// This lane's kPerLane values of a row (16-byte loads); `present` false: zeros.
template <class T>
__device__ __forceinline__ void load_row_part(const T* src, bool present, float (&y)[kPerLane]) {
#pragma unroll
  for (int c = 0; c < kPerLane / kValuesPerLoad; ++c) {
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (present) raw = reinterpret_cast<const uint4*>(src)[c];
    const T* in = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kValuesPerLoad; ++j) y[c * kValuesPerLoad + j] = to_float<T>(in[j]);
  }
}

// y[i] / scale correctly rounded, in place (the Markstein step above). kLifted: y and the
// scale are first lifted by 2^100 (exact, and the quotient the same number) so that the
// reciprocal of a scale below kTinyScale cannot overflow.
template <bool kLifted>
__device__ __forceinline__ void divide_part(float (&y)[kPerLane], float scale) {
  const float s = kLifted ? scale * kTinyLift : scale;
  const float inv = __fdiv_rn(1.f, s);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const float yl = kLifted ? y[i] * kTinyLift : y[i];
    const float q = yl * inv;
    y[i] = fmaf(fmaf(-q, s, yl), inv, q);
  }
}

//: How quantize_row_part divides a row with a tiny scale (below kTinyScale) and where it
//: clamps: the codes are the same either way (every quotient correctly rounded, |code| <=
//: 127). kLifted: one reciprocal of the lifted scale (divide_part<true>), a clamp on that
//: branch only: the pre-pass's codes kernel at 64 registers instead of 76 (session 9).
//: kPerElement: __fdiv_rn per value and a clamp on every code (the code before session 9),
//: which the forward with 16-bit P·V keeps for its in-kernel Q: with the lifted form ptxas
//: schedules that kernel's main loop differently (the same instructions, reordered) and it
//: measured 7.7 % slower (H100, session 10, Flux shape, alternating processes: 490 / 491 us
//: against 456 / 456 us; docs/hopper.md).
enum class TinyDivide { kLifted, kPerElement };

// Quantizes the row whose channels part * kPerLane .. + kPerLane - 1 this lane holds in y
// (K rows: already centred). Every lane of the warp must call it (shuffles). Returns the
// row's scale (1 for an all-zero row; NaN for a row with an inf / NaN, whose codes are 0,
// so the scores that use it are NaN, as SDPA's) and this lane's codes, 4 a word in channel
// order; with `center` (kPerLane floats of the K centre, unrotated, for this lane's
// channels), *dot = the row · centre over the whole row before the rotation (the lse's
// centre term q · k_mean: the rotation is orthonormal, so the rotated product is the same
// number), else 0.
template <TinyDivide kTiny = TinyDivide::kLifted>
__device__ __forceinline__ float quantize_row_part(float (&y)[kPerLane], int part, const float* center,
                                                   uint32_t (&packed)[kPerLane / 4], float* dot) {
  float d = 0.f;
  if (center != nullptr) {
    const float4* center4 = reinterpret_cast<const float4*>(center);
#pragma unroll
    for (int c = 0; c < kPerLane / 4; ++c) {
      const float4 m4 = center4[c];
      d = fmaf(y[4 * c], m4.x, fmaf(y[4 * c + 1], m4.y, fmaf(y[4 * c + 2], m4.z, fmaf(y[4 * c + 3], m4.w, d))));
    }
  }
  // Fast Walsh-Hadamard transform, y_i = sum_j (-1)^popcount(i & j) x_j (Sylvester order,
  // as flash_quant.rotation.hadamard_matrix): channel bits below log2(kPerLane) in registers ...
#pragma unroll
  for (int half = 1; half < kPerLane; half *= 2) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (!(i & half)) {
        const float a = y[i], c = y[i + half];
        y[i] = a + c;
        y[i + half] = a - c;
      }
    }
  }
  // ... the others are the lane's `part` bits: y_lo' = y_lo + y_hi, y_hi' = y_lo - y_hi
#pragma unroll
  for (int m = 1; m < kLanesPerRow; m *= 2) {
    const float sign = (part & m) ? -1.f : 1.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) y[i] = fmaf(sign, y[i], __shfl_xor_sync(0xffffffffu, y[i], m));
  }
  // Every output of the transform sums every input: one inf / NaN (or an overflow) in the
  // row makes y[0] of each of its lanes non-finite.
  const bool bad = !isfinite(y[0]);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    y[i] *= kRotationScale;
    amax = fmaxf(amax, fabsf(y[i]));
  }
#pragma unroll
  for (int m = 1; m < kLanesPerRow; m *= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    d += __shfl_xor_sync(0xffffffffu, d, m);
  }
  *dot = d;
  float scale = __fdiv_rn(amax, kQMax);
  if (scale == 0.f) scale = 1.f;
  if (bad) {
#pragma unroll
    for (int c = 0; c < kPerLane / 4; ++c) packed[c] = 0;
    return NAN;
  }
  // (a subnormal scale keeps few bits of amax / 127, so a quotient may pass 127: clamped.
  // |y| <= amax and a normal scale = amax / 127 rounded to nearest give a correctly rounded
  // |y / scale| of at most 127 (1 + 2^-23): its code is at most 127 without a clamp)
  constexpr bool kLifted = kTiny == TinyDivide::kLifted;
  if (scale < kTinyScale) {
    if constexpr (kLifted) {
      divide_part<true>(y, scale);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) y[i] = fminf(fmaxf(y[i], -kQMax), kQMax);
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) y[i] = __fdiv_rn(y[i], scale);
    }
  } else {
    divide_part<false>(y, scale);
  }
#pragma unroll
  for (int c = 0; c < kPerLane / 4; ++c) {
    uint32_t bits[4];
    // round half to even by the float adder: the code sits in the low byte of the sum's
    // bits (two's complement for negative codes)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float code = kLifted ? y[4 * c + j] : fminf(fmaxf(y[4 * c + j], -kQMax), kQMax);
      bits[j] = __float_as_uint(code + kFloatOffset);
    }
    packed[c] = __byte_perm(__byte_perm(bits[0], bits[1], 0x0040), __byte_perm(bits[2], bits[3], 0x0040), 0x5410);
  }
  return scale;
}

}  // namespace flash_quant_sm90
