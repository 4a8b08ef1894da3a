// Tile-level compute primitives of the CPU attention kernels, selected once at runtime:
// AVX-512 + VNNI implementations (tile_ops_avx512.cpp) when the CPU has them, else AVX2 +
// FMA ones (tile_ops_avx2.cpp), else portable loops (tile_ops_generic.cpp). Each call does a whole tile (64 keys × up to
// 64 queries), so the indirect call costs nothing next to the work inside it.
#pragma once

#include <cstdint>

namespace flash_quant {
namespace cpu {

// Keys per tile. The packed K layouts below and the score tiles are kBN wide.
constexpr int kBN = 64;
// Queries per tile.
constexpr int kBM = 64;

// max(a, b) that returns NaN when either is NaN. std::max and vmaxps return one operand
// unchanged when the other is NaN, so a running max built from them silently drops a NaN
// score (a NaN key, a NaN mask entry) or a NaN query row's scores; every softmax row max
// of the kernels goes through this rule instead (docs/op_contract.md, "Non-finite values").
inline float max_keep_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// Per-row / per-key terms that turn the raw u8·s8 dot products of an INT8 score tile
// into fp32 scores (see attention_forward_cpu.cpp for the algebra):
//   int_ij = acc_ij + col_c[j] + row_a[i] * col_zk[j] + row_zq[i] * col_ek[j]
//   S_ij   = float(int_ij) * row_mul[i] * col_mul[j]
// The zero-point products are skipped when `zero_points` is false.
struct IntScoreParams {
  const float* row_mul;
  const int32_t* row_a;
  const int32_t* row_zq;
  const float* col_mul;
  const int32_t* col_c;
  const int32_t* col_zk;
  const int32_t* col_ek;
  bool zero_points;
};

struct TileOps {
  // C[m × n] = alpha · A[m × kdim] · B[kdim × n]  (+ C when accumulate).
  // Row strides lda / ldb / ldc in floats; n is a multiple of 16.
  void (*gemm_f32)(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                   int m, int n, int kdim, float alpha, bool accumulate);
  // S[m × kBN] (row stride kBN) from qu (m rows of dk bytes, row stride ldq, values
  // q + 128 as uint8) and kp (one key tile packed as [dk/4][kBN][4] int8): the raw sum
  // acc_ij = Σ_d qu[i][d] · k[j][d], then the IntScoreParams epilogue. dk % 4 == 0 and
  // dk <= 256 (the attention ops' head-dim limit).
  void (*qk_int8_scores)(const uint8_t* qu, int64_t ldq, int m, int dk, const int8_t* kp,
                         const IntScoreParams& p, float* S);
  // x[0..n) <- exp(x); n % 16 == 0; exp(-inf) = 0, exp(NaN) = NaN.
  void (*exp_inplace)(float* x, int64_t n);
  // Online-softmax step on a score tile S[m × kBN] (masked entries = -inf): per row,
  // m_new = max(m, max_j S), S <- exp(S - m_new) (the tile's P), l <- l·e^(m-m_new) + Σ P,
  // O row (dp floats, stride ldo) <- O · e^(m-m_new). Rows still at -inf get P = 0.
  // NaN propagates as in IEEE arithmetic: a NaN score makes the row max NaN (max_keep_nan),
  // and exp(NaN) is NaN, so the row's P, l, m and O all become NaN.
  void (*softmax_update)(float* S, int m, float* mrow, float* lrow, float* O, int64_t ldo, int dp);
  const char* name;
};

const TileOps& generic_tile_ops();
// nullptr when not built for x86-64 or when the CPU lacks AVX-512F/BW/VL/VNNI.
const TileOps* avx512_tile_ops();
// nullptr when not built for x86-64 or when the CPU lacks AVX2 / FMA.
const TileOps* avx2_tile_ops();
// The best available set (avx512, else avx2, else generic). FLASH_QUANT_CPU_ISA=generic
// forces the portable set and =avx2 skips AVX-512 (the tests compare them).
const TileOps& tile_ops();

}  // namespace cpu
}  // namespace flash_quant
