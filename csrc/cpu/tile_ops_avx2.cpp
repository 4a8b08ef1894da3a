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
// Register block of R rows × 16 columns (two ymm of B per k, each reused by R rows):
// 2R ≤ 12 accumulators + 2 B + 1 broadcast fit the 16 ymm registers.
template <int R>
FQ_AVX2 void gemm_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                        int kdim, float alpha, bool accumulate) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int k = 0; k < kdim; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb);
    const __m256 b1 = _mm256_loadu_ps(B + k * ldb + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) {
      float* c = C + r * ldc + 8 * v;
      __m256 res = _mm256_mul_ps(acc[r][v], va);
      if (accumulate) res = _mm256_add_ps(_mm256_loadu_ps(c), res);
      _mm256_storeu_ps(c, res);
    }
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
template <int R>
FQ_AVX2 void qk_int8_rows(const uint8_t* qu, int64_t ldq, int dk, const int16_t* kw, const IntScoreParams& p,
                          int i0, float* S) {
  for (int kc = 0; kc < kBN; kc += 16) {  // 16 keys: 4 vectors of 4 keys × 2 lanes
    __m256i acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_si256();
    for (int t = 0; t < dk / 4; ++t) {
      __m256i a[R];
      for (int r = 0; r < R; ++r) {
        int32_t word;
        std::memcpy(&word, qu + (i0 + r) * ldq + 4 * t, 4);
        a[r] = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(word)));
      }
      const int16_t* kt = kw + (t * kBN + kc) * 4;
      for (int v = 0; v < 4; ++v) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kt + 16 * v));
        for (int r = 0; r < R; ++r) acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(a[r], b));
      }
    }
    for (int r = 0; r < R; ++r) {
      const int i = i0 + r;
      const __m256 rm = _mm256_set1_ps(p.row_mul[i]);
      for (int h = 0; h < 2; ++h) {  // keys kc + 8h .. kc + 8h + 7
        __m256i x = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][2 * h], acc[r][2 * h + 1]), 0xD8);
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
  }
}

FQ_AVX2 void qk_int8_scores_avx2(const uint8_t* qu, int64_t ldq, int m, int dk, const int8_t* kp,
                                 const IntScoreParams& p, float* S) {
  alignas(32) int16_t kw[256 * kBN];  // dk <= 256: the widened key tile (32 KiB at most)
  for (int e = 0; e < dk * kBN; e += 16)
    _mm256_store_si256(reinterpret_cast<__m256i*>(kw + e),
                       _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kp + e))));
  int i0 = 0;
  for (; i0 + 3 <= m; i0 += 3) qk_int8_rows<3>(qu, ldq, dk, kw, p, i0, S);
  if (m - i0 == 2) qk_int8_rows<2>(qu, ldq, dk, kw, p, i0, S);
  if (m - i0 == 1) qk_int8_rows<1>(qu, ldq, dk, kw, p, i0, S);
}

// ---- exp -----------------------------------------------------------------------------
// As exp512 in tile_ops_avx512.cpp (n = round(x·log2 e), two-part ln2, degree-7 Taylor
// polynomial), with 2^n built in the exponent bits: AVX2 has no vscalefps. Arguments
// below -87 (e^x under the smallest normal fp32) give exactly 0, -inf included.
FQ_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.f));
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
    __m256 mx = _mm256_loadu_ps(s);
    for (int c = 8; c < kBN; c += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + c));
    const float tile_max = hmax8(mx);
    m_new[i] = mrow[i] > tile_max ? mrow[i] : tile_max;
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
