// Integer <-> float without the quarter-rate conversion unit, for the sm90 kernels (the
// forward's scores and P codes, the pre-pass's Q / K codes). Plain C++ constants.
#pragma once
#include <cstdint>

namespace flash_quant_sm90 {

//: For |i| < 2^22 the bits of i + kFloatOffsetBits, read as fp32, are exactly
//: i + kFloatOffset (1.5 * 2^23); and for |x| < 2^22, x + kFloatOffset rounds x to the
//: nearest integer, ties to even, whose low byte (two's complement) is the low byte of the
//: sum's bits: an INT8 code with no conversion instruction.
constexpr float kFloatOffset = 12582912.f;
constexpr int32_t kFloatOffsetBits = 0x4B400000;

}  // namespace flash_quant_sm90
