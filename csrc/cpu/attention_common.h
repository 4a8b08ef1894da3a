// Shape checks and fp32 panel packing shared by the CPU attention forward and backward.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "cpu/operand.h"
#include "cpu/tile_ops.h"

namespace flash_quant {
namespace cpu {

struct AttnDims {
  int64_t B, Hq, Hkv, Sq, Skv, D;
  int64_t Dp;       // D rounded up to 16 (a whole number of zmm registers)
  int64_t group;    // Hq / Hkv: query heads per kv head
  int64_t nqb;      // query tiles of kBM
  int64_t nkb;      // key tiles of kBN
  int64_t Skv_pad;  // nkb * kBN
};

// Checks q (B, Hq, Sq, D), k / v (B, Hkv, Skv, D), dtypes, head dim and Hq % Hkv.
AttnDims check_attention_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const char* op);

// k_mean expanded to (B, Hkv, 1, D) (float32), or an undefined tensor when absent.
at::Tensor expand_k_mean(const std::optional<at::Tensor>& k_mean, const AttnDims& dims);

// Rows of operand (b, h) as fp32 into dst[S_pad][Dp] (padding rows / channels = 0).
void pack_rows_f32(const Operand& op, int64_t b, int64_t h, int64_t S, int64_t S_pad, int64_t Dp,
                   float* dst);

// The same rows transposed per key tile: dst[S_pad / kBN][D][kBN] (padding keys = 0),
// the B operand of a Q·Kᵀ (or dO·Vᵀ) tile product.
void pack_transposed_f32(const Operand& op, int64_t b, int64_t h, int64_t S, int64_t S_pad,
                         float* dst);

// -inf for keys j0 + j >= Skv (padding, not keys: assigned) and, when causal, -inf added
// to keys after the query row (as SDPA's additive causal mask: NaN / +inf scores stay NaN).
void mask_bounds_and_causal(float* S, int rows, int64_t i0, int64_t j0, int64_t Skv, bool causal);

// Whether x[0..n) are all finite (no inf, no NaN). Vectorisable integer OR of compares.
bool all_finite(const float* x, int64_t n);

// Whether the attention mask has an entry that no causal -inf can hide (NaN or +inf in a
// float mask): such an entry makes its row NaN even where the causal mask covers it.
bool mask_has_nan_or_posinf(const std::optional<at::Tensor>& attn_mask);

}  // namespace cpu
}  // namespace flash_quant
