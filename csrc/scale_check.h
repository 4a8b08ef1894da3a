// Value check of caller-supplied quantization scales, shared by the raw ops' CPU entry
// points (attention operands, dequantize, quantize_with_scale).
#pragma once

#include <ATen/ATen.h>

namespace flash_quant {

// A scale must be finite and > 0: zero divides by zero when quantizing, and a negative
// or NaN scale gives wrong values with no error. Checked only where the values live on the
// CPU: reading them there is cheap and needs no device sync (on CUDA / MPS it would stall
// the stream, so there the Python API checks QuantizedTensor values at construction).
inline void check_scale_values(const at::Tensor& scale, const char* op, const char* name) {
  if (!scale.device().is_cpu() || scale.numel() == 0) return;
  const bool ok = at::logical_and(at::isfinite(scale), scale.gt(0)).all().item<bool>();
  TORCH_CHECK(ok, op, ": ", name, " must be finite and > 0 everywhere (found a zero, negative, NaN or inf scale)");
}

}  // namespace flash_quant
