#include "cpu/attention_common.h"

#include <ATen/ExpandUtils.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/cpu_common.h"
#include "support.h"

namespace flash_quant {
namespace cpu {

AttnDims check_attention_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, Hq, Sq, D), got rank ", q.dim());
  TORCH_CHECK(k.dim() == 4, op, ": k must be (B, Hkv, Skv, D), got rank ", k.dim());
  TORCH_CHECK(v.dim() == 4, op, ": v must be (B, Hkv, Skv, D), got rank ", v.dim());
  TORCH_CHECK(is_supported_float(q.scalar_type()), op, ": q must be float32, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  AttnDims d;
  d.B = q.size(0);
  d.Hq = q.size(1);
  d.Sq = q.size(2);
  d.D = q.size(3);
  d.Hkv = k.size(1);
  d.Skv = k.size(2);
  TORCH_CHECK(k.size(0) == d.B && k.size(3) == d.D, op, ": k of shape ", k.sizes(),
              " does not match q of shape ", q.sizes(), " (batch and head dim must agree)");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(fq_head_dim_supported(d.D), op, ": head dim D must be a multiple of ", FQ_HEAD_DIM_MULTIPLE, " in [",
              FQ_MIN_HEAD_DIM, ", ", FQ_MAX_HEAD_DIM, "], got ", d.D);
  TORCH_CHECK(d.Hkv >= 1 && d.Hq % d.Hkv == 0, op, ": the query heads Hq = ", d.Hq,
              " must be a multiple of the kv heads Hkv = ", d.Hkv);
  d.Dp = (d.D + 15) / 16 * 16;
  d.group = d.Hq / d.Hkv;
  d.nqb = (d.Sq + kBM - 1) / kBM;
  d.nkb = (d.Skv + kBN - 1) / kBN;
  d.Skv_pad = d.nkb * kBN;
  return d;
}

at::Tensor expand_k_mean(const std::optional<at::Tensor>& k_mean, const AttnDims& d) {
  if (!k_mean.has_value()) return at::Tensor();
  const at::Tensor& m = *k_mean;
  TORCH_CHECK(m.scalar_type() == at::kFloat, "attention: k_mean must be float32, got ", m.scalar_type());
  TORCH_CHECK(m.device().is_cpu(), "attention: k_mean must be a CPU tensor");
  TORCH_CHECK(m.dim() <= 4 && at::is_expandable_to(m.sizes(), {d.B, d.Hkv, 1, d.D}),
              "attention: k_mean of shape ", m.sizes(), " does not broadcast to (", d.B, ", ", d.Hkv,
              ", 1, ", d.D, ")");
  return m.expand({d.B, d.Hkv, 1, d.D});
}

void pack_rows_f32(const Operand& op, int64_t b, int64_t h, int64_t S, int64_t S_pad, int64_t Dp,
                   float* dst) {
  std::fill(dst, dst + S_pad * Dp, 0.f);
  for (int64_t s = 0; s < S; ++s) op.load_f32(b, h, s, dst + s * Dp);
}

void pack_transposed_f32(const Operand& op, int64_t b, int64_t h, int64_t S, int64_t S_pad,
                         float* dst) {
  const int64_t D = op.D;
  std::fill(dst, dst + S_pad * D, 0.f);
  std::vector<float> row(D);
  for (int64_t s = 0; s < S; ++s) {
    op.load_f32(b, h, s, row.data());
    float* tile = dst + (s / kBN) * D * kBN + (s % kBN);
    for (int64_t d = 0; d < D; ++d) tile[d * kBN] = row[d];
  }
}

void mask_bounds_and_causal(float* S, int rows, int64_t i0, int64_t j0, int64_t Skv, bool causal) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t valid = std::min<int64_t>(kBN, Skv - j0);
  for (int r = 0; r < rows; ++r) {
    // Visible keys of row i0 + r in this tile: j < valid and (causal) j0 + j <= i0 + r.
    int64_t end = valid;
    if (causal) end = std::min<int64_t>(end, std::max<int64_t>(0, i0 + r - j0 + 1));
    float* s = S + r * kBN;
    for (int64_t j = end; j < valid; ++j) s[j] += ninf;
    for (int64_t j = valid; j < kBN; ++j) s[j] = ninf;
  }
}

bool all_finite(const float* x, int64_t n) {
  // x - x is 0 for finite x and NaN for inf / NaN; an integer OR keeps the loop
  // vectorisable (a float sum would be a serial dependency chain without -ffast-math).
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !((x[i] - x[i]) == 0.f);
  return bad == 0;
}

bool mask_has_nan_or_posinf(const std::optional<at::Tensor>& attn_mask) {
  if (!attn_mask.has_value() || !attn_mask->is_floating_point()) return false;
  const at::Tensor& m = *attn_mask;
  return (at::isnan(m) | at::isposinf(m)).any().item<bool>();
}

}  // namespace cpu
}  // namespace flash_quant
