// The Hadamard rotation of flash_quant::quantize(..., rotate=True), shared by the CPU and
// MPS kernels. Same matrix as flash_quant.rotation.hadamard_matrix(D).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace flash_quant {

// x @ H along the last dim, in float32 on x's device (any float dtype, any strides; the
// result is contiguous). H is orthonormal and block-diagonal: blocks of size
// D & -D (the largest power of two dividing D), each the Sylvester Hadamard matrix
// (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]) scaled by 1 / sqrt(block).
at::Tensor hadamard_rotate(const at::Tensor& x);

// The same rotation of one row of D values in place (T = float or double), as a fast
// Walsh-Hadamard transform per block: D·log2(block) additions instead of a D × block
// product, and no tensor. The CPU quantize op rotates each row as it reads it with this,
// so no rotated copy of the whole tensor is made. (Float32 results may differ from the
// matrix product's in the last bit: the sums are ordered differently.)
template <typename T>
inline void hadamard_rotate_row(T* row, int64_t D) {
  const int64_t block = D & -D;
  if (block <= 1) return;
  const T inv = T(1) / std::sqrt(static_cast<T>(block));
  for (T* x = row; x < row + D; x += block) {
    // Sylvester order: the butterfly at span h combines the two halves of each 2h run.
    for (int64_t h = 1; h < block; h *= 2) {
      for (int64_t i = 0; i < block; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const T a = x[j], b = x[j + h];
          x[j] = a + b;
          x[j + h] = a - b;
        }
      }
    }
    for (int64_t j = 0; j < block; ++j) x[j] *= inv;
  }
}

}  // namespace flash_quant
