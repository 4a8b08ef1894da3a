// Small shared vocabulary of the CPU backend: the precision / granularity / strategy
// names of docs/op_contract.md parsed into enums, and their integer ranges.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <string>

#include "precision.h"

namespace flash_quant {
namespace cpu {

enum class Precision { Int8, Int4, FP8E4M3, FP8E5M2 };
enum class Granularity { PerTensor, PerHead, PerToken, PerBlock, PerChannel };
enum class Strategy { Symmetric, Asymmetric, Legacy };
// Precision of P in P·V (attention_forward's pv_precision).
enum class PvPrecision { None, Int8, FP8E4M3 };

inline Precision parse_precision(c10::string_view s) {
  if (s == "int8") return Precision::Int8;
  if (s == "int4") return Precision::Int4;
  if (s == "fp8_e4m3") return Precision::FP8E4M3;
  if (s == "fp8_e5m2") return Precision::FP8E5M2;
  TORCH_CHECK(false, "flash_quant: precision must be 'int8', 'int4', 'fp8_e4m3' or 'fp8_e5m2', got '",
              std::string(s), "'");
}

inline Granularity parse_granularity(c10::string_view s) {
  if (s == "per_tensor") return Granularity::PerTensor;
  if (s == "per_head") return Granularity::PerHead;
  if (s == "per_token") return Granularity::PerToken;
  if (s == "per_block") return Granularity::PerBlock;
  if (s == "per_channel") return Granularity::PerChannel;
  TORCH_CHECK(false,
              "flash_quant: granularity must be 'per_tensor', 'per_head', 'per_token', "
              "'per_block' or 'per_channel', got '",
              std::string(s), "'");
}

inline Strategy parse_strategy(c10::string_view s) {
  if (s == "symmetric") return Strategy::Symmetric;
  if (s == "asymmetric") return Strategy::Asymmetric;
  if (s == "legacy") return Strategy::Legacy;
  TORCH_CHECK(false, "flash_quant: strategy must be 'symmetric', 'asymmetric' or 'legacy', got '",
              std::string(s), "'");
}

inline PvPrecision parse_pv_precision(c10::string_view s) {
  if (s == "none") return PvPrecision::None;
  if (s == "int8") return PvPrecision::Int8;
  if (s == "fp8_e4m3") return PvPrecision::FP8E4M3;
  TORCH_CHECK(false, "flash_quant: pv_precision must be 'none', 'int8' or 'fp8_e4m3', got '",
              std::string(s), "'");
}

// qmin / qmax of the contract's table (csrc/precision.h; fp8: the largest finite magnitude).
constexpr float precision_qmax(Precision p) {
  switch (p) {
    case Precision::Int8: return FQ_INT8_QMAX;
    case Precision::Int4: return FQ_INT4_QMAX;
    case Precision::FP8E4M3: return FQ_FP8_E4M3_MAX;
    case Precision::FP8E5M2: return FQ_FP8_E5M2_MAX;
  }
  return 0.f;
}
constexpr float precision_qmin(Precision p) {
  switch (p) {
    case Precision::Int8: return FQ_INT8_QMIN;
    case Precision::Int4: return FQ_INT4_QMIN;
    default: return -precision_qmax(p);
  }
}

inline at::ScalarType precision_dtype(Precision p) {
  switch (p) {
    case Precision::Int8: return at::kChar;
    case Precision::Int4: return at::kByte;
    case Precision::FP8E4M3: return at::kFloat8_e4m3fn;
    case Precision::FP8E5M2: return at::kFloat8_e5m2;
  }
  return at::kChar;
}

inline bool is_fp8(Precision p) { return p == Precision::FP8E4M3 || p == Precision::FP8E5M2; }

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Round half to even for |v| <= 2^22, without a libm call: adding 1.5·2^23 leaves no
// fraction bits, so the fp32 addition itself rounds (to nearest even, the default mode);
// the subtraction is exact. (std::nearbyint is a function call per element on baseline
// x86-64, which has no SSE4.1 roundps: it made quantize 5x slower.) Callers clamp first.
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

// Sign-extends the nibble `n` (0..15) to the signed 4-bit value (-8..7).
inline int8_t int4_from_nibble(uint32_t n) { return static_cast<int8_t>((static_cast<int>(n & 0xF) ^ 8) - 8); }

}  // namespace cpu
}  // namespace flash_quant
