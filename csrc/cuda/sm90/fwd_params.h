// Arguments of the sm90 (Hopper) forward kernel: plain C++, no torch and no CUDA types,
// so the kernel file compiles on its own (the CI SASS check builds exactly that file).
#pragma once
#include <cstdint>

namespace flash_quant_sm90 {

//: The kernel's tile shape (docs/hopper.md): each consumer warpgroup owns
//: kRowsPerWarpgroup query rows; keys go in tiles of kKeysPerTile.
constexpr int kHeadDim = 128;  // the fused pre-pass's (prepass.h); the forward takes more
//: The tile head dims the forward kernel is instantiated for. A call's head dim D runs in
//: the smallest tile >= D (tile_head_dim): the tensor maps' boxes are the tile's width and
//: TMA fills channels D .. tile-1 with zeros, which add nothing to Q·Kᵀ and give output
//: channels that are not stored (the padded channels are computed all the same).
constexpr int kForwardHeadDims[] = {64, 128};
//: D must be a multiple of this: Q / K codes are rows of D bytes, and TMA wants every
//: stride a multiple of 16 bytes.
constexpr int kHeadDimGranule = 16;
//: The largest head dim the forward takes (the last, widest tile).
constexpr int kMaxTileHeadDim = kForwardHeadDims[sizeof(kForwardHeadDims) / sizeof(kForwardHeadDims[0]) - 1];
//: The tile head dim that serves head dim d, or 0 where none does.
constexpr int tile_head_dim(int64_t d) {
  if (d < kHeadDimGranule || d % kHeadDimGranule != 0) return 0;
  for (const int tile : kForwardHeadDims) {
    if (d <= tile) return tile;
  }
  return 0;
}
constexpr int kRowsPerWarpgroup = 64;
constexpr int kKeysPerTile = 128;
//: Consumer warpgroups a CTA, by P·V precision. 16-bit P·V: two, sharing each K / V tile
//: (128 query rows, one CTA an SM). INT8 P·V: one (64 rows, two CTAs an SM): its
//: warpgroup's chain (P·V wait, fold, Q·Kᵀ wait, softmax) is serial, and two independent
//: CTAs overlap it better than two warpgroups on shared barriers (session 6, H100: 7 %
//: faster kernel-only at 1x24x4608 and 4x32x4096; 5-8 % slower for 16-bit P·V).
constexpr int consumer_warpgroups(bool pv_int8) { return pv_int8 ? 1 : 2; }
constexpr int rows_per_cta(bool pv_int8) { return kRowsPerWarpgroup * consumer_warpgroups(pv_int8); }

//: Tokens a group of the permuted INT8 V^T (Sm90FwdParams::v_keys_permuted): one half of a
//: k32 step of the INT8 P·V wgmma.
constexpr int kVPermutedGroup = 16;

enum class OutType : int { kFloat16 = 0, kBFloat16 = 1 };

struct Sm90FwdParams {
  // Operands. q, k: int8 codes, rows of head_dim contiguous bytes (q: 16-bit values of
  // out_type when quantize_q). v: int8 codes stored
  // K-major (tokens contiguous; v_row_stride = distance between channels) when pv_int8,
  // else 16-bit values (rows of head_dim contiguous elements) of out_type.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Element strides (batch, head, row) of q, k and v; for a K-major v, "row" is the
  // channel stride and tokens are contiguous.
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  // Scales, contiguous float32: q_scale (B, Hq, Sq), k_scale (B, Hkv, Skv), v_scale
  // (B, Hkv, D) per channel (pv_int8 only). k_mean (B, Hkv, D) or null: the smoothing
  // mean, added back into the lse only. nonfinite (B, Hq) int32 or null: 1 where a head
  // may hold an inf / NaN in v, which turns causal tile skipping off (docs/op_contract.md).
  const float* q_scale = nullptr;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  const float* k_mean = nullptr;
  // (B, Hq, Sq) float32 or null: q_i · k_mean of the unquantized q (the fused pre-pass
  // computes it); when set, the lse adds softmax_scale times it instead of the product
  // from q's codes, whose rounding a large K centre magnifies.
  const float* lse_shift = nullptr;
  // Q arrives 16-bit and the kernel quantizes it as the accurate preset's pre-pass does
  // (rotated, INT8 per row; row_quant.cuh) and takes q · k_mean from the float values as
  // q · k_center (the centre before rotation, (B, Hkv, D) float32): head dim 128, k_center
  // set; q_scale, lse_shift and k_mean unused.
  bool quantize_q = false;
  const float* k_center = nullptr;
  const int32_t* nonfinite = nullptr;
  // Outputs, contiguous: out (B, Hq, Sq, D) of out_type, lse (B, Hq, Sq) float32.
  void* out = nullptr;
  float* lse = nullptr;
  int batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0;
  int head_dim = kHeadDim;  // the tensors' D (tile_head_dim(D) != 0)
  float softmax_scale = 0.f;
  OutType out_type = OutType::kBFloat16;
  bool pv_int8 = false;
  // pv_int8: v's tokens are stored, within each group of kVPermutedGroup, in the order the
  // kernel's P codes come in (the fused pre-pass's V codes; prepass.cu v_token_slot),
  // so that P needs no shuffle into the wgmma A operand (the buffer then holds the last group
  // whole, past kv_len: its padding); false: in token order.
  bool v_keys_permuted = false;
  bool causal = false;
};

}  // namespace flash_quant_sm90
