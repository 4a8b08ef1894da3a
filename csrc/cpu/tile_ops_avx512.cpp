// AVX-512 (F/BW/VL/DQ) + VNNI implementations of the tile primitives of tile_ops.h.
//
// Every function here carries FQ_AVX512 (a `target` attribute) instead of the file being
// built with -mavx512*: the extension must load on any x86-64 (and build on ARM, where
// this file compiles to a stub), so these functions are only reached after
// __builtin_cpu_supports says the CPU has the instructions.
#include "cpu/tile_ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#define FQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

namespace flash_quant {
namespace cpu {
namespace {

// ---- fp32 GEMM: C = alpha·A·B (+C) -----------------------------------------------
// Register block of R rows × NV·16 columns: NV loads of B per k, each reused by R rows
// (broadcast of A[r][k]); R·NV ≤ 24 accumulators stay in zmm registers.
template <int R, int NV>
FQ_AVX512 void gemm_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                          int64_t ldc, int kdim, float alpha, bool accumulate) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int k = 0; k < kdim; ++k) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + 16 * v;
      __m512 res = _mm512_mul_ps(acc[r][v], va);
      if (accumulate) res = _mm512_add_ps(_mm512_loadu_ps(c), res);
      _mm512_storeu_ps(c, res);
    }
}

using GemmBlockFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, float, bool);
constexpr int kGemmRows = 6;

template <int R>
struct GemmRow {
  static constexpr GemmBlockFn fns[4] = {&gemm_block<R, 1>, &gemm_block<R, 2>, &gemm_block<R, 3>,
                                         &gemm_block<R, 4>};
};

FQ_AVX512 void gemm_f32_avx512(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                               int64_t ldc, int m, int n, int kdim, float alpha, bool accumulate) {
  static const GemmBlockFn* table[kGemmRows] = {GemmRow<1>::fns, GemmRow<2>::fns, GemmRow<3>::fns,
                                                GemmRow<4>::fns, GemmRow<5>::fns, GemmRow<6>::fns};
  for (int n0 = 0; n0 < n; n0 += 64) {
    const int nv = (n - n0) >= 64 ? 4 : (n - n0) / 16;
    for (int i0 = 0; i0 < m; i0 += kGemmRows) {
      const int r = (m - i0) < kGemmRows ? (m - i0) : kGemmRows;
      table[r - 1][nv - 1](A + i0 * lda, lda, B + n0, ldb, C + i0 * ldc + n0, ldc, kdim, alpha,
                           accumulate);
    }
  }
}

// ---- INT8 scores with vpdpbusd -------------------------------------------------------
// vpdpbusd multiplies unsigned bytes by signed bytes, four per 32-bit lane: Q is passed
// as q + 128 (uint8) and the caller's col_c holds -128·Σ_d k_jd to undo the offset.
// kp is [dk/4][64 keys][4 bytes], so one 64-byte load is 16 keys × 4 channels and a
// 32-bit broadcast of 4 query bytes feeds 16 keys at once.
// acc += Σ over 4-byte groups of u8 · s8, per 32-bit lane. GCC 12 compiles the
// _mm512_dpbusd_epi32 intrinsic in a register-blocked loop into copies and stack spills of
// every accumulator (measured: 2x slower tile); the asm form updates acc in place.
FQ_AVX512 inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__) && !defined(__clang__)
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}

template <int R>
FQ_AVX512 void qk_int8_rows(const uint8_t* qu, int64_t ldq, int dk, const int8_t* kp,
                            const IntScoreParams& p, int i0, float* S) {
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int t = 0; t < dk / 4; ++t) {
    const int8_t* kt = kp + t * kBN * 4;
    __m512i b[4];
    for (int v = 0; v < 4; ++v) b[v] = _mm512_loadu_si512(kt + 64 * v);
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, qu + (i0 + r) * ldq + 4 * t, 4);
      const __m512i a = _mm512_set1_epi32(word);
      for (int v = 0; v < 4; ++v) acc[r][v] = dpbusd(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int i = i0 + r;
    const __m512 rm = _mm512_set1_ps(p.row_mul[i]);
    for (int v = 0; v < 4; ++v) {
      __m512i x = _mm512_add_epi32(acc[r][v], _mm512_loadu_si512(p.col_c + 16 * v));
      if (p.zero_points) {
        x = _mm512_add_epi32(x, _mm512_mullo_epi32(_mm512_set1_epi32(p.row_a[i]),
                                                   _mm512_loadu_si512(p.col_zk + 16 * v)));
        x = _mm512_add_epi32(x, _mm512_mullo_epi32(_mm512_set1_epi32(p.row_zq[i]),
                                                   _mm512_loadu_si512(p.col_ek + 16 * v)));
      }
      const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(x), rm),
                                     _mm512_loadu_ps(p.col_mul + 16 * v));
      _mm512_storeu_ps(S + i * kBN + 16 * v, f);
    }
  }
}

FQ_AVX512 void qk_int8_scores_avx512(const uint8_t* qu, int64_t ldq, int m, int dk, const int8_t* kp,
                                     const IntScoreParams& p, float* S) {
  int i0 = 0;
  for (; i0 + 6 <= m; i0 += 6) qk_int8_rows<6>(qu, ldq, dk, kp, p, i0, S);
  switch (m - i0) {
    case 5: qk_int8_rows<5>(qu, ldq, dk, kp, p, i0, S); break;
    case 4: qk_int8_rows<4>(qu, ldq, dk, kp, p, i0, S); break;
    case 3: qk_int8_rows<3>(qu, ldq, dk, kp, p, i0, S); break;
    case 2: qk_int8_rows<2>(qu, ldq, dk, kp, p, i0, S); break;
    case 1: qk_int8_rows<1>(qu, ldq, dk, kp, p, i0, S); break;
    default: break;
  }
}

// ---- exp -----------------------------------------------------------------------------
// e^x = 2^n · e^r with n = round(x·log2 e), r = x - n·ln2 (two-part ln2, |r| ≤ ln2/2) and a
// degree-7 Taylor polynomial for e^r (truncation error < 1e-8 relative). vscalefps
// applies 2^n and flushes to 0 below the fp32 range; x is clamped at -120 first so that
// exp(-inf) gives exactly 0 instead of NaN. NaN stays NaN: vmaxps returns its second
// operand when either is NaN, so x goes second (x first made a NaN score P = 0).
FQ_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-120.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

FQ_AVX512 void exp_inplace_avx512(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(x + i, exp512(_mm512_loadu_ps(x + i)));
}

FQ_AVX512 void softmax_update_avx512(float* S, int m, float* mrow, float* lrow, float* O, int64_t ldo,
                                     int dp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  // Pass 1: new row maxima, then all rescale factors e^(m_old - m_new) at once (16 rows
  // per exp512) instead of a scalar exp per row.
  alignas(64) float m_new[kBM + 16];
  alignas(64) float corr[kBM + 16];
  for (int i = 0; i < m; ++i) {
    const float* s = S + i * kBN;
    const __m512 x0 = _mm512_loadu_ps(s), x1 = _mm512_loadu_ps(s + 16);
    const __m512 x2 = _mm512_loadu_ps(s + 32), x3 = _mm512_loadu_ps(s + 48);
    const __m512 mx4 = _mm512_max_ps(_mm512_max_ps(x0, x1), _mm512_max_ps(x2, x3));
    // vmaxps drops NaN: an unordered compare of each pair finds NaN lanes.
    const __mmask16 nan = _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x2, x3, _CMP_UNORD_Q);
    const float mx = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx4);
    m_new[i] = max_keep_nan(mrow[i], mx);
  }
  const __m512 vninf = _mm512_set1_ps(ninf);
  for (int i = 0; i < m; i += 16) {
    const __mmask16 live = m - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m - i)) - 1);
    const __m512 mo = _mm512_maskz_loadu_ps(live, mrow + i);
    const __m512 mn = _mm512_maskz_loadu_ps(live, m_new + i);
    // Rows still at -inf would give (-inf) - (-inf) = NaN: use 0 there (factor unused).
    const __mmask16 dead = _mm512_cmp_ps_mask(mn, vninf, _CMP_EQ_OQ);
    const __m512 diff = _mm512_mask_blend_ps(dead, _mm512_sub_ps(mo, mn), _mm512_setzero_ps());
    _mm512_store_ps(corr + i, exp512(diff));
  }
  // Pass 2: P = e^(S - m_new), row sums, rescale of the output rows.
  for (int i = 0; i < m; ++i) {
    float* s = S + i * kBN;
    if (m_new[i] == ninf) {
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + 16 * c, _mm512_setzero_ps());
      continue;
    }
    const __m512 mv = _mm512_set1_ps(m_new[i]);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * c), mv));
      _mm512_storeu_ps(s + 16 * c, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float cf = corr[i];
    lrow[i] = lrow[i] * cf + _mm512_reduce_add_ps(sum);
    mrow[i] = m_new[i];
    if (cf != 1.f) {
      float* o = O + i * ldo;
      const __m512 cv = _mm512_set1_ps(cf);
      for (int d = 0; d < dp; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), cv));
    }
  }
}

}  // namespace

const TileOps* avx512_tile_ops() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vnni");
  static const TileOps ops = {&gemm_f32_avx512, &qk_int8_scores_avx512, &exp_inplace_avx512,
                              &softmax_update_avx512, "avx512_vnni"};
  return ok ? &ops : nullptr;
}

}  // namespace cpu
}  // namespace flash_quant

#else  // not x86-64: no AVX-512 set

namespace flash_quant {
namespace cpu {
const TileOps* avx512_tile_ops() { return nullptr; }
}  // namespace cpu
}  // namespace flash_quant

#endif
