// CPU kernels of flash_quant::quantize and flash_quant::dequantize
// (semantics: docs/op_contract.md, "Quantization" and "dequantize").
//
// quantize works on x viewed as (L, S, D): L = product of the leading dims, S = dim -2
// (1 for rank 1), D = the last dim. A group is a set of rows (per_tensor / per_head /
// per_token / per_block) or one column of a (S, D) slice (per_channel). Two passes: the
// group range [lo, hi], then the elementwise rounding, both parallel over rows (one pass
// for per_token, where a row is its own group). Each pass reads the rows of x through
// RowReader — converted to float32, rotated and centred one row at a time — so the call
// allocates its outputs and per-thread rows only, never a float32 copy of x.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/kernels_cpu.h"
#include "quantize_center.h"
#include "rotation.h"
#include "scale_check.h"

namespace flash_quant {
namespace cpu {
namespace {

struct GroupParams {
  float scale;
  float zero_point;  // integral value, kept as float for the rounding arithmetic
};

// Scale and zero point of one group from its value range (contract, "Strategies").
GroupParams group_params(float lo, float hi, Precision p, Strategy st) {
  const float qmax = precision_qmax(p);
  const float qmin = precision_qmin(p);
  if (st == Strategy::Asymmetric) {
    lo = std::min(lo, 0.f);
    hi = std::max(hi, 0.f);
    const float range = hi - lo;
    const float s = range > 0.f ? range / (qmax - qmin) : 1.f;
    const float z = std::min(std::max(std::nearbyint(qmin - lo / s), qmin), qmax);
    return {s, z};
  }
  const float amax = std::max(std::fabs(lo), std::fabs(hi));
  return {amax > 0.f ? amax / qmax : 1.f, 0.f};
}

// Quantizes one row of D values with per-element (scale, zero point) taken from
// `scale[d * scale_step]` — scale_step is 0 for row groups, 1 for per_channel.
template <Precision P>
void quantize_row(const float* x, int64_t D, const GroupParams* g, int64_t g_step, bool asym,
                  void* out_row) {
  constexpr float kQmax = precision_qmax(P);
  constexpr float kQmin = precision_qmin(P);
  // Symmetric integer data is clamped to [-qmax, qmax] (the range a symmetric scale maps
  // to); asymmetric uses the full [qmin, qmax].
  const float lo_clamp = asym ? kQmin : -kQmax;
  auto integer_value = [&](int64_t d) {
    const GroupParams& gp = g[d * g_step];
    // Clamp before rounding (keeps |v| within round_half_even's range); clamping to the
    // integer bounds commutes with rounding.
    const float v = std::min(std::max(x[d] / gp.scale, lo_clamp - gp.zero_point), kQmax - gp.zero_point);
    return round_half_even(v) + gp.zero_point;
  };
  if constexpr (P == Precision::Int8) {
    int8_t* o = static_cast<int8_t*>(out_row);
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<int8_t>(integer_value(d));
  } else if constexpr (P == Precision::Int4) {
    uint8_t* o = static_cast<uint8_t*>(out_row);
    for (int64_t i = 0; i < D / 2; ++i) {
      const int lo = static_cast<int>(integer_value(2 * i));
      const int hi = static_cast<int>(integer_value(2 * i + 1));
      o[i] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
    }
  } else {
    using F8 = std::conditional_t<P == Precision::FP8E4M3, c10::Float8_e4m3fn, c10::Float8_e5m2>;
    F8* o = static_cast<F8*>(out_row);
    for (int64_t d = 0; d < D; ++d) {
      const float v = x[d] / g[d * g_step].scale;
      // x / s is within ±qmax up to one rounding of the division; clamp so that the
      // float8 conversion never produces NaN / inf.
      o[d] = F8(std::min(std::max(v, -kQmax), kQmax));
    }
  }
}

using RowFn = void (*)(const float*, int64_t, const GroupParams*, int64_t, bool, void*);

RowFn row_fn(Precision p) {
  switch (p) {
    case Precision::Int8: return &quantize_row<Precision::Int8>;
    case Precision::Int4: return &quantize_row<Precision::Int4>;
    case Precision::FP8E4M3: return &quantize_row<Precision::FP8E4M3>;
    case Precision::FP8E5M2: return &quantize_row<Precision::FP8E5M2>;
  }
  return nullptr;
}

// Row r of x viewed as (rows, D), as the quantization sees it: read through x's strides
// in its dtype, converted to float32, times H when `rotate`, minus its slice's centre
// (row l = r / S of `centre`, a contiguous (L, D) float32 tensor) when `centre` is
// defined.
class RowReader {
 public:
  RowReader(const at::Tensor& x, bool rotate, const at::Tensor& centre)
      : x_(x), rotate_(rotate), centre_(centre.defined() ? centre.data_ptr<float>() : nullptr) {
    D_ = x.size(-1);
    S_ = x.dim() >= 2 ? x.size(-2) : 1;
    last_stride_ = x.stride(-1);
    lead_sizes_.assign(x.sizes().begin(), x.sizes().end() - 1);
    lead_strides_.assign(x.strides().begin(), x.strides().end() - 1);
  }

  void load(int64_t r, float* dst) const {
    int64_t off = 0;  // element offset of row r: unravel r over the leading dims
    for (int64_t i = static_cast<int64_t>(lead_sizes_.size()) - 1, rem = r; i >= 0; --i) {
      off += (rem % lead_sizes_[i]) * lead_strides_[i];
      rem /= lead_sizes_[i];
    }
    switch (x_.scalar_type()) {
      case at::kFloat: convert(x_.const_data_ptr<float>() + off, dst); break;
      case at::kHalf: convert(x_.const_data_ptr<c10::Half>() + off, dst); break;
      default: convert(x_.const_data_ptr<c10::BFloat16>() + off, dst); break;
    }
    if (rotate_) hadamard_rotate_row(dst, D_);
    if (centre_ != nullptr) {
      const float* c = centre_ + (r / S_) * D_;
      for (int64_t d = 0; d < D_; ++d) dst[d] -= c[d];
    }
  }

 private:
  template <typename T>
  void convert(const T* src, float* dst) const {
    for (int64_t d = 0; d < D_; ++d) dst[d] = static_cast<float>(src[d * last_stride_]);
  }

  const at::Tensor& x_;
  bool rotate_;
  const float* centre_;
  int64_t D_ = 0, S_ = 1, last_stride_ = 1;
  std::vector<int64_t> lead_sizes_, lead_strides_;
};

// The smoothing centre: the mean over dim -2 of x @ H (of x without `rotate`), shape x's
// with dim -2 = 1, float32: the mean of x, then — the rotation being linear — its rows
// rotated (in float64). One read of x, no rotated copy. Float32 x: torch's mean (the
// contract's reference). 16-bit x: columns summed here in float64 (torch's mean with
// dtype=float32 would first convert all of x to a float32 copy).
at::Tensor smoothing_mean(const at::Tensor& x, bool rotate) {
  const int64_t D = x.size(-1), S = x.size(-2);
  at::Tensor mean;
  if (x.scalar_type() == at::kFloat) {
    mean = at::mean(x, {-2}, /*keepdim=*/true).contiguous();
  } else {
    std::vector<int64_t> mshape(x.sizes().begin(), x.sizes().end());
    mshape[mshape.size() - 2] = 1;
    mean = at::empty(mshape, x.options().dtype(at::kFloat));
    const RowReader rows(x, /*rotate=*/false, at::Tensor());
    float* mp = mean.data_ptr<float>();
    at::parallel_for(0, D > 0 ? mean.numel() / D : 0, 1, [&](int64_t l0, int64_t l1) {
      std::vector<float> row(D);
      std::vector<double> acc(D);
      for (int64_t l = l0; l < l1; ++l) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t s = 0; s < S; ++s) {
          rows.load(l * S + s, row.data());
          for (int64_t d = 0; d < D; ++d) acc[d] += row[d];
        }
        // S == 0: 0 / 0 = NaN, as torch's mean over an empty dim
        for (int64_t d = 0; d < D; ++d) mp[l * D + d] = static_cast<float>(acc[d] / static_cast<double>(S));
      }
    });
  }
  if (!rotate || D == 0) return mean;
  float* mp = mean.data_ptr<float>();
  std::vector<double> row(D);
  for (int64_t l = 0; l < mean.numel() / D; ++l) {
    std::copy(mp + l * D, mp + (l + 1) * D, row.begin());
    hadamard_rotate_row(row.data(), D);
    std::copy(row.begin(), row.end(), mp + l * D);
  }
  return mean;
}

bool row_finite(const float* x, int64_t n) {
  float acc = 0.f;  // x · 0 is NaN exactly for inf / NaN (one vectorisable sum: a separate
    // at::isfinite pass cost as much as the whole quantization)
  for (int64_t i = 0; i < n; ++i) acc += x[i] * 0.f;
  return acc == 0.f;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cpu(
    const at::Tensor& x, c10::string_view precision, c10::string_view granularity,
    int64_t block_size, c10::string_view strategy, bool smooth, bool rotate,
    const std::optional<at::Tensor>& center) {
  const Precision prec = parse_precision(precision);
  const Granularity gran = parse_granularity(granularity);
  const Strategy strat = parse_strategy(strategy);
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "quantize: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t rank = x.dim();
  TORCH_CHECK(rank >= 1, "quantize: x must have rank >= 1, got a 0-dim tensor");
  TORCH_CHECK(!(is_fp8(prec) && strat == Strategy::Asymmetric),
              "quantize: strategy 'asymmetric' is not defined for fp8 precision '",
              std::string(precision), "' (use 'symmetric')");
  TORCH_CHECK(strat != Strategy::Legacy || gran == Granularity::PerTensor,
              "quantize: strategy 'legacy' requires granularity 'per_tensor', got '",
              std::string(granularity), "'");
  TORCH_CHECK(gran != Granularity::PerHead || rank >= 3,
              "quantize: granularity 'per_head' needs x of rank >= 3, got rank ", rank);
  TORCH_CHECK(!(gran == Granularity::PerChannel || gran == Granularity::PerBlock) || rank >= 2,
              "quantize: granularity '", std::string(granularity), "' needs x of rank >= 2, got rank ",
              rank);
  TORCH_CHECK(gran != Granularity::PerBlock || block_size >= 1,
              "quantize: block_size must be >= 1 for 'per_block', got ", block_size);
  TORCH_CHECK(!smooth || rank >= 2, "quantize: smooth=True needs x of rank >= 2, got rank ", rank);
  const int64_t D = x.size(-1);
  TORCH_CHECK(prec != Precision::Int4 || D % 2 == 0,
              "quantize: int4 packs two values per byte, so the last dim of x must be even, got ", D);
  const at::Tensor given_center = checked_center(x, center, smooth);

  // Everything below (statistics, codes) is of x @ H, minus the centre when smoothing
  // (the caller's centre, already in the rotated space, or the mean over dim -2).
  at::Tensor mean = !smooth                   ? at::empty({0}, x.options().dtype(at::kFloat))
                    : given_center.defined() ? given_center
                                             : smoothing_mean(x, rotate);
  const RowReader reader(x, rotate, smooth ? mean : at::Tensor());

  const int64_t S = rank >= 2 ? x.size(-2) : 1;
  const int64_t rows = D > 0 && S > 0 ? x.numel() / D : 0;
  const int64_t L = S > 0 ? rows / S : 0;
  const int64_t nblocks = gran == Granularity::PerBlock ? (S + block_size - 1) / block_size : 0;

  // Scale shape per the contract's table; its numel is the number of groups.
  std::vector<int64_t> sshape;
  switch (gran) {
    case Granularity::PerTensor: sshape.assign(rank, 1); break;
    case Granularity::PerHead:
      sshape.assign(x.sizes().begin(), x.sizes().end() - 2);
      sshape.insert(sshape.end(), {1, 1});
      break;
    case Granularity::PerToken:
      sshape.assign(x.sizes().begin(), x.sizes().end() - 1);
      sshape.push_back(1);
      break;
    case Granularity::PerBlock:
      sshape.assign(x.sizes().begin(), x.sizes().end() - 2);
      sshape.insert(sshape.end(), {nblocks, 1});
      break;
    case Granularity::PerChannel:
      sshape.assign(x.sizes().begin(), x.sizes().end() - 2);
      sshape.insert(sshape.end(), {1, D});
      break;
  }
  int64_t ngroups = 1;
  for (int64_t s : sshape) ngroups *= s;

  // Group of row r (= l * S + s) for the row-shaped granularities.
  auto row_group = [&](int64_t r) -> int64_t {
    switch (gran) {
      case Granularity::PerTensor: return 0;
      case Granularity::PerHead: return r / S;
      case Granularity::PerToken: return r;
      case Granularity::PerBlock: return (r / S) * nblocks + (r % S) / block_size;
      default: return 0;
    }
  };

  std::vector<int64_t> dshape(x.sizes().begin(), x.sizes().end());
  if (prec == Precision::Int4) dshape.back() = D / 2;
  at::Tensor data = at::empty(dshape, x.options().dtype(precision_dtype(prec)));
  // int8 and both float8 types are one byte per element; int4 half a byte.
  const int64_t out_row_bytes = prec == Precision::Int4 ? D / 2 : D;
  uint8_t* dp = static_cast<uint8_t*>(data.data_ptr());
  const RowFn fn = row_fn(prec);
  const bool asym = strat == Strategy::Asymmetric;
  // Checked on the rows as quantized (after the rotation, which a non-finite x keeps
  // non-finite and which may overflow), before any output is returned.
  std::atomic<bool> finite{true};
  auto check_finite = [&] {
    TORCH_CHECK(finite.load(), "quantize: x contains non-finite values (inf or nan)");
  };

  const float inf = std::numeric_limits<float>::infinity();
  std::vector<GroupParams> params(ngroups);
  // An empty group (no elements) keeps lo = +inf, hi = -inf: treat it as all zero.
  auto params_of = [&](float lo, float hi) {
    const bool empty = lo > hi;
    return group_params(empty ? 0.f : lo, empty ? 0.f : hi, prec, strat);
  };
  auto row_range = [&](const float* row, float& lo, float& hi) {
    lo = inf;
    hi = -inf;
    for (int64_t d = 0; d < D; ++d) {
      lo = std::min(lo, row[d]);
      hi = std::max(hi, row[d]);
    }
  };

  if (gran == Granularity::PerToken) {
    // A row is its own group: range, parameters and codes in one read of the row.
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(D);
      for (int64_t r = r0; r < r1; ++r) {
        reader.load(r, row.data());
        if (!row_finite(row.data(), D)) finite = false;
        float lo, hi;
        row_range(row.data(), lo, hi);
        params[r] = params_of(lo, hi);
        fn(row.data(), D, &params[r], 0, asym, dp + r * out_row_bytes);
      }
    });
    check_finite();
  } else {
    std::vector<float> glo(ngroups, inf), ghi(ngroups, -inf);
    if (gran == Granularity::PerChannel) {
      at::parallel_for(0, L, 1, [&](int64_t l0, int64_t l1) {
        std::vector<float> row(D);
        for (int64_t l = l0; l < l1; ++l) {
          float* lo = glo.data() + l * D;
          float* hi = ghi.data() + l * D;
          for (int64_t s = 0; s < S; ++s) {
            reader.load(l * S + s, row.data());
            if (!row_finite(row.data(), D)) finite = false;
            for (int64_t d = 0; d < D; ++d) {
              lo[d] = std::min(lo[d], row[d]);
              hi[d] = std::max(hi[d], row[d]);
            }
          }
        }
      });
    } else {
      std::vector<float> rlo(rows), rhi(rows);
      at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        std::vector<float> row(D);
        for (int64_t r = r0; r < r1; ++r) {
          reader.load(r, row.data());
          if (!row_finite(row.data(), D)) finite = false;
          row_range(row.data(), rlo[r], rhi[r]);
        }
      });
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = row_group(r);
        glo[g] = std::min(glo[g], rlo[r]);
        ghi[g] = std::max(ghi[g], rhi[r]);
      }
    }
    check_finite();
    for (int64_t g = 0; g < ngroups; ++g) params[g] = params_of(glo[g], ghi[g]);

    // Second read of the rows (converted, rotated and centred again: cheaper than
    // keeping a float32 copy of x between the passes).
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(D);
      for (int64_t r = r0; r < r1; ++r) {
        const GroupParams* g = gran == Granularity::PerChannel ? params.data() + (r / S) * D
                                                               : params.data() + row_group(r);
        reader.load(r, row.data());
        fn(row.data(), D, g, gran == Granularity::PerChannel ? 1 : 0, asym, dp + r * out_row_bytes);
      }
    });
  }

  at::Tensor scale = at::empty(sshape, x.options().dtype(at::kFloat));
  at::Tensor zero_point = at::empty(sshape, x.options().dtype(at::kInt));
  float* sp = scale.data_ptr<float>();
  int32_t* zp = zero_point.data_ptr<int32_t>();
  for (int64_t g = 0; g < ngroups; ++g) {
    sp[g] = params[g].scale;
    zp[g] = static_cast<int32_t>(params[g].zero_point);
  }
  return {data, scale, zero_point, mean};
}

at::Tensor dequantize_cpu(const at::Tensor& data, const at::Tensor& scale, const at::Tensor& zero_point,
                          const at::Tensor& mean, c10::string_view precision, int64_t block_size,
                          at::ScalarType dtype) {
  const Precision prec = parse_precision(precision);
  TORCH_CHECK(data.scalar_type() == precision_dtype(prec), "dequantize: data for precision '",
              std::string(precision), "' must have dtype ", precision_dtype(prec), ", got ",
              data.scalar_type());
  TORCH_CHECK(data.dim() >= 1, "dequantize: data must have rank >= 1");
  TORCH_CHECK(is_supported_float(dtype), "dequantize: dtype must be float32, float16 or bfloat16, got ",
              dtype);
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "dequantize: scale must be float32, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.dim() <= data.dim(), "dequantize: scale has rank ", scale.dim(),
              " but data has rank ", data.dim());
  check_scale_values(scale, "dequantize", "scale");
  const bool has_zp = zero_point.numel() > 0;
  TORCH_CHECK(!has_zp || zero_point.scalar_type() == at::kInt,
              "dequantize: zero_point must be int32, got ", zero_point.scalar_type());
  TORCH_CHECK(!has_zp || zero_point.sizes() == scale.sizes(),
              "dequantize: zero_point must have the scale's shape ", scale.sizes(), ", got ",
              zero_point.sizes());

  at::Tensor q;  // integer values (int32) or fp8 values (float32), logical shape
  if (prec == Precision::Int4) {
    const at::Tensor b = data.to(at::kInt);
    const at::Tensor lo = ((b & 15) ^ 8) - 8;          // element 2i: low nibble
    const at::Tensor hi = ((at::bitwise_right_shift(b, 4) & 15) ^ 8) - 8;  // element 2i+1: high nibble
    q = at::stack({lo, hi}, -1).flatten(-2);
  } else if (is_fp8(prec)) {
    q = data.to(at::kFloat);
  } else {
    q = data.to(at::kInt);
  }

  // Row groups along dim -2 (per_token / per_block) are expanded to one scale per row.
  at::Tensor s = scale, z = zero_point;
  const int64_t S = q.dim() >= 2 ? q.size(-2) : 1;
  if (scale.dim() >= 2 && q.dim() >= 2 && scale.size(-2) > 1) {
    // One group per row is per_token whatever block_size says (ceil(S / bs) == S > 1
    // only holds for bs == 1 anyway).
    if (scale.size(-2) == S) block_size = 1;
    TORCH_CHECK(block_size >= 1, "dequantize: block_size must be >= 1, got ", block_size);
    const int64_t groups = (S + block_size - 1) / block_size;
    TORCH_CHECK(scale.size(-2) == groups, "dequantize: scale.size(-2) = ", scale.size(-2),
                " does not match ceil(S / block_size) = ", groups, " (S = ", S,
                ", block_size = ", block_size, ")");
    s = scale.repeat_interleave(block_size, -2).narrow(-2, 0, S);
    if (has_zp) z = zero_point.repeat_interleave(block_size, -2).narrow(-2, 0, S);
  }
  TORCH_CHECK(at::is_expandable_to(s.sizes(), q.sizes()), "dequantize: scale of shape ",
              scale.sizes(), " does not broadcast to the data's logical shape ", q.sizes());
  at::Tensor centered = has_zp ? (q - z) : q;
  at::Tensor out = centered.to(at::kFloat) * s;
  if (mean.numel() > 0) {
    TORCH_CHECK(mean.scalar_type() == at::kFloat, "dequantize: mean must be float32, got ",
                mean.scalar_type());
    TORCH_CHECK(at::is_expandable_to(mean.sizes(), q.sizes()), "dequantize: mean of shape ",
                mean.sizes(), " does not broadcast to the data's logical shape ", q.sizes());
    out = out + mean;
  }
  return out.to(dtype).contiguous();
}

}  // namespace cpu
}  // namespace flash_quant
