// Entry points of the CPU backend, registered for the CPU dispatch key in
// register_cpu.cpp. Semantics: docs/op_contract.md; schemas: csrc/schema.cpp.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace flash_quant {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cpu(
    const at::Tensor& x, c10::string_view precision, c10::string_view granularity,
    int64_t block_size, c10::string_view strategy, bool smooth, bool rotate,
    const std::optional<at::Tensor>& center);

at::Tensor dequantize_cpu(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero_point,
                          const at::Tensor& mean, c10::string_view precision, int64_t block_size,
                          at::ScalarType dtype);

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& q_data,
    const OptTensor& q_scale, const OptTensor& q_zero_point, const OptTensor& k_data,
    const OptTensor& k_scale, const OptTensor& k_zero_point, const OptTensor& k_mean,
    const OptTensor& v_data, const OptTensor& v_scale, const OptTensor& v_zero_point,
    const OptTensor& attn_mask, bool is_causal, std::optional<double> scale,
    c10::string_view pv_precision);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& q_data, const OptTensor& q_scale,
    const OptTensor& q_zero_point, const OptTensor& k_data, const OptTensor& k_scale,
    const OptTensor& k_zero_point, const OptTensor& k_mean, const OptTensor& v_data,
    const OptTensor& v_scale, const OptTensor& v_zero_point, const OptTensor& attn_mask,
    bool is_causal, std::optional<double> scale, c10::string_view pv_precision);

}  // namespace cpu
}  // namespace flash_quant
