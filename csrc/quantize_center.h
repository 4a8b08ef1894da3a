// The `center` argument of flash_quant::quantize, checked the same way on every C++
// backend (CPU, MPS) before any kernel runs (docs/op_contract.md, "Quantization").
//
// A given centre replaces the smoothing mean: the op quantizes x - center (x @ H - center
// with rotate) and returns the centre as `mean`. Callers pass one computed over the keys
// a query may see (flash_quant/key_stats.py), which the mean over every row is not.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

#include <optional>
#include <vector>

namespace flash_quant {

// The centre as a new contiguous float32 tensor of shape x.shape[:-2] + (1, D) (a copy:
// an op output must not alias an input), or an undefined tensor when none is given.
inline at::Tensor checked_center(const at::Tensor& x, const std::optional<at::Tensor>& center, bool smooth) {
  if (!center.has_value() || !center->defined()) return at::Tensor();
  const at::Tensor& c = *center;
  TORCH_CHECK(smooth, "quantize: center is the smoothing centre, it needs smooth=True");
  TORCH_CHECK(x.dim() >= 2, "quantize: center needs x of rank >= 2, got rank ", x.dim());
  TORCH_CHECK(c.scalar_type() == at::kFloat, "quantize: center must be float32, got ", c.scalar_type());
  TORCH_CHECK(c.device() == x.device(), "quantize: center is on ", c.device(), " but x is on ", x.device());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(1);
  shape.push_back(x.size(-1));
  TORCH_CHECK(c.dim() <= static_cast<int64_t>(shape.size()) && at::is_expandable_to(c.sizes(), shape),
              "quantize: center of shape ", c.sizes(), " does not broadcast to x.shape[:-2] + (1, D) = ",
              at::IntArrayRef(shape));
  return c.expand(shape).clone(at::MemoryFormat::Contiguous);
}

}  // namespace flash_quant
