// AVX2 + FMA implementations of the tile primitives of tile_ops.h, for x86-64 CPUs
// without AVX-512 VNNI (most desktops and laptops, and this repository's CI machine):
// there the portable loops ran the INT8 forward at 0.17x the speed of PyTorch's fp32 SDPA.
//
// As in tile_ops_avx512.cpp, every function carries a `target` attribute (FQ_AVX2) instead
// of the file being built with -mavx2, so the extension loads on any x86-64 and these are
// only reached after __builtin_cpu_supports("avx2") and ("fma").
#include "cpu/tile_ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cstring>
#include <limits>

#define FQ_AVX2 __attribute__((target("avx2,fma")))

namespace flash_quant {
namespace cpu {
namespace {

FQ_AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

FQ_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// ---- fp32 GEMM: C = alpha·A·B (+C) -----------------------------------------------
// Register block of R ≤ 6 rows × 16 columns (two ymm of B per k, each reused by R rows):
// 2R ≤ 12 accumulators + 2 B + 1 broadcast fit the 16 ymm registers. The accumulators are
// named variables, not an array: GCC 12 kept an array's elements in registers but also
// stored every one of them to the stack after each FMA (12 stores per k, measured 2x slower).
FQ_AVX2 inline void row_fma(const float* A, int k, __m256 b0, __m256 b1, __m256& c0, __m256& c1) {
  const __m256 a = _mm256_broadcast_ss(A + k);
  c0 = _mm256_fmadd_ps(a, b0, c0);
  c1 = _mm256_fmadd_ps(a, b1, c1);
}

FQ_AVX2 inline void store_row(float* c, __m256 v0, __m256 v1, __m256 va, bool accumulate) {
  v0 = _mm256_mul_ps(v0, va);
  v1 = _mm256_mul_ps(v1, va);
  if (accumulate) {
    v0 = _mm256_add_ps(_mm256_loadu_ps(c), v0);
    v1 = _mm256_add_ps(_mm256_loadu_ps(c + 8), v1);
  }
  _mm256_storeu_ps(c, v0);
  _mm256_storeu_ps(c + 8, v1);
}

template <int R>
FQ_AVX2 void gemm_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                        int kdim, float alpha, bool accumulate) {
  static_assert(R >= 1 && R <= 6, "row block of 1..6");
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int k = 0; k < kdim; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb);
    const __m256 b1 = _mm256_loadu_ps(B + k * ldb + 8);
    row_fma(A, k, b0, b1, c00, c01);
    if constexpr (R > 1) row_fma(A + lda, k, b0, b1, c10, c11);
    if constexpr (R > 2) row_fma(A + 2 * lda, k, b0, b1, c20, c21);
    if constexpr (R > 3) row_fma(A + 3 * lda, k, b0, b1, c30, c31);
    if constexpr (R > 4) row_fma(A + 4 * lda, k, b0, b1, c40, c41);
    if constexpr (R > 5) row_fma(A + 5 * lda, k, b0, b1, c50, c51);
  }
  const __m256 va = _mm256_set1_ps(alpha);
  store_row(C, c00, c01, va, accumulate);
  if constexpr (R > 1) store_row(C + ldc, c10, c11, va, accumulate);
  if constexpr (R > 2) store_row(C + 2 * ldc, c20, c21, va, accumulate);
  if constexpr (R > 3) store_row(C + 3 * ldc, c30, c31, va, accumulate);
  if constexpr (R > 4) store_row(C + 4 * ldc, c40, c41, va, accumulate);
  if constexpr (R > 5) store_row(C + 5 * ldc, c50, c51, va, accumulate);
}

using GemmBlockFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, float, bool);
constexpr int kGemmRows = 6;

FQ_AVX2 void gemm_f32_avx2(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                           int m, int n, int kdim, float alpha, bool accumulate) {
  static const GemmBlockFn table[kGemmRows] = {&gemm_block<1>, &gemm_block<2>, &gemm_block<3>,
                                               &gemm_block<4>, &gemm_block<5>, &gemm_block<6>};
  for (int n0 = 0; n0 < n; n0 += 16) {
    for (int i0 = 0; i0 < m; i0 += kGemmRows) {
      const int r = (m - i0) < kGemmRows ? (m - i0) : kGemmRows;
      table[r - 1](A + i0 * lda, lda, B + n0, ldb, C + i0 * ldc + n0, ldc, kdim, alpha, accumulate);
    }
  }
}

// ---- INT8 scores with vpmaddwd ---------------------------------------------------------
// AVX2 has no u8·s8 dot product into 32 bits (vpmaddubsw saturates its 16-bit pair sums at
// these magnitudes), so both operands are widened to 16 bits and vpmaddwd sums pairs of
// 16x16-bit products in 32-bit lanes — exact. The key tile ([dk/4][64 keys][4] int8) is
// widened once per call; one 16-bit load then holds 4 keys × 4 channels, and the 4 query
// values (q + 128, zero-extended) broadcast to every 64-bit lane pair with it. Each key
// ends in two adjacent lanes, added once at the end (hadd + a 64-bit permute).
// Row r's 16 scores of one key chunk: 4 accumulators (4 keys × 2 lanes each) to fp32.
FQ_AVX2 inline void int_scores_row(__m256i a0, __m256i a1, __m256i a2, __m256i a3, const IntScoreParams& p, int i,
                                   int kc, float* S) {
  const __m256 rm = _mm256_set1_ps(p.row_mul[i]);
  const __m256i pairs[2][2] = {{a0, a1}, {a2, a3}};
  for (int h = 0; h < 2; ++h) {  // keys kc + 8h .. kc + 8h + 7
    __m256i x = _mm256_permute4x64_epi64(_mm256_hadd_epi32(pairs[h][0], pairs[h][1]), 0xD8);
    const int j = kc + 8 * h;
    x = _mm256_add_epi32(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.col_c + j)));
    if (p.zero_points) {
      x = _mm256_add_epi32(x, _mm256_mullo_epi32(_mm256_set1_epi32(p.row_a[i]),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.col_zk + j))));
      x = _mm256_add_epi32(x, _mm256_mullo_epi32(_mm256_set1_epi32(p.row_zq[i]),
                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.col_ek + j))));
    }
    const __m256 f = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(x), rm), _mm256_loadu_ps(p.col_mul + j));
    _mm256_storeu_ps(S + i * kBN + j, f);
  }
}

FQ_AVX2 inline __m256i query_quad(const uint8_t* q) {  // 4 query bytes -> 4 int16, in every 64-bit lane
  int32_t word;
  std::memcpy(&word, q, 4);
  return _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(word)));
}

// R (1 or 2) rows × 16 keys per pass; named accumulators (see gemm_block on arrays).
template <int R>
FQ_AVX2 void qk_int8_rows(const uint8_t* qu, int64_t ldq, int dk, const int16_t* kw, const IntScoreParams& p,
                          int i0, float* S) {
  static_assert(R == 1 || R == 2, "row block of 1 or 2");
  const uint8_t* q0 = qu + i0 * ldq;
  const uint8_t* q1 = q0 + ldq;
  for (int kc = 0; kc < kBN; kc += 16) {  // 16 keys: 4 vectors of 4 keys × 2 lanes
    __m256i r00 = _mm256_setzero_si256(), r01 = r00, r02 = r00, r03 = r00;
    __m256i r10 = r00, r11 = r00, r12 = r00, r13 = r00;
    for (int t = 0; t < dk / 4; ++t) {
      const __m256i* kt = reinterpret_cast<const __m256i*>(kw + (t * kBN + kc) * 4);
      const __m256i b0 = _mm256_loadu_si256(kt), b1 = _mm256_loadu_si256(kt + 1);
      const __m256i b2 = _mm256_loadu_si256(kt + 2), b3 = _mm256_loadu_si256(kt + 3);
      const __m256i a = query_quad(q0 + 4 * t);
      r00 = _mm256_add_epi32(r00, _mm256_madd_epi16(a, b0));
      r01 = _mm256_add_epi32(r01, _mm256_madd_epi16(a, b1));
      r02 = _mm256_add_epi32(r02, _mm256_madd_epi16(a, b2));
      r03 = _mm256_add_epi32(r03, _mm256_madd_epi16(a, b3));
      if constexpr (R == 2) {
        const __m256i c = query_quad(q1 + 4 * t);
        r10 = _mm256_add_epi32(r10, _mm256_madd_epi16(c, b0));
        r11 = _mm256_add_epi32(r11, _mm256_madd_epi16(c, b1));
        r12 = _mm256_add_epi32(r12, _mm256_madd_epi16(c, b2));
        r13 = _mm256_add_epi32(r13, _mm256_madd_epi16(c, b3));
      }
    }
    int_scores_row(r00, r01, r02, r03, p, i0, kc, S);
    if constexpr (R == 2) int_scores_row(r10, r11, r12, r13, p, i0 + 1, kc, S);
  }
}

FQ_AVX2 void qk_int8_scores_avx2(const uint8_t* qu, int64_t ldq, int m, int dk, const int8_t* kp,
                                 const IntScoreParams& p, float* S) {
  alignas(32) int16_t kw[256 * kBN];  // dk <= 256: the widened key tile (32 KiB at most)
  for (int e = 0; e < dk * kBN; e += 16)
    _mm256_store_si256(reinterpret_cast<__m256i*>(kw + e),
                       _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kp + e))));
  int i0 = 0;
  for (; i0 + 2 <= m; i0 += 2) qk_int8_rows<2>(qu, ldq, dk, kw, p, i0, S);
  if (i0 < m) qk_int8_rows<1>(qu, ldq, dk, kw, p, i0, S);
}

// ---- exp -----------------------------------------------------------------------------
// As exp512 in tile_ops_avx512.cpp (n = round(x·log2 e), two-part ln2, degree-7 Taylor
// polynomial), with 2^n built in the exponent bits: AVX2 has no vscalefps. Arguments
// below -87 (e^x under the smallest normal fp32) give exactly 0, -inf included. NaN stays
// NaN: vmaxps / vminps return their second operand when either is NaN, so x goes second
// in the clamps (x first turned a NaN score into -87, i.e. P = 0: the NaN key vanished).
FQ_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);
  x = _mm256_min_ps(_mm256_set1_ps(88.f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  // n in [-126, 128): 2^n = (n + 127) << 23 as fp32 bits (n = 128 only for x near 88.7,
  // where e^x overflows anyway; the scores here are <= 0 after the max subtraction)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

FQ_AVX2 void exp_inplace_avx2(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
}

FQ_AVX2 void softmax_update_avx2(float* S, int m, float* mrow, float* lrow, float* O, int64_t ldo, int dp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  // Pass 1: new row maxima, then the rescale factors e^(m_old - m_new), 8 rows per exp256.
  alignas(32) float m_new[kBM + 8];
  alignas(32) float m_old[kBM + 8];
  alignas(32) float corr[kBM + 8];
  for (int i = 0; i < m; ++i) {
    const float* s = S + i * kBN;
    __m256 mx = _mm256_set1_ps(ninf), nan = _mm256_setzero_ps();
    for (int c = 0; c < kBN; c += 16) {
      const __m256 x0 = _mm256_loadu_ps(s + c), x1 = _mm256_loadu_ps(s + c + 8);
      mx = _mm256_max_ps(mx, _mm256_max_ps(x0, x1));
      // vmaxps drops NaN: an unordered compare of each pair finds NaN lanes.
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x0, x1, _CMP_UNORD_Q));
    }
    const float tile_max = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN() : hmax8(mx);
    m_new[i] = max_keep_nan(mrow[i], tile_max);
    m_old[i] = mrow[i];
  }
  for (int i = m; i < ((m + 7) & ~7); ++i) m_new[i] = m_old[i] = 0.f;
  for (int i = 0; i < m; i += 8) {
    const __m256 mn = _mm256_load_ps(m_new + i);
    // Rows still at -inf would give (-inf) - (-inf) = NaN: use 0 there (factor unused).
    const __m256 dead = _mm256_cmp_ps(mn, _mm256_set1_ps(ninf), _CMP_EQ_OQ);
    const __m256 diff = _mm256_andnot_ps(dead, _mm256_sub_ps(_mm256_load_ps(m_old + i), mn));
    _mm256_store_ps(corr + i, exp256(diff));
  }
  // Pass 2: P = e^(S - m_new), row sums, rescale of the output rows.
  for (int i = 0; i < m; ++i) {
    float* s = S + i * kBN;
    if (m_new[i] == ninf) {
      for (int c = 0; c < kBN; c += 8) _mm256_storeu_ps(s + c, _mm256_setzero_ps());
      continue;
    }
    const __m256 mv = _mm256_set1_ps(m_new[i]);
    __m256 sum = _mm256_setzero_ps();
    for (int c = 0; c < kBN; c += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv));
      _mm256_storeu_ps(s + c, e);
      sum = _mm256_add_ps(sum, e);
    }
    const float cf = corr[i];
    lrow[i] = lrow[i] * cf + hsum8(sum);
    mrow[i] = m_new[i];
    if (cf != 1.f) {
      float* o = O + i * ldo;
      const __m256 cv = _mm256_set1_ps(cf);
      for (int d = 0; d < dp; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), cv));
    }
  }
}

}  // namespace

const TileOps* avx2_tile_ops() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const TileOps ops = {&gemm_f32_avx2, &qk_int8_scores_avx2, &exp_inplace_avx2, &softmax_update_avx2,
                              "avx2"};
  return ok ? &ops : nullptr;
}

}  // namespace cpu
}  // namespace flash_quant

#else  // not x86-64: no AVX2 set

namespace flash_quant {
namespace cpu {
const TileOps* avx2_tile_ops() { return nullptr; }
}  // namespace cpu
}  // namespace flash_quant

#endif
