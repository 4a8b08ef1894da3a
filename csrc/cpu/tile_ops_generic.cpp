// Portable implementations of the tile primitives (plain loops the compiler may
// auto-vectorise for the baseline ISA), and the runtime choice between them and the
// AVX-512 and AVX2 sets.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "cpu/tile_ops.h"

namespace flash_quant {
namespace cpu {
namespace {

void gemm_f32_generic(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                      int m, int n, int kdim, float alpha, bool accumulate) {
  float acc[256];  // n <= 256 (head dim or kBN)
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) acc[j] = 0.f;
    for (int k = 0; k < kdim; ++k) {
      const float a = A[i * lda + k];
      const float* b = B + k * ldb;
      for (int j = 0; j < n; ++j) acc[j] += a * b[j];
    }
    float* c = C + i * ldc;
    for (int j = 0; j < n; ++j) c[j] = (accumulate ? c[j] : 0.f) + alpha * acc[j];
  }
}

void qk_int8_scores_generic(const uint8_t* qu, int64_t ldq, int m, int dk, const int8_t* kp,
                            const IntScoreParams& p, float* S) {
  for (int i = 0; i < m; ++i) {
    int32_t acc[kBN] = {0};
    const uint8_t* q = qu + i * ldq;
    for (int t = 0; t < dk / 4; ++t) {
      const int8_t* kt = kp + t * kBN * 4;
      for (int j = 0; j < kBN; ++j)
        for (int c = 0; c < 4; ++c) acc[j] += int32_t(q[4 * t + c]) * int32_t(kt[4 * j + c]);
    }
    for (int j = 0; j < kBN; ++j) {
      int32_t v = acc[j] + p.col_c[j];
      if (p.zero_points) v += p.row_a[i] * p.col_zk[j] + p.row_zq[i] * p.col_ek[j];
      S[i * kBN + j] = float(v) * p.row_mul[i] * p.col_mul[j];
    }
  }
}

void exp_inplace_generic(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

void softmax_update_generic(float* S, int m, float* mrow, float* lrow, float* O, int64_t ldo, int dp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < m; ++i) {
    float* s = S + i * kBN;
    float mx = ninf;
    for (int j = 0; j < kBN; ++j) mx = max_keep_nan(mx, s[j]);
    const float m_new = max_keep_nan(mrow[i], mx);
    if (m_new == ninf) {
      std::fill(s, s + kBN, 0.f);
      continue;
    }
    const float corr = std::exp(mrow[i] - m_new);
    float sum = 0.f;
    for (int j = 0; j < kBN; ++j) {
      s[j] = std::exp(s[j] - m_new);
      sum += s[j];
    }
    lrow[i] = lrow[i] * corr + sum;
    mrow[i] = m_new;
    if (corr != 1.f) {
      float* o = O + i * ldo;
      for (int d = 0; d < dp; ++d) o[d] *= corr;
    }
  }
}

}  // namespace

const TileOps& generic_tile_ops() {
  static const TileOps ops = {&gemm_f32_generic, &qk_int8_scores_generic, &exp_inplace_generic,
                              &softmax_update_generic, "generic"};
  return ops;
}

const TileOps& tile_ops() {
  static const TileOps* chosen = [] {
    const char* force = std::getenv("FLASH_QUANT_CPU_ISA");
    if (force != nullptr && std::strcmp(force, "generic") == 0) return &generic_tile_ops();
    const bool avx2_only = force != nullptr && std::strcmp(force, "avx2") == 0;
    for (const TileOps* ops : {avx2_only ? nullptr : avx512_tile_ops(), avx2_tile_ops()})
      if (ops != nullptr) return ops;
    return &generic_tile_ops();
  }();
  return *chosen;
}

}  // namespace cpu
}  // namespace flash_quant
