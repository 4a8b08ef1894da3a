// Read-only views of attention operands as the CPU kernels see them: one of q / k / v,
// either floating (fp32 / fp16 / bf16) or quantized (int8, packed int4, float8 with a
// broadcast scale and optional zero point), in logical (B, H, S, D) layout with any
// strides; and the attention mask, expanded to (B, Hq, Sq, Skv) without copying.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace flash_quant {
namespace cpu {

enum class Kind { F32, F16, BF16, I8, I4, E4M3, E5M2 };

struct Operand {
  Kind kind = Kind::F32;
  const void* data = nullptr;
  int64_t st[4] = {0, 0, 0, 0};  // element strides of data (int4: of the packed bytes)
  const float* scale = nullptr;  // quantized only: scale expanded to (B, H, S, D)
  int64_t sst[4] = {0, 0, 0, 0};
  const int32_t* zp = nullptr;  // optional zero point, expanded like scale
  int64_t zst[4] = {0, 0, 0, 0};
  int64_t D = 0;
  at::Tensor keep_data, keep_scale, keep_zp;  // keep the viewed storage alive

  bool quantized() const { return kind != Kind::F32 && kind != Kind::F16 && kind != Kind::BF16; }
  bool integer() const { return kind == Kind::I8 || kind == Kind::I4; }
  // Per-row scale / zero point (q and k: their scales are one value per row).
  float row_scale(int64_t b, int64_t h, int64_t s) const {
    return scale[b * sst[0] + h * sst[1] + s * sst[2]];
  }
  int32_t row_zero_point(int64_t b, int64_t h, int64_t s) const {
    return zp ? zp[b * zst[0] + h * zst[1] + s * zst[2]] : 0;
  }
  // Row (b, h, s) as fp32: converted, or dequantized as (data - zero_point) * scale.
  void load_f32(int64_t b, int64_t h, int64_t s, float* dst) const;
  // Raw integer values of row (b, h, s) of an int8 / int4 operand (int4 sign-extended).
  void load_int(int64_t b, int64_t h, int64_t s, int8_t* dst) const;
};

// Builds the view of operand `name` ("q", "k", "v"): x carries the logical shape
// (B, H, S, D); when `data` is given x is never read and the quantized data is used.
// q / k scales must be per row (last dim 1); v's may be per channel.
Operand make_operand(const at::Tensor& x, const std::optional<at::Tensor>& data,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& zero_point,
                     const char* name, bool per_row_scale);

struct MaskView {
  enum class Type { None, Bool, F32, F16, BF16 } type = Type::None;
  const void* data = nullptr;
  int64_t st[4] = {0, 0, 0, 0};
  at::Tensor keep;
  // Applies the mask to a score tile S[rows × kBN] (query rows i0.., keys j0..j0+n):
  // bool False -> -inf added, floating -> added.
  void apply(int64_t b, int64_t h, int64_t i0, int rows, int64_t j0, int n, float* S) const;
};

MaskView make_mask(const std::optional<at::Tensor>& attn_mask, int64_t B, int64_t Hq, int64_t Sq,
                   int64_t Skv);

}  // namespace cpu
}  // namespace flash_quant
