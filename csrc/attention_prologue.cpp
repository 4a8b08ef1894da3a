// flash_quant::attention_prologue for CPU and MPS: the contract of csrc/schema.cpp
// composed from ATen ops in float32 (ATen runs them on either device). CUDA has a
// one-pass Triton kernel (flash_quant/cuda/prologue.py); this is also its reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

namespace flash_quant {
namespace {

void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& prefix,
                  const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& prefix_weight,
                  c10::optional<double> eps, const c10::optional<at::Tensor>& cos,
                  const c10::optional<at::Tensor>& sin) {
  TORCH_CHECK(x.dim() == 4, "attention_prologue: x must be (B, S, H, D), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "attention_prologue: x must be a floating tensor, got ",
              x.scalar_type());
  const int64_t d = x.size(3);
  int64_t total = x.size(1);
  if (prefix.has_value()) {
    const auto& p = *prefix;
    TORCH_CHECK(p.dim() == 4 && p.size(0) == x.size(0) && p.size(2) == x.size(2) && p.size(3) == d,
                "attention_prologue: prefix must be (B, P, H, D) with x's B, H and D ", x.sizes(), ", got ",
                p.sizes());
    TORCH_CHECK(p.scalar_type() == x.scalar_type() && p.device() == x.device(),
                "attention_prologue: prefix must match x's dtype and device");
    total += p.size(1);
  } else {
    TORCH_CHECK(!prefix_weight.has_value(), "attention_prologue: prefix_weight given without a prefix");
  }
  for (const auto* w : {&weight, &prefix_weight}) {
    if (!w->has_value()) continue;
    TORCH_CHECK(eps.has_value(), "attention_prologue: a norm weight needs eps (RMS normalisation)");
    TORCH_CHECK((*w)->dim() == 1 && (*w)->size(0) == d, "attention_prologue: norm weights must be (D,) = (", d,
                ",), got ", (*w)->sizes());
    TORCH_CHECK((*w)->device() == x.device(), "attention_prologue: norm weights must be on x's device");
  }
  if (eps.has_value()) {
    TORCH_CHECK(std::isfinite(*eps) && *eps >= 0, "attention_prologue: eps must be finite and >= 0, got ", *eps);
  }
  TORCH_CHECK(cos.has_value() == sin.has_value(), "attention_prologue: give both cos and sin, or neither");
  if (cos.has_value()) {
    TORCH_CHECK(d % 2 == 0, "attention_prologue: rotary embedding pairs channels: head dim must be even, got ", d);
    for (const auto* t : {&cos, &sin}) {
      TORCH_CHECK((*t)->dim() == 2 && (*t)->size(0) == total && (*t)->size(1) == d,
                  "attention_prologue: cos / sin must be (P + S, D) = (", total, ", ", d, "), got ", (*t)->sizes());
      TORCH_CHECK(at::isFloatingType((*t)->scalar_type()) && (*t)->device() == x.device(),
                  "attention_prologue: cos / sin must be floating tensors on x's device");
    }
  }
}

// float32 arithmetic (float64 for float64 inputs, so gradcheck can test the formulas)
at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor rms_norm(const at::Tensor& x, c10::optional<double> eps, const c10::optional<at::Tensor>& weight) {
  at::Tensor y = x.to(compute_type(x));
  if (!eps.has_value()) return y;
  y = y * at::rsqrt(y.pow(2).mean(-1, /*keepdim=*/true) + *eps);
  return weight.has_value() ? y * weight->to(y.scalar_type()) : y;
}

at::Tensor attention_prologue(const at::Tensor& x, const c10::optional<at::Tensor>& prefix,
                              const c10::optional<at::Tensor>& weight,
                              const c10::optional<at::Tensor>& prefix_weight, c10::optional<double> eps,
                              const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin) {
  check_inputs(x, prefix, weight, prefix_weight, eps, cos, sin);
  at::Tensor y = rms_norm(x, eps, weight);  // (B, S, H, D) float32
  if (prefix.has_value()) y = at::cat({rms_norm(*prefix, eps, prefix_weight), y}, 1);
  if (cos.has_value()) {
    const int64_t total = y.size(1), d = y.size(3);
    at::Tensor c = cos->to(y.scalar_type()).reshape({1, total, 1, d});
    at::Tensor s = sin->to(y.scalar_type()).reshape({1, total, 1, d});
    // partner of channel 2i is -(2i+1), of 2i+1 is 2i
    at::Tensor pairs = y.unflatten(-1, {d / 2, 2});
    at::Tensor partner = at::stack({-pairs.select(-1, 1), pairs.select(-1, 0)}, -1).flatten(-2);
    y = y * c + partner * s;
  }
  at::Tensor out = at::empty({y.size(0), y.size(2), y.size(1), y.size(3)}, x.options());
  out.copy_(y.transpose(1, 2));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_quant, CPU, m) { m.impl("attention_prologue", &attention_prologue); }
TORCH_LIBRARY_IMPL(flash_quant, MPS, m) { m.impl("attention_prologue", &attention_prologue); }

}  // namespace flash_quant
