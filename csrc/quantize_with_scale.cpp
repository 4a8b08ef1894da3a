// flash_quant::quantize_with_scale for every device: the rounding step of quantization
// with scales supplied by the caller (static scales, or a clip search done in Python).
// It is a few elementwise ATen ops, so one composite implementation serves CPU, CUDA and
// MPS alike; the per-device kernels of `quantize` exist because computing the group
// ranges and rounding in one pass is where speed matters.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "precision.h"
#include "scale_check.h"

namespace flash_quant {
namespace {

struct Range {
  double qmin, qmax;
  at::ScalarType dtype;
  bool is_float;
};

Range range_of(c10::string_view p) {
  if (p == "int8") return {FQ_INT8_QMIN, FQ_INT8_QMAX, at::kChar, false};
  if (p == "int4") return {FQ_INT4_QMIN, FQ_INT4_QMAX, at::kByte, false};
  if (p == "fp8_e4m3") return {-FQ_FP8_E4M3_MAX, FQ_FP8_E4M3_MAX, at::kFloat8_e4m3fn, true};
  if (p == "fp8_e5m2") return {-FQ_FP8_E5M2_MAX, FQ_FP8_E5M2_MAX, at::kFloat8_e5m2, true};
  TORCH_CHECK(false, "quantize_with_scale: precision must be 'int8', 'int4', 'fp8_e4m3' or 'fp8_e5m2', got '",
              std::string(p), "'");
}

// Broadcast a group-shaped tensor to x's shape; dim -2 groups `block` rows when it is
// neither 1 nor the full row count.
at::Tensor expand_groups(const at::Tensor& g, const at::Tensor& x, int64_t block) {
  at::Tensor t = g;
  if (t.dim() >= 2 && x.dim() >= 2 && t.size(-2) > 1 && t.size(-2) != x.size(-2)) {
    t = t.repeat_interleave(block, -2).narrow(-2, 0, x.size(-2));
  }
  return t.expand(x.sizes());
}

at::Tensor quantize_with_scale(const at::Tensor& x, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& zero_point, c10::string_view precision,
                               int64_t block_size) {
  const Range r = range_of(precision);
  TORCH_CHECK(x.is_floating_point(), "quantize_with_scale: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "quantize_with_scale: scale must be float32, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.dim() == x.dim(), "quantize_with_scale: scale must have x's rank (", x.dim(), "), got shape ",
              scale.sizes());
  TORCH_CHECK(block_size >= 1, "quantize_with_scale: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(scale.device() == x.device(), "quantize_with_scale: scale is on ", scale.device(),
              " but x is on ", x.device());
  check_scale_values(scale, "quantize_with_scale", "scale");
  for (int64_t d = 0; d < x.dim(); ++d) {
    const bool blocked = d == x.dim() - 2 && scale.size(d) == (x.size(d) + block_size - 1) / block_size;
    TORCH_CHECK(scale.size(d) == 1 || scale.size(d) == x.size(d) || blocked,
                "quantize_with_scale: scale shape ", scale.sizes(), " is not a group shape of x ", x.sizes(),
                " (block_size ", block_size, ")");
  }
  if (precision == "int4") {
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0,
                "quantize_with_scale: int4 packs two values per byte, the last dim must be even, got ",
                x.sizes());
  }
  const at::Tensor s = expand_groups(scale, x, block_size);
  at::Tensor v = x.to(at::kFloat) / s;
  if (r.is_float) {
    return v.clamp(r.qmin, r.qmax).to(r.dtype);
  }
  v = v.round();  // half to even, as the quantize kernels
  double lo = -r.qmax;  // symmetric integers use [-qmax, qmax]
  if (zero_point.has_value()) {
    TORCH_CHECK(zero_point->scalar_type() == at::kInt && zero_point->sizes() == scale.sizes(),
                "quantize_with_scale: zero_point must be int32 of the scale's shape ", scale.sizes());
    v = v + expand_groups(*zero_point, x, block_size).to(at::kFloat);
    lo = r.qmin;
  }
  at::Tensor q = v.clamp(lo, r.qmax).to(at::kInt);
  if (precision == "int4") {  // element 2i in the low nibble, 2i+1 in the high nibble
    at::Tensor pairs = q.unflatten(-1, {q.size(-1) / 2, 2});
    at::Tensor low = pairs.select(-1, 0).bitwise_and(0xF);
    at::Tensor high = pairs.select(-1, 1).bitwise_and(0xF).bitwise_left_shift(4);
    return low.bitwise_or(high).to(at::kByte);
  }
  return q.to(at::kChar);
}

}  // namespace
}  // namespace flash_quant

TORCH_LIBRARY_IMPL(flash_quant, CompositeExplicitAutograd, m) {
  m.impl("quantize_with_scale", &flash_quant::quantize_with_scale);
}
