// The wgmma shared-memory matrix descriptor's bits (PTX ISA, "Matrix Descriptor Format"):
// plain C++, shared by ptx.cuh (the kernel) and tests/cuda_emu/ptx_emu.h (the CPU
// emulation decodes what the kernel encodes).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FQ_SM90_HOST_DEVICE __host__ __device__
#else
#define FQ_SM90_HOST_DEVICE
#endif

namespace flash_quant_sm90 {

// addr / leading / stride in bytes (14-bit fields counting 16-byte units); swizzle_bytes
// 128 or 64: the layout field's 1 (128-byte swizzle) or 2 (64-byte).
FQ_SM90_HOST_DEVICE constexpr uint64_t descriptor_bits(uint32_t addr, uint32_t leading, uint32_t stride, int swizzle_bytes) {
  const uint64_t layout = swizzle_bytes == 128 ? 1 : 2;
  return (static_cast<uint64_t>(addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((leading & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((stride & 0x3FFFF) >> 4) << 32) | (layout << 62);
}

}  // namespace flash_quant_sm90
