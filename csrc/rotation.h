// The Hadamard rotation of flash_quant::quantize(..., rotate=True), shared by the CPU and
// MPS kernels. Same matrix as flash_quant.rotation.hadamard_matrix(D).
#pragma once

#include <ATen/ATen.h>

namespace flash_quant {

// x @ H along the last dim, in float32 on x's device (any float dtype, any strides; the
// result is contiguous). H is orthonormal and block-diagonal: blocks of size
// D & -D (the largest power of two dividing D), each the Sylvester Hadamard matrix
// (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]) scaled by 1 / sqrt(block).
at::Tensor hadamard_rotate(const at::Tensor& x);

}  // namespace flash_quant
