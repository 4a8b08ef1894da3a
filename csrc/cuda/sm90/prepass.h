// The accurate preset's quantization pre-pass for the Hopper forward, launched from C++
// (defined in prepass.cu; no torch here, like fwd_sm90.cu). It produces exactly the
// operands flash_quant.attention's quantize steps make for config="accurate" (docs/op_contract.md):
// Q and K Hadamard-rotated along the head dim, K centred by the rotated median of its block
// means (flash_quant.key_stats.robust_center), both INT8 per token, symmetric, scale =
// absmax / 127, codes round-half-even. Three kernels: K block means, the centre, the codes.
// The fast preset adds V: INT8 per channel, symmetric (scale = absmax over the keys / 127),
// stored K-major (tokens contiguous) for the forward's INT8 P·V: its block absmax rides
// along the means kernel, the scale along the centre kernel, the codes are a fourth kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "fwd_params.h"

namespace flash_quant_sm90 {

//: key_stats.CENTER_BLOCKS: the centre is the median of about this many block means.
constexpr int kCenterBlocks = 32;
//: The most blocks robust_center's rule makes (S < 64: one key a block, S blocks).
constexpr int kMaxCenterBlocks = 2 * kCenterBlocks - 1;

struct PrepassParams {
  // Inputs: (B, H, S, kHeadDim) 16-bit (in_type), unit channel stride; element strides
  // (batch, head, row), each a multiple of 8 (16-byte rows: vector loads).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;  // read only when nonfinite is set (causal calls)
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0;
  OutType in_type = OutType::kBFloat16;
  // Outputs, contiguous: q_data (B, Hq, Sq, D) int8, q_scale (B, Hq, Sq); k_data, k_scale
  // likewise over (B, Hkv, Skv). q_data null: Q is not quantized here (the forward does it,
  // Sm90FwdParams::quantize_q), and q_scale / q_center_dot are unused.
  int8_t* q_data = nullptr;
  float* q_scale = nullptr;
  int8_t* k_data = nullptr;
  float* k_scale = nullptr;
  // (B, Hkv, D) float32: the centre before rotation (what the codes kernel subtracts; the
  // forward's in-kernel Q takes q · centre from it). The rotated centre, k_mean, is not
  // made: q · k_mean equals q · centre before the rotation (orthonormal).
  float* k_center = nullptr;
  // (B, Hq, Sq) float32: q_i · k_mean from the unquantized q, for the forward's lse
  // (Sm90FwdParams::lse_shift).
  float* q_center_dot = nullptr;
  // Workspace (B * Hkv, center_blocks, D) float32: the block means.
  float* block_means = nullptr;
  // (B, Hq) int32, zeroed by the caller, or null: set to 1 for each head whose K or V holds
  // an inf / NaN (or sums past float32's range), which turns the forward's causal tile skip off.
  int32_t* nonfinite = nullptr;
  // The fast preset's V, or null (accurate preset): v_data (B, Hkv, D, v_keys_padded) int8,
  // K-major, each 16 tokens in the forward's order (Sm90FwdParams::v_keys_permuted), keys
  // past kv_len hold code 0; v_scale (B, Hkv, D) float32 (NaN for a channel
  // with an inf / NaN: its output column is NaN, as 0 · NaN is in SDPA); v_block_amax
  // workspace (B * Hkv, center_blocks, D) float32.
  int8_t* v_data = nullptr;
  int64_t v_keys_padded = 0;
  float* v_scale = nullptr;
  float* v_block_amax = nullptr;
};

//: The K-major V buffer's key dim is padded to a multiple of this (flash_quant/layout.py
//: CUDA_KMAJOR_ALIGN: 16-byte rows for TMA).
constexpr int kVKeysAlign = 16;

// robust_center's blocks of S keys: (keys per block, number of blocks).
inline void center_blocks(int kv_len, int* rows_per_block, int* blocks) {
  const int bs = kv_len / kCenterBlocks > 1 ? kv_len / kCenterBlocks : 1;
  const int full = kv_len / bs;
  *rows_per_block = bs;
  *blocks = full + (full * bs < kv_len ? 1 : 0);
}

// Launches the three pre-pass kernels on `stream`. Throws std::runtime_error when a launch fails.
void launch_prepass(const PrepassParams& p, cudaStream_t stream);

}  // namespace flash_quant_sm90
