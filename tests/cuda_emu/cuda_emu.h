// A CPU emulation of the CUDA features csrc/cuda/sm90/prepass.cu uses, so that its kernels
// run in CI (no GPU) against the CPU quantize op (tests/test_sm90_prepass_emulated.py).
// One block at a time, each of its threads a std::thread; __syncthreads and the warp
// shuffles are barriers (a shuffle: every lane writes its value, barrier, reads its
// source lane's, barrier). __shared__ arrays are function statics, shared by the block's
// threads. Float arithmetic is IEEE single precision without contraction (-ffp-contract=off),
// as the kernels' explicit fmaf / __fdiv_rn ask (built with -fno-strict-aliasing: the
// kernels read 16-bit values through 16-byte vectors); nothing here models timing or memory
// ordering beyond the barriers.
#pragma once
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __grid_constant__

struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "ok"; }

struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 x) { uint32_t u = uint32_t(x.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float __half2float(__half x) {
  uint32_t h = x.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) u = sign;
    else { int e = -1; do { e++; man <<= 1; } while (!(man & 0x400)); u = sign | ((127 - 15 - e) << 23) | ((man & 0x3ff) << 13); }
  } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
  else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  float f; std::memcpy(&f, &u, 4); return f;
}
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half2 { __half x, y; };
// float -> bfloat16 / half, round to nearest even (NaN stays NaN)
inline uint16_t emu_f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline uint16_t emu_f2h(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24
    float v;
    std::memcpy(&v, &a, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(v * 16777216.0f)));
  }
  const uint32_t m = a & 0x7fffffu;
  uint32_t h = (((a >> 23) - 112u) << 10) | (m >> 13);
  const uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {{emu_f2bf(a)}, {emu_f2bf(b)}}; }
inline __half2 __floats2half2_rn(float a, float b) { return {{emu_f2h(a)}, {emu_f2h(b)}}; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __int2float_rn(int i) { return static_cast<float>(i); }  // (round to nearest, as the host's default)
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  uint8_t b[8]; std::memcpy(b, &x, 4); std::memcpy(b + 4, &y, 4);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned(b[(s >> (4 * i)) & 7]) << (8 * i);
  return r;
}

// A wait that gives up: an emulated deadlock (a barrier protocol error) must fail the
// test run, not hang it. The condition-variable waits go through here; the thread
// barriers (std::barrier, fast) are covered by emu_launch_smem's per-block watchdog.
#ifndef CUDA_EMU_DEADLINE_S
#define CUDA_EMU_DEADLINE_S 120
#endif
constexpr auto kEmuDeadline = std::chrono::seconds(CUDA_EMU_DEADLINE_S);
template <class Pred>
inline void emu_wait(std::condition_variable& cv, std::unique_lock<std::mutex>& lk, Pred pred, const char* what) {
  if (!cv.wait_for(lk, kEmuDeadline, pred)) {
    std::fprintf(stderr, "cuda_emu: %s did not complete within %lld s: a deadlock in the emulated kernel\n", what,
                 static_cast<long long>(kEmuDeadline.count()));
    std::fflush(stderr);
    std::abort();
  }
}

struct EmuThread { dim3 tid, bid, bdim, gdim; };
inline thread_local EmuThread emu_t;
#define threadIdx (emu_t.tid)
#define blockIdx (emu_t.bid)
#define blockDim (emu_t.bdim)
#define gridDim (emu_t.gdim)

// Shared state of the block being run: barriers, shuffle slots, and what the sm90 forward's
// emulation (ptx_emu.h) keeps per block (dynamic shared memory, mbarriers, named barriers,
// warpgroup staging for wgmma).
struct EmuMbarrier {
  int expected = 0, pending = 0;
  long long tx = 0;
  unsigned phase = 0;  // parity of the phase in progress
};
struct EmuNamedBarrier {
  unsigned arrived = 0, generation = 0;
};
struct EmuBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::unique_ptr<std::barrier<>>> warpgroups;
  std::vector<float> fslot;
  std::atomic<int> and_acc{1};
  std::vector<uint8_t> dynamic_smem;
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint32_t, EmuMbarrier> mbarriers;
  std::map<uint32_t, EmuNamedBarrier> named;
  std::vector<std::vector<float>> wg_f;    // per warpgroup: accumulator staging (64 x 256)
  std::vector<std::vector<uint32_t>> wg_a; // per warpgroup: A-fragment staging
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }
inline bool __syncthreads_and(bool p) {
  if (!p) emu_block->and_acc.store(0);
  emu_block->block->arrive_and_wait();
  const bool r = emu_block->and_acc.load() != 0;
  emu_block->block->arrive_and_wait();
  if (threadIdx.x == 0) emu_block->and_acc.store(1);
  emu_block->block->arrive_and_wait();
  return r;
}
template <class V>
inline V emu_shfl(V v, int src_lane) {
  const int t = threadIdx.x, w = t / 32, lane = t % 32;
  float* slot = emu_block->fslot.data() + w * 32;
  static_assert(sizeof(V) == 4);
  float fv; std::memcpy(&fv, &v, 4);
  slot[lane] = fv;
  emu_block->warps[w]->arrive_and_wait();
  float r = slot[src_lane & 31];
  emu_block->warps[w]->arrive_and_wait();
  V out; std::memcpy(&out, &r, 4); return out;
}
template <class V> inline V __shfl_xor_sync(unsigned, V v, int m) { return emu_shfl(v, (threadIdx.x % 32) ^ m); }
inline bool __all_sync(unsigned, bool p) {
  const int w = threadIdx.x / 32;
  float* slot = emu_block->fslot.data() + w * 32;
  slot[threadIdx.x % 32] = p ? 1.f : 0.f;
  emu_block->warps[w]->arrive_and_wait();
  bool all = true;
  for (int i = 0; i < 32; ++i) all = all && slot[i] != 0.f;
  emu_block->warps[w]->arrive_and_wait();
  return all;
}
template <class V> inline V __shfl_sync(unsigned, V v, int src) { return emu_shfl(v, src); }

template <class F, class... A>
void emu_launch_smem(F kernel, dim3 grid, dim3 block, size_t smem, A... args) {
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        EmuBlock eb;
        eb.block = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w < (n + 31) / 32; ++w) eb.warps.push_back(std::make_unique<std::barrier<>>(32));
        eb.fslot.resize(((n + 31) / 32) * 32);
        for (unsigned g = 0; g < (n + 127) / 128; ++g) {
          eb.warpgroups.push_back(std::make_unique<std::barrier<>>(128));
          eb.wg_f.emplace_back(64 * 256);
          eb.wg_a.emplace_back(64 * 64);
        }
        eb.dynamic_smem.assign(smem, 0);
        emu_block = &eb;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < n; ++t)
          ts.emplace_back([=] { emu_t = {dim3(t), dim3(bx, by, bz), block, grid}; kernel(args...); });
        std::mutex done_mu;
        std::condition_variable done_cv;
        bool done = false;
        std::thread watchdog([&] {
          std::unique_lock<std::mutex> lk(done_mu);
          emu_wait(done_cv, lk, [&] { return done; }, "a thread block");
        });
        for (auto& t : ts) t.join();
        {
          std::lock_guard<std::mutex> lk(done_mu);
          done = true;
        }
        done_cv.notify_all();
        watchdog.join();
      }
}

template <class F, class... A>
void emu_launch(F kernel, dim3 grid, dim3 block, A... args) {
  emu_launch_smem(kernel, grid, block, 0, args...);
}
