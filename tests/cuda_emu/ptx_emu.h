// (tests/cuda_emu) csrc/cuda/sm90/ptx.cuh's primitives, emulated on the CPU for the sm90
// forward kernel: mbarriers (phases, arrival counts, transaction bytes), TMA tile loads
// (out-of-bounds zero fill, the 128/64/32-byte swizzles as address XORs), named barriers,
// and wgmma as a warpgroup collective computed at issue (the 128 threads stage their
// accumulator / A-fragment registers by the documented layouts, one thread multiplies the
// operands it decodes from the shared-memory descriptors, all read back). The async
// ordering (fence / commit / wait) is therefore not checked; the arithmetic, layouts,
// descriptors and the barrier protocol are.
#pragma once
#include <cfloat>
#include <cstring>

#include "cuda.h"
#include "cuda_emu.h"
#include "descriptor.h"

namespace flash_quant_sm90 {

inline uint8_t* emu_smem() { return emu_block->dynamic_smem.data(); }
inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(static_cast<const uint8_t*>(p) - emu_smem()); }
inline uint32_t emu_swizzle(uint32_t off, int bytes) {
  switch (bytes) {
    case 128: return off ^ (((off >> 7) & 7u) << 4);
    case 64: return off ^ (((off >> 7) & 3u) << 4);
    case 32: return off ^ (((off >> 7) & 1u) << 4);
    default: return off;
  }
}

// ------------------------------------------------------------------ mbarriers
inline void emu_complete_if_done(EmuMbarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    b.phase ^= 1u;
    b.pending = b.expected;
    emu_block->cv.notify_all();
  }
}
inline void barrier_init(uint64_t* bar, uint32_t arrivals) {
  std::lock_guard<std::mutex> lk(emu_block->mu);
  EmuMbarrier& b = emu_block->mbarriers[smem_addr(bar)];
  b.expected = b.pending = static_cast<int>(arrivals);
  b.tx = 0;
  b.phase = 0;
}
inline void barrier_init_fence() {}
inline void barrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  std::lock_guard<std::mutex> lk(emu_block->mu);
  EmuMbarrier& b = emu_block->mbarriers.at(smem_addr(bar));
  b.tx += bytes;
  b.pending -= 1;
  emu_complete_if_done(b);
}
inline void barrier_arrive(uint64_t* bar) {
  std::lock_guard<std::mutex> lk(emu_block->mu);
  EmuMbarrier& b = emu_block->mbarriers.at(smem_addr(bar));
  b.pending -= 1;
  if (b.pending < 0) throw std::runtime_error("mbarrier: more arrivals than the phase expects");
  emu_complete_if_done(b);
}
inline void barrier_wait(uint64_t* bar, uint32_t parity) {
  std::unique_lock<std::mutex> lk(emu_block->mu);
  const uint32_t off = smem_addr(bar);
  emu_wait(emu_block->cv, lk, [&] { return emu_block->mbarriers.at(off).phase != parity; }, "an mbarrier wait");
}

// ------------------------------------------------------------------ named barriers
inline void emu_named(uint32_t id, uint32_t threads, bool wait) {
  std::unique_lock<std::mutex> lk(emu_block->mu);
  EmuNamedBarrier& nb = emu_block->named[id];
  const unsigned gen = nb.generation;
  if (++nb.arrived == threads) {
    nb.arrived = 0;
    nb.generation++;
    emu_block->cv.notify_all();
  } else if (wait) {
    emu_wait(emu_block->cv, lk, [&] { return emu_block->named[id].generation != gen; }, "a named barrier");
  }
}
// (the emulation's wgmma reads shared memory when issued: no proxy to order)
inline void fence_proxy_async() {}
inline void named_barrier_sync(uint32_t id, uint32_t threads) { emu_named(id, threads, true); }
inline void named_barrier_arrive(uint32_t id, uint32_t threads) { emu_named(id, threads, false); }

// ------------------------------------------------------------------ TMA
inline void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
  const CUtensorMap& m = *map;
  const uint32_t base = smem_addr(dst);
  const int c[4] = {c0, c1, c2, c3};
  uint32_t linear = 0;
  for (uint32_t i3 = 0; i3 < m.box[3]; ++i3)
    for (uint32_t i2 = 0; i2 < m.box[2]; ++i2)
      for (uint32_t i1 = 0; i1 < m.box[1]; ++i1)
        for (uint32_t i0 = 0; i0 < m.box[0]; ++i0, linear += m.elem) {
          const long long g[4] = {c[0] + (long long)i0, c[1] + (long long)i1, c[2] + (long long)i2,
                                  c[3] + (long long)i3};
          bool in = true;
          for (int d = 0; d < 4; ++d) in = in && g[d] >= 0 && g[d] < (long long)m.dims[d];
          uint8_t* out = emu_smem() + emu_swizzle(base + linear, m.swizzle);
          if (in) {
            const uint8_t* src = m.base + g[0] * m.elem + g[1] * m.strides[0] + g[2] * m.strides[1] +
                                 g[3] * m.strides[2];
            std::memcpy(out, src, m.elem);
          } else {
            std::memset(out, 0, m.elem);
          }
        }
  std::lock_guard<std::mutex> lk(emu_block->mu);
  EmuMbarrier& b = emu_block->mbarriers.at(smem_addr(bar));
  b.tx -= linear;
  emu_complete_if_done(b);
}
inline void tma_prefetch_map(const CUtensorMap*) {}

// ------------------------------------------------------------------ math, registers
inline float fast_exp2(float x) {
  const float y = exp2f(x);
  return std::fabs(y) < FLT_MIN ? 0.f : y;  // .ftz
}
template <uint32_t kRegs>
inline void registers_release() {}
template <uint32_t kRegs>
inline void registers_claim() {}

// ------------------------------------------------------------------ wgmma
template <int kSwizzleBytes>
inline uint64_t swizzled_descriptor(const void* tile, uint32_t leading, uint32_t stride) {
  return descriptor_bits(smem_addr(tile), leading, stride, kSwizzleBytes);  // the kernel's own encoding
}
inline uint64_t sw128_descriptor(const void* tile, uint32_t leading, uint32_t stride) {
  return swizzled_descriptor<128>(tile, leading, stride);
}
inline void wgmma_fence() {}
inline void wgmma_commit() {}
template <int kPending>
inline void wgmma_wait() {}
template <int N>
inline void wgmma_fence_operands(float (&)[N]) {}
// (a real store: the slot is this thread's scratch word)
inline void pin_before_wait(float* slot, float value) { *slot = value; }
template <int N>
inline void wgmma_fence_operands(int32_t (&)[N]) {}

struct EmuDesc {
  uint32_t start, lbo, sbo;
  int swizzle;
};
inline EmuDesc emu_decode(uint64_t d) {
  static const int kSwizzle[4] = {0, 128, 64, 32};
  return {static_cast<uint32_t>(d & 0x3FFF) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4, kSwizzle[d >> 62]};
}
// K-major operand: element (row, byte k) of 8-row groups `sbo` apart, rows one swizzle row wide.
inline const uint8_t* emu_kmajor(const EmuDesc& d, int row, int kbyte) {
  const uint32_t off = d.start + (row / 8) * d.sbo + (row % 8) * d.swizzle + kbyte;
  return emu_smem() + emu_swizzle(off, d.swizzle);
}
// MN-major 16-bit operand: element (k, n): 64-element column blocks `lbo` apart, 8-row
// groups of k `sbo` apart, 128-byte rows.
inline const uint8_t* emu_mnmajor16(const EmuDesc& d, int k, int n) {
  const uint32_t off = d.start + (n / 64) * d.lbo + (k / 8) * d.sbo + (k % 8) * 128 + (n % 64) * 2;
  return emu_smem() + emu_swizzle(off, d.swizzle);
}
inline float emu_bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return __bfloat162float(__nv_bfloat16{h});
}
inline float emu_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return __half2float(__half{h});
}

// The accumulator layout (m64nN): register 4 j + e of warp w, lane 4 g + t is row
// 16 w + g + 8 (e >> 1), column 8 j + 2 t + (e & 1).
inline void emu_acc_pos(int i, int& row, int& col) {
  const int tid = threadIdx.x % 128, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int j = i / 4, e = i % 4;
  row = 16 * w + g + 8 * (e >> 1);
  col = 8 * j + 2 * t + (e & 1);
}
// A-fragment layout: register r of a k16 (16-bit, 2 values) or k32 (8-bit, 4 values) step:
// rows g / g + 8 (r & 1), k half r >> 1; within it 2 t (16-bit) or 4 t (8-bit) onwards.
inline void emu_a_pos(int r, int elem_bytes, int& row, int& k0) {
  const int tid = threadIdx.x % 128, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  row = 16 * w + g + 8 * (r & 1);
  const int per = 4 / elem_bytes;  // values per register
  k0 = (r >> 1) * (4 * per) + per * t;
}

// kind: 0 = s8 x s8 (A, B K-major), 1 = s8 A regs x s8 B K-major, 2 = bf16 A regs x B MN-major,
// 3 = f16 A regs x B MN-major
template <class Acc, int N>
inline void emu_wgmma(Acc (&d)[N], const uint32_t* a, uint64_t desc_a, uint64_t desc_b, int accumulate, int kind) {
  constexpr int kCols = N * 2;  // m64 x kCols accumulator
  const int wg = threadIdx.x / 128;
  std::vector<float>& acc = emu_block->wg_f[wg];
  std::vector<uint32_t>& areg = emu_block->wg_a[wg];
  const int K = kind <= 1 ? 32 : 16;
  for (int i = 0; i < N; ++i) {
    int r, c;
    emu_acc_pos(i, r, c);
    float v;
    std::memcpy(&v, &d[i], 4);
    acc[r * 256 + c] = v;
  }
  if (a != nullptr) {
    const int eb = kind == 1 ? 1 : 2;
    for (int reg = 0; reg < 4; ++reg) {
      int row, k0;
      emu_a_pos(reg, eb, row, k0);
      for (int v = 0; v < 4 / eb; ++v) {
        areg[row * 64 + k0 + v] = eb == 1 ? ((a[reg] >> (8 * v)) & 0xFFu) : ((a[reg] >> (16 * v)) & 0xFFFFu);
      }
    }
  }
  emu_block->warpgroups[wg]->arrive_and_wait();
  if (threadIdx.x % 128 == 0) {
    const EmuDesc da = emu_decode(desc_a), db = emu_decode(desc_b);
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < kCols; ++n) {
        if (kind <= 1) {
          int32_t s = 0;
          if (accumulate) std::memcpy(&s, &acc[m * 256 + n], 4);
          for (int k = 0; k < K; ++k) {
            const int8_t x = kind == 0 ? static_cast<int8_t>(*emu_kmajor(da, m, k))
                                       : static_cast<int8_t>(areg[m * 64 + k] & 0xFF);
            const int8_t y = static_cast<int8_t>(*emu_kmajor(db, n, k));
            s += int32_t(x) * int32_t(y);
          }
          std::memcpy(&acc[m * 256 + n], &s, 4);
        } else {
          float s = accumulate ? acc[m * 256 + n] : 0.f;
          for (int k = 0; k < K; ++k) {
            const uint16_t bits = static_cast<uint16_t>(areg[m * 64 + k]);
            uint8_t raw[2];
            std::memcpy(raw, &bits, 2);
            const float x = kind == 2 ? emu_bf16(raw) : emu_f16(raw);
            const float y = kind == 2 ? emu_bf16(emu_mnmajor16(db, k, n)) : emu_f16(emu_mnmajor16(db, k, n));
            s = std::fma(x, y, s);
          }
          acc[m * 256 + n] = s;
        }
      }
  }
  emu_block->warpgroups[wg]->arrive_and_wait();
  for (int i = 0; i < N; ++i) {
    int r, c;
    emu_acc_pos(i, r, c);
    std::memcpy(&d[i], &acc[r * 256 + c], 4);
  }
  emu_block->warpgroups[wg]->arrive_and_wait();
}

template <int N>
inline void wgmma_s8_ss(int32_t (&d)[N], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  emu_wgmma(d, nullptr, desc_a, desc_b, accumulate, 0);
}
template <int N>
inline void wgmma_s8_rs(int32_t (&d)[N], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  emu_wgmma(d, a, 0, desc_b, accumulate, 1);
}
template <int N>
inline void wgmma_bf16_rs_tb(float (&d)[N], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  emu_wgmma(d, a, 0, desc_b, accumulate, 2);
}
template <int N>
inline void wgmma_f16_rs_tb(float (&d)[N], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  emu_wgmma(d, a, 0, desc_b, accumulate, 3);
}

}  // namespace flash_quant_sm90
