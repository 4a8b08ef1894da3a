// The platform-independent half of the MPS backend: argument checks, output shapes,
// grid and threadgroup sizes, function constants (pipeline keys) and argument packing
// for every Metal kernel launch. No Objective-C, no torch: tensors are described by
// plain structs, so this file builds and is tested on Linux (tests/test_metal_host_logic.py
// compiles it with g++) and drives the Metal emulator (tools/metal_emu/plan_abi.cpp),
// while csrc/mps/ops.mm turns a Plan into encoder calls on PyTorch's MPS stream.
//
// Errors are std::invalid_argument whose message names the offending argument; ops.mm
// rethrows them through TORCH_CHECK.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fq_mps {

enum class Dtype : int32_t { F32, F16, BF16, I8, U8, E4M3, E5M2, Bool, I32, F64, Other };
const char* dtype_name(Dtype d);
int64_t dtype_size(Dtype d);

// A tensor as the kernels see it: dtype, sizes and strides in elements. `defined` is
// false for an absent optional argument.
struct TensorDesc {
  bool defined = false;
  Dtype dtype = Dtype::F32;
  std::vector<int64_t> sizes, strides;
  int64_t numel() const;
  static TensorDesc contiguous(Dtype dtype, std::vector<int64_t> sizes);
};

// Where a launch's buffer slot comes from: an input (index into the op's input list), an
// output / temporary (kOutput + index into Plan::outputs), or nothing (kUnbound: the
// kernel never reads the slot; the host binds any valid buffer there because Metal wants
// every declared buffer argument bound).
constexpr int kOutput = 1000;
constexpr int kUnbound = -1;
struct Binding {
  int slot;
  int source;
};

struct Launch {
  std::string function;
  std::vector<std::pair<int, int32_t>> constants;  // (function-constant index, value)
  uint32_t grid[3] = {1, 1, 1};                    // threadgroups
  uint32_t threads[3] = {1, 1, 1};                 // threads per threadgroup
  uint32_t tg_mem_bytes = 0;                       // threadgroup memory at index 0
  std::vector<Binding> bindings;
  int params_slot = 0;
  std::vector<uint8_t> params;  // bytes for setBytes at params_slot
  // Pipelines are cached by this: function name + function-constant values.
  std::string pipeline_key() const;
};

struct OutputSpec {
  Dtype dtype;
  std::vector<int64_t> sizes;  // allocated contiguous
  bool zero_fill = false;
};

struct Plan {
  std::vector<OutputSpec> outputs;
  std::vector<Launch> launches;  // encoded in order on one stream
};

// ---- attention: inputs in this order (absent optional ones have defined = false)
enum AttnInput {
  kQ, kK, kV,
  kQData, kQScale, kQZp,
  kKData, kKScale, kKZp, kKMean,
  kVData, kVScale, kVZp,
  kMask,
  kGradOut, kOut, kLse,  // backward only
  kNumAttnInputs
};
struct AttnArgs {
  TensorDesc t[kNumAttnInputs];
  bool causal = false;
  bool every_key = false;  // FqAttnParams::every_key: the caller looked at the data
  bool has_scale = false;
  double scale = 0.0;
  std::string pv_precision = "none";
};
// Outputs: out, lse.
Plan plan_attention_forward(const AttnArgs& a);
// Outputs: dq, dk, dv, then the temporaries delta and lse' (B, Hq, Sq) float32.
Plan plan_attention_backward(const AttnArgs& a);

// ---- quantize: input 0 is x, contiguous; input 1 the smoothing centre when given
// (float32, contiguous, x.shape[:-2] + (1, D)): the kernels subtract it instead of the
// mean, and the mean output is then empty (the caller returns the centre as `mean`).
// Outputs: data, scale, zero_point, mean.
struct QuantArgs {
  TensorDesc x;
  TensorDesc center;  // defined: subtract it instead of computing the mean (needs smooth)
  std::string precision, granularity, strategy;
  int64_t block_size = 1;
  bool smooth = false;
};
Plan plan_quantize(const QuantArgs& a);

// ---- quantize_with_scale: inputs 0 x (contiguous), 1 scale, 2 zero_point (may be
// undefined: symmetric). Output: data. Scales index as in dequantize.
struct QuantWithScaleArgs {
  TensorDesc x, scale, zero_point;
  std::string precision;
  int64_t block_size = 1;
};
Plan plan_quantize_with_scale(const QuantWithScaleArgs& a);

// ---- dequantize: inputs 0 data, 1 scale, 2 zero_point, 3 mean. Output: x.
struct DequantArgs {
  TensorDesc data, scale, zero_point, mean;
  std::string precision;
  int64_t block_size = 1;
  Dtype dtype = Dtype::F32;
};
Plan plan_dequantize(const DequantArgs& a);

// ---- decode_attention (csrc/schema.cpp) over a flash_quant.QuantizedKVCache's buffers
// (layout: flash_quant/kv_cache.py's docstring); inputs in the schema's order.
// * "int8": k_codes / v_codes (B, Hkv, L, D) int8, k_scale / v_scale (B, Hkv, L) float32
//   (one per token), k_smooth (B, Hkv, D) float32 (the stored keys are k / smooth: the
//   kernel multiplies q by it); every token is coded.
// * "int4": codes (B, Hkv, T, D / 2) uint8, two unsigned nibbles, channel i low and
//   i + D/2 high (FQ_U4_SPLIT); K per channel over groups of k_group tokens (k_scale /
//   k_zero (B, Hkv, groups, D) float16; value = code * scale + zero), its newest
//   length % k_group tokens in k_window (B, Hkv, k_group, D); V per token over groups of
//   v_group channels (v_scale / v_zero (B, Hkv, L, D / v_group)).
// length: int32 (1,), read by the kernel on the device (no host sync), so the plan
// depends only on the capacity L = v_codes.size(2) and the checks hold for any length
// <= L; the Python caller checks the mask against the host-side length.
enum DecodeInput {
  kDecQ,
  kDecKCodes, kDecKScale, kDecKZero, kDecKSmooth, kDecKWindow,
  kDecVCodes, kDecVScale, kDecVZero,
  kDecLength, kDecMask,
  kNumDecodeInputs
};
struct DecodeArgs {
  TensorDesc t[kNumDecodeInputs];
  bool has_scale = false;
  double scale = 0.0;
  std::string precision = "int8";
  int64_t k_group = 0, v_group = 0;
  int64_t num_splits = 0;  // 0: decode_num_splits (what ops.mm passes); tests force others
};
// The split count used when num_splits is 0: enough threadgroups to fill the GPU, but no
// split shorter than FQ_DEC_MIN_SPLIT_KEYS keys of the cache's capacity.
int64_t decode_num_splits(int64_t batch, int64_t kv_heads, int64_t row_blocks, int64_t capacity);
// Outputs: out (B, Hq, Sq, D) in q's dtype, lse (B, Hq, Sq) float32 (of the stored keys:
// int8's centre omitted), then the temporaries part_out (n_splits, B, Hq, Sq, D) and
// part_lse (n_splits, B, Hq, Sq), float32. Launches: fq_decode_partial, fq_decode_merge.
Plan plan_decode(const DecodeArgs& a);

}  // namespace fq_mps
