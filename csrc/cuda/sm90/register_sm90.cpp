// CUDA kernels of flash_quant::_sm90_attention_forward (quantized operands) and
// flash_quant::_sm90_attention (16-bit operands: the accurate preset's pre-pass, then the
// same forward): check the tensors (before any kernel runs), allocate the outputs and
// launch on the current stream of the operands' device. flash_quant/cuda/dispatch.py
// decides when they serve a call; the schemas are in csrc/schema.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <initializer_list>
#include <optional>

#include "fwd_launch.h"
#include "prepass.h"

namespace flash_quant_sm90 {
namespace {

constexpr const char* kOp = "flash_quant._sm90_attention_forward: ";

void check_rows(const at::Tensor& t, const char* name, int64_t elem_bytes) {
  TORCH_CHECK(t.dim() == 4, kOp, name, " must be 4-D (B, H, S, D), got ", t.dim(), " dims");
  TORCH_CHECK(t.stride(3) == 1, kOp, name, " must have a contiguous last dim");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, kOp, name, " must be 16-byte aligned");
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK((t.stride(d) * elem_bytes) % 16 == 0, kOp, name, " stride ", d,
                " must be a multiple of 16 bytes (TMA), got ", t.stride(d) * elem_bytes);
  }
}

// Whether the fused op quantizes Q inside the forward kernel (Sm90FwdParams::quantize_q)
// instead of in the pre-pass's codes kernel: FLASH_QUANT_SM90_Q_IN_KERNEL=0|1, default 1
// (H100, Flux shape: bit-identical outputs, 7 us less a call; docs/hopper.md). 0 keeps the
// pre-pass route, against which the tests compare it.
bool q_in_kernel_from_env() {
  const char* env = std::getenv("FLASH_QUANT_SM90_Q_IN_KERNEL");
  if (env == nullptr || env[0] == '\0') return true;
  TORCH_CHECK((env[0] == '0' || env[0] == '1') && env[1] == '\0', kOp,
              "FLASH_QUANT_SM90_Q_IN_KERNEL must be 0 or 1, got '", env, "'");
  return env[0] == '1';
}

// A defined tensor's data, else null (the kernels' optional operands).
template <class T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor scales(const at::Tensor& s, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(s.scalar_type() == at::kFloat, kOp, name, " must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.sizes() == shape, kOp, name, " must have shape ", shape, ", got ", s.sizes());
  return s.contiguous();
}

// The forward on quantized operands; lse_shift (B, Hq, Sq) float32 or null: the fused
// path's q · k_mean from the float q (the lse term the kernel otherwise takes from q's codes).
// An undefined q_scale: q_data is the fused path's 16-bit q, which the kernel quantizes
// (Sm90FwdParams::quantize_q) against k_center, the pre-pass's (B, Hkv, D) float32 centre.
// from_prepass: the operands come from the fused op's pre-pass (INT8 V^T in its permuted
// token order).
std::tuple<at::Tensor, at::Tensor> run_forward(
    const at::Tensor& q_data, const at::Tensor& q_scale, const at::Tensor& k_data, const at::Tensor& k_scale,
    const std::optional<at::Tensor>& k_mean, const at::Tensor& v, const std::optional<at::Tensor>& v_data,
    const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& nonfinite, bool is_causal,
    double scale, const float* lse_shift, const float* k_center = nullptr, bool from_prepass = false) {
  TORCH_CHECK(q_data.is_cuda() && k_data.is_cuda() && v.is_cuda(), kOp, "operands must be CUDA tensors");
  TORCH_CHECK(q_data.device() == k_data.device() && q_data.device() == v.device(), kOp,
              "operands are on different devices");
  const bool quantize_q = !q_scale.defined();
  TORCH_CHECK(quantize_q ? q_data.scalar_type() == v.scalar_type() : q_data.scalar_type() == at::kChar, kOp,
              quantize_q ? "q (quantized in the kernel) must have v's dtype" : "q_data must be int8", ", got ",
              q_data.scalar_type());
  TORCH_CHECK(k_data.scalar_type() == at::kChar, kOp, "k_data must be int8");
  TORCH_CHECK(v.scalar_type() == at::kBFloat16 || v.scalar_type() == at::kHalf, kOp,
              "v must be bfloat16 or float16 (it sets the output type), got ", v.scalar_type());
  check_rows(q_data, "q_data", q_data.element_size());
  check_rows(k_data, "k_data", 1);
  const int64_t B = q_data.size(0), Hq = q_data.size(1), Sq = q_data.size(2), D = q_data.size(3);
  const int64_t Hkv = k_data.size(1), Skv = k_data.size(2);
  TORCH_CHECK(tile_head_dim(D) != 0, kOp,
              "head dim must be a multiple of ", kHeadDimGranule, " up to ", kMaxTileHeadDim, ", got ", D);
  TORCH_CHECK(k_data.size(0) == B && k_data.size(3) == D, kOp, "k_data shape ", k_data.sizes(),
              " does not match q_data ", q_data.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, kOp, "Hq=", Hq, " is not a multiple of Hkv=", Hkv);
  TORCH_CHECK(v.sizes() == k_data.sizes(), kOp, "v shape ", v.sizes(), " != k_data shape ", k_data.sizes());
  TORCH_CHECK(Sq >= 1 && Skv >= 1 && B >= 1, kOp, "empty batch or sequence");
  TORCH_CHECK(Sq < (1 << 30) && Skv < (1 << 30) && Hq < 65536 && B < 65536, kOp, "shape too large");

  const at::Tensor qs = quantize_q ? at::Tensor() : scales(q_scale, {B, Hq, Sq}, "q_scale");
  const at::Tensor ks = scales(k_scale, {B, Hkv, Skv}, "k_scale");
  at::Tensor km, vs, nf;
  if (k_mean.has_value()) km = scales(*k_mean, {B, Hkv, D}, "k_mean");
  const bool pv_int8 = v_data.has_value();
  if (pv_int8) {
    const at::Tensor& vd = *v_data;
    TORCH_CHECK(vd.scalar_type() == at::kChar, kOp, "v_data must be int8");
    TORCH_CHECK(vd.sizes() == k_data.sizes(), kOp, "v_data shape ", vd.sizes(), " != k_data shape ", k_data.sizes());
    TORCH_CHECK(vd.stride(2) == 1, kOp, "v_data must be stored K-major (tokens contiguous: stride(-2) == 1)");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(vd.data_ptr()) % 16 == 0, kOp, "v_data must be 16-byte aligned");
    for (int d : {0, 1, 3}) {
      TORCH_CHECK(vd.stride(d) % 16 == 0, kOp, "v_data stride ", d, " must be a multiple of 16 bytes, got ",
                  vd.stride(d));
    }
    TORCH_CHECK(v_scale.has_value(), kOp, "v_data given without v_scale");
    vs = scales(*v_scale, {B, Hkv, D}, "v_scale");
  } else {
    TORCH_CHECK(!v_scale.has_value(), kOp, "v_scale given without v_data");
    check_rows(v, "v", v.element_size());
  }
  if (nonfinite.has_value()) {
    TORCH_CHECK(nonfinite->scalar_type() == at::kInt && nonfinite->sizes() == at::IntArrayRef({B, Hq}), kOp,
                "nonfinite must be int32 of shape (B, Hq)");
    nf = nonfinite->contiguous();
  }
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qs, &ks, &km, &vs, &nf}) {
    TORCH_CHECK(!t->defined() || t->device() == q_data.device(), kOp, "scales / flags on another device");
  }

  const c10::cuda::CUDAGuard guard(q_data.device());
  at::Tensor out = at::empty({B, Hq, Sq, D}, v.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, v.options().dtype(at::kFloat));

  Sm90FwdParams p;
  p.q = q_data.data_ptr();
  p.k = k_data.data_ptr();
  const at::Tensor& vt = pv_int8 ? *v_data : v;
  p.v = vt.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q_data.stride(d);
    p.k_stride[d] = k_data.stride(d);
  }
  p.v_stride[0] = vt.stride(0);
  p.v_stride[1] = vt.stride(1);
  p.v_stride[2] = pv_int8 ? vt.stride(3) : vt.stride(2);  // K-major: the channel stride
  p.q_scale = data_or_null<float>(qs);
  p.quantize_q = quantize_q;
  p.k_scale = ks.data_ptr<float>();
  p.v_scale = data_or_null<float>(vs);
  p.k_mean = data_or_null<float>(km);
  p.lse_shift = lse_shift;
  p.k_center = k_center;
  p.nonfinite = data_or_null<int32_t>(nf);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.batch = static_cast<int>(B);
  p.q_heads = static_cast<int>(Hq);
  p.kv_heads = static_cast<int>(Hkv);
  p.q_len = static_cast<int>(Sq);
  p.kv_len = static_cast<int>(Skv);
  p.head_dim = static_cast<int>(D);
  p.softmax_scale = static_cast<float>(scale);
  p.out_type = v.scalar_type() == at::kBFloat16 ? OutType::kBFloat16 : OutType::kFloat16;
  p.pv_int8 = pv_int8;
  p.v_keys_permuted = pv_int8 && from_prepass;
  p.causal = is_causal;
  launch_forward(p, c10::cuda::getCurrentCUDAStream().stream());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> sm90_attention_forward(
    const at::Tensor& q_data, const at::Tensor& q_scale, const at::Tensor& k_data, const at::Tensor& k_scale,
    const std::optional<at::Tensor>& k_mean, const at::Tensor& v, const std::optional<at::Tensor>& v_data,
    const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& nonfinite, bool is_causal,
    double scale) {
  return run_forward(q_data, q_scale, k_data, k_scale, k_mean, v, v_data, v_scale, nonfinite, is_causal, scale,
                     nullptr);
}

constexpr const char* kFusedOp = "flash_quant._sm90_attention: ";

// A 16-bit operand the pre-pass reads with vector loads.
void check_input(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), kFusedOp, name, " must be on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kFusedOp, name, " dtype ", t.scalar_type(), " != q's ",
              q.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(3) == kHeadDim, kFusedOp, name, " must be (B, H, S, ", kHeadDim, "), got ",
              t.sizes());
  TORCH_CHECK(t.stride(3) == 1, kFusedOp, name, " must have a contiguous last dim");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, kFusedOp, name, " must be 16-byte aligned");
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0, kFusedOp, name, " stride ", d, " must be a multiple of 8 elements, got ",
                t.stride(d));
  }
}

std::tuple<at::Tensor, at::Tensor> sm90_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  bool is_causal, double scale, bool pv_int8) {
  TORCH_CHECK(q.is_cuda(), kFusedOp, "q must be a CUDA tensor");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, kFusedOp,
              "q must be bfloat16 or float16, got ", q.scalar_type());
  check_input(q, q, "q");
  check_input(k, q, "k");
  check_input(v, q, "v");
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), Hkv = k.size(1), Skv = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes(), kFusedOp, "shapes q ", q.sizes(), " k ", k.sizes(), " v ",
              v.sizes(), " do not match");
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, kFusedOp, "Hq=", Hq, " is not a multiple of Hkv=", Hkv);
  TORCH_CHECK(B >= 1 && Sq >= 1 && Skv >= 1, kFusedOp, "empty batch or sequence");
  TORCH_CHECK(Sq < (1 << 30) && Skv < (1 << 30) && B * Hkv < 65536, kFusedOp, "shape too large");
  TORCH_CHECK(scale > 0, kFusedOp, "scale must be > 0, got ", scale);

  const c10::cuda::CUDAGuard guard(q.device());
  const auto i8 = q.options().dtype(at::kChar);
  const auto f32 = q.options().dtype(at::kFloat);
  int rows_per_block = 0, blocks = 0;
  center_blocks(static_cast<int>(Skv), &rows_per_block, &blocks);
  const bool q_in_kernel = q_in_kernel_from_env();
  at::Tensor q_data, q_scale, q_center_dot;
  if (!q_in_kernel) {
    q_data = at::empty({B, Hq, Sq, kHeadDim}, i8);
    q_scale = at::empty({B, Hq, Sq}, f32);
    q_center_dot = at::empty({B, Hq, Sq}, f32);
  }
  at::Tensor k_data = at::empty({B, Hkv, Skv, kHeadDim}, i8), k_scale = at::empty({B, Hkv, Skv}, f32);
  // workspace: the block means, then the unrotated centre
  at::Tensor work = at::empty({B * Hkv * (blocks + 1) * kHeadDim}, f32);
  // Causal calls skip tiles: a head with an inf / NaN must visit them all (op_contract.md).
  std::optional<at::Tensor> nonfinite;
  if (is_causal) nonfinite = at::zeros({B, Hq}, q.options().dtype(at::kInt));
  // The fast preset's V: INT8 per channel, K-major (tokens contiguous, the key dim padded
  // to 16), and its scale; workspace for the per-block absmax.
  std::optional<at::Tensor> v_codes, v_scale;
  at::Tensor v_work;
  const int64_t v_keys_padded = (Skv + kVKeysAlign - 1) / kVKeysAlign * kVKeysAlign;
  if (pv_int8) {
    at::Tensor buf = at::empty({B, Hkv, kHeadDim, v_keys_padded}, i8);
    v_codes = buf.narrow(3, 0, Skv).transpose(2, 3);  // (B, Hkv, Skv, D), stride(2) == 1
    v_scale = at::empty({B, Hkv, kHeadDim}, f32);
    v_work = at::empty({B * Hkv * blocks * kHeadDim}, f32);
  }

  PrepassParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q.stride(d);
    p.k_stride[d] = k.stride(d);
    p.v_stride[d] = v.stride(d);
  }
  p.batch = static_cast<int>(B);
  p.q_heads = static_cast<int>(Hq);
  p.kv_heads = static_cast<int>(Hkv);
  p.q_len = static_cast<int>(Sq);
  p.kv_len = static_cast<int>(Skv);
  p.in_type = q.scalar_type() == at::kBFloat16 ? OutType::kBFloat16 : OutType::kFloat16;
  p.q_data = data_or_null<int8_t>(q_data);
  p.q_scale = data_or_null<float>(q_scale);
  p.k_data = k_data.data_ptr<int8_t>();
  p.k_scale = k_scale.data_ptr<float>();
  p.block_means = work.data_ptr<float>();
  p.k_center = p.block_means + B * Hkv * blocks * kHeadDim;
  p.q_center_dot = data_or_null<float>(q_center_dot);
  p.nonfinite = nonfinite.has_value() ? nonfinite->data_ptr<int32_t>() : nullptr;
  if (pv_int8) {
    p.v_data = v_codes->data_ptr<int8_t>();
    p.v_keys_padded = v_keys_padded;
    p.v_scale = v_scale->data_ptr<float>();
    p.v_block_amax = v_work.data_ptr<float>();
  }
  launch_prepass(p, c10::cuda::getCurrentCUDAStream().stream());
  // (Q in the kernel: the 16-bit q and no q_scale; run_forward checks it as the kernel reads it)
  // (the lse's centre term comes from the float q: lse_shift, or the in-kernel Q's q · k_center;
  // the forward needs no rotated k_mean)
  return run_forward(q_in_kernel ? q : q_data, q_scale, k_data, k_scale, std::nullopt, v, v_codes, v_scale,
                     nonfinite, is_causal, scale, p.q_center_dot, p.k_center,
                     /*from_prepass=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_quant, CUDA, m) {
  m.impl("_sm90_attention_forward", &sm90_attention_forward);
  m.impl("_sm90_attention", &sm90_attention);
}

}  // namespace flash_quant_sm90
