// Operand and mask views: argument checks (named after the op's arguments) and the
// strided row readers used to load / dequantize tiles.
#include "cpu/operand.h"

#include <ATen/ExpandUtils.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <limits>
#include <string>

#include "cpu/cpu_common.h"
#include "cpu/tile_ops.h"
#include "scale_check.h"

namespace flash_quant {
namespace cpu {
namespace {

// Reads row elements through the strides and writes f(value, d) for every channel d.
template <typename T, typename F>
inline void for_row(const void* base, int64_t off, int64_t step, int64_t D, F f) {
  const T* p = static_cast<const T*>(base) + off;
  for (int64_t d = 0; d < D; ++d) f(static_cast<float>(p[d * step]), d);
}

}  // namespace

void Operand::load_f32(int64_t b, int64_t h, int64_t s, float* dst) const {
  const int64_t off = b * st[0] + h * st[1] + s * st[2];
  if (!quantized()) {
    auto put = [&](float x, int64_t d) { dst[d] = x; };
    switch (kind) {
      case Kind::F32: for_row<float>(data, off, st[3], D, put); break;
      case Kind::F16: for_row<c10::Half>(data, off, st[3], D, put); break;
      default: for_row<c10::BFloat16>(data, off, st[3], D, put); break;
    }
    return;
  }
  const float* sc = scale + b * sst[0] + h * sst[1] + s * sst[2];
  const int32_t* z = zp ? zp + b * zst[0] + h * zst[1] + s * zst[2] : nullptr;
  // (data - zero_point) * scale; the integer difference is exact in fp32.
  auto put = [&](float x, int64_t d) {
    const float zz = z ? static_cast<float>(z[d * zst[3]]) : 0.f;
    dst[d] = (x - zz) * sc[d * sst[3]];
  };
  switch (kind) {
    case Kind::I8: for_row<int8_t>(data, off, st[3], D, put); break;
    case Kind::E4M3: for_row<c10::Float8_e4m3fn>(data, off, st[3], D, put); break;
    case Kind::E5M2: for_row<c10::Float8_e5m2>(data, off, st[3], D, put); break;
    case Kind::I4: {
      const uint8_t* p = static_cast<const uint8_t*>(data) + off;
      for (int64_t d = 0; d < D; ++d) {
        const uint8_t byte = p[(d >> 1) * st[3]];
        put(static_cast<float>(int4_from_nibble((d & 1) ? byte >> 4 : byte)), d);
      }
      break;
    }
    default: break;
  }
}

void Operand::load_int(int64_t b, int64_t h, int64_t s, int8_t* dst) const {
  const int64_t off = b * st[0] + h * st[1] + s * st[2];
  if (kind == Kind::I8) {
    const int8_t* p = static_cast<const int8_t*>(data) + off;
    for (int64_t d = 0; d < D; ++d) dst[d] = p[d * st[3]];
  } else {
    TORCH_INTERNAL_ASSERT(kind == Kind::I4, "load_int on a non-integer operand");
    const uint8_t* p = static_cast<const uint8_t*>(data) + off;
    for (int64_t i = 0; i < D / 2; ++i) {
      const uint8_t byte = p[i * st[3]];
      dst[2 * i] = int4_from_nibble(byte);
      dst[2 * i + 1] = int4_from_nibble(byte >> 4);
    }
  }
}

Operand make_operand(const at::Tensor& x, const std::optional<at::Tensor>& data,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& zero_point,
                     const char* name, bool per_row_scale) {
  const std::string n(name);
  TORCH_CHECK(x.dim() == 4, "attention: ", n, " must be (B, H, S, D), got rank ", x.dim());
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3);
  Operand op;
  op.D = D;
  if (!data.has_value()) {
    TORCH_CHECK(x.device().is_cpu(), "attention: ", n, " must be a CPU tensor");
    switch (x.scalar_type()) {
      case at::kFloat: op.kind = Kind::F32; break;
      case at::kHalf: op.kind = Kind::F16; break;
      case at::kBFloat16: op.kind = Kind::BF16; break;
      default: TORCH_CHECK(false, "attention: ", n, " must be float32, float16 or bfloat16, got ", x.scalar_type());
    }
    op.keep_data = x;
    op.data = x.data_ptr();
    for (int i = 0; i < 4; ++i) op.st[i] = x.stride(i);
    return op;
  }
  const at::Tensor& dt = *data;
  TORCH_CHECK(dt.device().is_cpu(), "attention: ", n, "_data must be a CPU tensor");
  TORCH_CHECK(dt.dim() == 4, "attention: ", n, "_data must be (B, H, S, D), got rank ", dt.dim());
  switch (dt.scalar_type()) {
    case at::kChar: op.kind = Kind::I8; break;
    case at::kByte: op.kind = Kind::I4; break;
    case at::kFloat8_e4m3fn: op.kind = Kind::E4M3; break;
    case at::kFloat8_e5m2: op.kind = Kind::E5M2; break;
    default:
      TORCH_CHECK(false, "attention: ", n, "_data must be int8, uint8 (packed int4), float8_e4m3fn or ",
                  "float8_e5m2, got ", dt.scalar_type());
  }
  const int64_t last = op.kind == Kind::I4 ? D / 2 : D;
  TORCH_CHECK(dt.size(0) == B && dt.size(1) == H && dt.size(2) == S && dt.size(3) == last,
              "attention: ", n, "_data has shape ", dt.sizes(), ", expected (", B, ", ", H, ", ", S, ", ",
              last, ")", op.kind == Kind::I4 ? " (packed int4: last dim D/2)" : "");
  op.keep_data = dt;
  op.data = dt.data_ptr();
  for (int i = 0; i < 4; ++i) op.st[i] = dt.stride(i);

  TORCH_CHECK(scale.has_value(), "attention: ", n, "_scale is required when ", n, "_data is given");
  const at::Tensor& sc = *scale;
  TORCH_CHECK(sc.scalar_type() == at::kFloat, "attention: ", n, "_scale must be float32, got ",
              sc.scalar_type());
  TORCH_CHECK(sc.device().is_cpu(), "attention: ", n, "_scale must be a CPU tensor");
  const std::vector<int64_t> target =
      per_row_scale ? std::vector<int64_t>{B, H, S, 1} : std::vector<int64_t>{B, H, S, D};
  TORCH_CHECK(sc.dim() <= 4 && at::is_expandable_to(sc.sizes(), target), "attention: ", n,
              "_scale of shape ", sc.sizes(), " does not broadcast to ", c10::IntArrayRef(target),
              per_row_scale ? " (q/k scales are per row)" : "");
  check_scale_values(sc, "attention", (std::string(n) + "_scale").c_str());
  op.keep_scale = sc.expand({B, H, S, D});
  op.scale = op.keep_scale.data_ptr<float>();
  for (int i = 0; i < 4; ++i) op.sst[i] = op.keep_scale.stride(i);
  if (zero_point.has_value()) {
    const at::Tensor& z = *zero_point;
    TORCH_CHECK(z.scalar_type() == at::kInt, "attention: ", n, "_zero_point must be int32, got ",
                z.scalar_type());
    TORCH_CHECK(z.dim() <= 4 && at::is_expandable_to(z.sizes(), target), "attention: ", n,
                "_zero_point of shape ", z.sizes(), " does not broadcast to ", c10::IntArrayRef(target));
    op.keep_zp = z.expand({B, H, S, D});
    op.zp = op.keep_zp.data_ptr<int32_t>();
    for (int i = 0; i < 4; ++i) op.zst[i] = op.keep_zp.stride(i);
  }
  return op;
}

MaskView make_mask(const std::optional<at::Tensor>& attn_mask, int64_t B, int64_t Hq, int64_t Sq,
                   int64_t Skv) {
  MaskView mv;
  if (!attn_mask.has_value()) return mv;
  const at::Tensor& m = *attn_mask;
  TORCH_CHECK(m.device().is_cpu(), "attention: attn_mask must be a CPU tensor");
  switch (m.scalar_type()) {
    case at::kBool: mv.type = MaskView::Type::Bool; break;
    case at::kFloat: mv.type = MaskView::Type::F32; break;
    case at::kHalf: mv.type = MaskView::Type::F16; break;
    case at::kBFloat16: mv.type = MaskView::Type::BF16; break;
    default: TORCH_CHECK(false, "attention: attn_mask must be bool or floating, got ", m.scalar_type());
  }
  TORCH_CHECK(m.dim() <= 4 && at::is_expandable_to(m.sizes(), {B, Hq, Sq, Skv}),
              "attention: attn_mask of shape ", m.sizes(), " does not broadcast to (", B, ", ", Hq, ", ",
              Sq, ", ", Skv, ")");
  mv.keep = m.expand({B, Hq, Sq, Skv});
  mv.data = mv.keep.data_ptr();
  for (int i = 0; i < 4; ++i) mv.st[i] = mv.keep.stride(i);
  return mv;
}

void MaskView::apply(int64_t b, int64_t h, int64_t i0, int rows, int64_t j0, int n, float* S) const {
  const int64_t base = b * st[0] + h * st[1];
  auto each = [&](auto reader) {
    for (int r = 0; r < rows; ++r) {
      const int64_t off = base + (i0 + r) * st[2] + j0 * st[3];
      float* s = S + r * kBN;
      for (int j = 0; j < n; ++j) reader(off + j * st[3], s[j]);
    }
  };
  switch (type) {
    case Type::None: break;
    case Type::Bool: {
      const bool* p = static_cast<const bool*>(data);
      const float ninf = -std::numeric_limits<float>::infinity();
      // Added, not assigned: as in SDPA (a bool mask is an additive -inf mask), a NaN or
      // +inf score stays NaN under a False entry, so a NaN key is not hidden by masking it.
      each([&](int64_t o, float& s) { if (!p[o]) s += ninf; });
      break;
    }
    case Type::F32: {
      const float* p = static_cast<const float*>(data);
      each([&](int64_t o, float& s) { s += p[o]; });
      break;
    }
    case Type::F16: {
      const c10::Half* p = static_cast<const c10::Half*>(data);
      each([&](int64_t o, float& s) { s += static_cast<float>(p[o]); });
      break;
    }
    case Type::BF16: {
      const c10::BFloat16* p = static_cast<const c10::BFloat16*>(data);
      each([&](int64_t o, float& s) { s += static_cast<float>(p[o]); });
      break;
    }
  }
}

}  // namespace cpu
}  // namespace flash_quant
