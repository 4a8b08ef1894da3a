// The Hopper (sm_90a) forward kernel: INT8 Q·Kᵀ on wgmma, online softmax in fp32 with
// exp2, P·V on INT8 wgmma (fast preset: int8 P per row and key tile, int8 V per channel)
// or 16-bit wgmma (accurate preset: P rounded to V's 16-bit type).
//
// Structure (docs/hopper.md): one CTA = one producer warpgroup + two consumer
// warpgroups (16-bit P·V) or one (INT8 P·V; CtaShape). One producer thread issues TMA
// loads of the CTA's Q tile (64 rows a consumer warpgroup) and of
// the K / V tiles into a ring of kStages stages, each guarded by a "full" mbarrier (the
// TMA bytes arrived; for K also the tile's K scales, which the producer warp's lanes copy
// into shared memory) and an "empty" one (both consumers are done with the stage). Each
// consumer warpgroup owns 64 query rows and walks all key tiles: S = Q·Kᵀ (int32), the
// online softmax in registers, O += P·V with P fed from registers as the A operand.
// setmaxnreg moves registers from the producer to the consumers.
//
// Register layouts used below (per warp of a warpgroup, lane = 4 g + t): the m64nN
// accumulator register 4 j + e holds row g (e < 2) or g + 8 (e >= 2), column 8 j + 2 t +
// (e & 1). The 16-bit A operand of a k16 step takes the accumulator's pairs unchanged;
// the 8-bit A operand of a k32 step wants row g / g + 8, columns 4 t .. 4 t + 3 and
// 16 + 4 t .. 16 + 4 t + 3, which two quad shuffles per register assemble.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../../precision.h"
#include "float_bits.h"
#include "fwd_params.h"
#include "ptx.cuh"
#include "row_quant.cuh"

namespace flash_quant_sm90 {

constexpr int kThreadsPerWarpgroup = 128;
constexpr int kRegisterFile = 64 * 1024;  // 32-bit registers an SM
constexpr int kProducerRegisters = 24;
constexpr int kMaxConsumerRegisters = 240;

// What the P·V precision sets (fwd_params.h: consumer_warpgroups): the CTA's consumer
// warpgroups and rows, CTAs an SM, the ring's depth (tile i's stage is released when PV(i)
// is done, during step i+1) and the register split. The CTA owns what the launch gave it
// (kLaunchRegisters x kThreads); setmaxnreg.inc blocks until the pool can serve it, so
// consumers x consumer registers + producer registers must stay <= the pool.
template <bool kPvInt8>
struct CtaShape {
  static constexpr int kConsumers = consumer_warpgroups(kPvInt8);
  static constexpr int kRows = rows_per_cta(kPvInt8);
  static constexpr int kThreads = kThreadsPerWarpgroup * (1 + kConsumers);
  static constexpr int kCtasPerSm = kPvInt8 ? 2 : 1;
  static constexpr int kStages = kPvInt8 ? 2 : 3;
  static constexpr int kLaunchRegisters = kRegisterFile / (kThreads * kCtasPerSm) / 8 * 8;  // 168 / 128
  static constexpr int kPool = (1 + kConsumers) * kLaunchRegisters - kProducerRegisters;
  static constexpr int kPoolShare = kPool / kConsumers / 8 * 8;  // (setmaxnreg takes multiples of 8)
  static constexpr int kConsumerRegisters = kPoolShare < kMaxConsumerRegisters ? kPoolShare : kMaxConsumerRegisters;
  static_assert(kConsumers * kConsumerRegisters + kProducerRegisters <= (1 + kConsumers) * kLaunchRegisters,
                "setmaxnreg would deadlock: the register pool cannot serve the consumers");
};
constexpr int kSwizzleRowBytes = 128;                 // one 128-byte swizzle row
constexpr int kSwizzleGroupBytes = 8 * kSwizzleRowBytes;  // 8 rows: one swizzle atom
//: 16-bit V arrives in boxes of 64 channels (one 128-byte swizzle row per key).
constexpr int kV16BoxChannels = 64;
constexpr int kV16BoxBytes = kKeysPerTile * kV16BoxChannels * 2;

// What the tile head dim D sets (kForwardHeadDims: 64 or 128; a call's head dim may be
// smaller, fwd_params.h tile_head_dim). Q / K codes are rows of D bytes,
// 128- or 64-byte swizzled (one swizzle row each); V^T (int8) is D rows of 128 keys; 16-bit
// V is D / 64 boxes; O takes D / 2 accumulator registers a thread (m64nD).
template <int kD>
struct HeadDim {
  static_assert(kD == 64 || kD == 128, "the sm90 kernel covers head dims 64 and 128");
  static constexpr int kQKSwizzle = kD;  // bytes: one int8 row is one swizzle row
  static constexpr int kQKGroupBytes = 8 * kD;
  static constexpr int kKTileBytes = kKeysPerTile * kD;
  static constexpr int kV8TileBytes = kD * kKeysPerTile;
  static constexpr int kV16Boxes = kD / kV16BoxChannels;
  static constexpr int kV16TileBytes = kV16Boxes * kV16BoxBytes;
  static constexpr int kAcc = kD / 2;
};
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
//: INT8 P's largest code (csrc/precision.h; docs/op_contract.md).
constexpr float kPCodeMax = FQ_INT8_QMAX;
// 16-bit P·V: the softmax's reference max moves only when a tile's max exceeds it by more
// than this (log2 units; FA4's conditional rescale). P then stays <= 2^8, which bf16 / fp16
// hold with the same relative precision as P <= 1, and alpha is exactly 1 on most tiles,
// so rescale_o's warp vote skips O's 64 multiplies. A NaN tile max keeps the reference,
// as fmaxf did.
constexpr float kRescaleSlack = 8.f;
//: The producer warp's arrivals on a K barrier: one expect-bytes arrival (TMA) and one per
//: lane after it stored its share of the tile's K scales.
constexpr int kKBarrierArrivals = 1 + 32;
//: The K scales of a tile in shared memory, by the thread that reads them: thread t of a
//: quad holds keys 8j + 2t + e (j < 16, e < 2) in the accumulator layout, so key n goes to
//: slot kKScaleStride * t + 2j + e. A run of 32 slots padded to 36: the four runs' float4
//: loads then fall in different banks.
constexpr int kKScaleStride = 36;
constexpr int kKScaleSlots = 4 * kKScaleStride;
__device__ __forceinline__ int k_scale_slot(int key_in_tile) {
  return kKScaleStride * ((key_in_tile % 8) / 2) + 2 * (key_in_tile / 8) + key_in_tile % 2;
}
// Named barriers 1 and 2 (0 is __syncthreads'): consumer warpgroup w's in-kernel quantized
// Q tile is complete.
constexpr uint32_t kQReadyBarrier = 1;
// Named barrier 3 (16-bit P·V): consumer warpgroup 1 starts its first key tile once
// warpgroup 0 has scored the first half of its own (the stagger, below).
constexpr uint32_t kStaggerBarrier = 3;
constexpr int kStaggerThreads = consumer_warpgroups(false) * kThreadsPerWarpgroup;
static_assert(kStaggerBarrier >= kQReadyBarrier + consumer_warpgroups(false), "named barriers overlap");
//: 16-bit P·V splits a key tile in two halves (Q·Kᵀ m64n64, P·V k16 steps, 8-column blocks).
constexpr int kHalfKeys = kKeysPerTile / 2;
constexpr int kHalfSteps = kHalfKeys / 16;
constexpr int kHalfBlocks = kHalfKeys / 8;

template <bool kPvInt8, int kD>
struct SharedStorage {
  using Dims = HeadDim<kD>;
  using Shape = CtaShape<kPvInt8>;
  static constexpr int kStages = Shape::kStages;
  static constexpr int kQTileBytes = Shape::kRows * kD;
  static constexpr int kVTileBytes = kPvInt8 ? Dims::kV8TileBytes : Dims::kV16TileBytes;
  alignas(1024) int8_t q[kQTileBytes];
  alignas(1024) int8_t k[kStages][Dims::kKTileBytes];
  alignas(1024) uint8_t v[kStages][kVTileBytes];
  // the tile's K scales, written by the producer warp in the order the threads read them
  // (k_scale_slot)
  float k_scale[kStages][kKScaleSlots];
  // Q quantized in the kernel: each row's scale and q · k_mean, from the row's lanes to the
  // threads that hold it in the accumulator layout
  float q_row_scale[Shape::kRows];
  float q_row_dot[Shape::kRows];
  // a scratch word a consumer thread (pin_before_wait)
  float pin[Shape::kConsumers * kThreadsPerWarpgroup];
  uint64_t q_full;
  uint64_t k_full[kStages];
  uint64_t v_full[kStages];
  uint64_t kv_empty[kStages];
};

template <class T>
struct Pack16;
template <>
struct Pack16<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  template <int N>
  static __device__ __forceinline__ void mma(float (&d)[N], const uint32_t (&a)[4], uint64_t b, int acc) {
    wgmma_bf16_rs_tb(d, a, b, acc);
  }
};
template <>
struct Pack16<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  template <int N>
  static __device__ __forceinline__ void mma(float (&d)[N], const uint32_t (&a)[4], uint64_t b, int acc) {
    wgmma_f16_rs_tb(d, a, b, acc);
  }
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The 8-bit A operand of one k32 step from int8 P codes in accumulator layout.
// own[h] holds this thread's codes of key half h (keys 16 h .. 16 h + 15 of the step) for
// one row: bytes 0-1 = columns 2t, 2t+1 of the half's first 8-column block, bytes 2-3 =
// those of its second. Lane t needs keys 4t .. 4t+3 of the half: block t / 2, columns
// from lanes 2 (t & 1) and 2 (t & 1) + 1 of its quad.
__device__ __forceinline__ uint32_t gather_a8(uint32_t own, int lane) {
  const int t = lane & 3;
  const int src = (lane & ~3) | ((t & 1) << 1);
  const uint32_t x = __shfl_sync(0xffffffffu, own, src);
  const uint32_t y = __shfl_sync(0xffffffffu, own, src + 1);
  return __byte_perm(x, y, t < 2 ? 0x5410 : 0x7632);
}

// Scores of one tile in base-2 units without the per-row factor: x' = qk * K scale
// (I2FP.F32.S32, exact for |qk| < 2^24, and one FMUL), masked keys -inf. Returns this
// thread's row maxima of x' through tile_max (not yet reduced over the quad). `ks`: the
// tile's scales in k_scale_slot order, so a thread's 32 are 8 float4 loads. kFirst /
// kBlocks: the tile's 8-column blocks to score (a half tile: acc holds those blocks only;
// x keeps the whole tile's layout).
template <bool kCausal, bool kMask, int kBlocks = 16, int kFirst = 0>
__device__ __forceinline__ void scores(float (&x)[64], const int32_t (&acc)[4 * kBlocks], const float* ks, int t,
                                       int n0, int kv_len, int row0, float (&tile_max)[2]) {
  static_assert(kFirst % 2 == 0 && kFirst + kBlocks <= 16, "whole float4s of K scales, within the tile");
  float4 kscale;
#pragma unroll
  for (int j = kFirst; j < kFirst + kBlocks; ++j) {
    // keys 8j+2t, 8j+2t+1: slots 2j, 2j+1 of this thread's run
    if (j % 2 == 0) kscale = *reinterpret_cast<const float4*>(ks + kKScaleStride * t + 2 * j);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float k = j % 2 == 0 ? (e ? kscale.y : kscale.x) : (e ? kscale.w : kscale.z);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = 4 * j + 2 * r + e;
        float v = __int2float_rn(acc[i - 4 * kFirst]) * k;
        if constexpr (kMask) {
          const int col = n0 + 8 * j + 2 * t + e;
          // (a NaN score stays NaN under the causal mask, as in SDPA: a K row with a NaN
          // scale makes every row NaN; the tail past kv_len holds no key at all)
          if (col >= kv_len || (kCausal && col > row0 + 8 * r && !isnan(v))) v = -INFINITY;
        }
        x[i] = v;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float m = x[4 * kFirst + 2 * r];
#pragma unroll
    for (int j = kFirst; j < kFirst + kBlocks; ++j) m = fmaxf(m, fmaxf(x[4 * j + 2 * r], x[4 * j + 2 * r + 1]));
    tile_max[r] = m;
  }
}

// The online-softmax step of one tile, or of its 8-column blocks kFirst .. kFirst +
// kBlocks - 1 (a half tile, taken as a step of its own), for rows g, g+8 of this thread: P
// in place of x, alpha = the factor on the output so far, beta = the factor on this
// tile's P·V (int8 P is relative to the tile's own row max; 16-bit P to the running max,
// beta = 1).
template <bool kPvInt8, int kBlocks = 16, int kFirst = 0>
__device__ __forceinline__ void softmax_step(float (&x)[64], float (&tile_max)[2], const float (&row_factor)[2],
                                             float (&m_run)[2], float (&l_part)[2], float (&alpha)[2],
                                             float (&beta)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float tm = quad_max(tile_max[r]) * row_factor[r];  // row_factor > 0 (dispatcher)
    // 16-bit P: lazy reference (kRescaleSlack); int8 P: the exact running max
    const float m_new = kPvInt8 ? fmaxf(m_run[r], tm) : (tm > m_run[r] + kRescaleSlack ? tm : m_run[r]);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    alpha[r] = fast_exp2(m_run[r] - m_use);
    const float ref = kPvInt8 ? (tm == -INFINITY ? 0.f : tm) : m_use;
    beta[r] = kPvInt8 ? fast_exp2(tm - m_use) : 1.f;
    float sum = 0.f;
#pragma unroll
    for (int j = kFirst; j < kFirst + kBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = 4 * j + 2 * r + e;
        const float pe = fast_exp2(fmaf(x[i], row_factor[r], -ref));
        sum += pe;
        x[i] = pe;
      }
    }
    l_part[r] = l_part[r] * alpha[r] + beta[r] * sum;
    m_run[r] = m_new;
  }
}

// int8 P codes round(127 p) (p in [0, 1]) in the A-operand layout of four k32 steps.
// kPermuted: V^T's tokens are in the pre-pass's order (Sm90FwdParams::v_keys_permuted),
// where position 4t + i of each 16 holds the key this thread's i-th code is for: the
// thread's own codes are its A fragment, with no shuffle.
template <bool kPermuted>
__device__ __forceinline__ void pack_p8(uint32_t (&a)[4][4], const float (&x)[64], int lane) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j0 = 4 * c + 2 * h;  // the half's first 8-column block
        // the low byte of each float's bits is its code (kFloatOffset)
        const uint32_t c0 = __float_as_uint(fmaf(x[4 * j0 + 2 * r], kPCodeMax, kFloatOffset));
        const uint32_t c1 = __float_as_uint(fmaf(x[4 * j0 + 2 * r + 1], kPCodeMax, kFloatOffset));
        const uint32_t c2 = __float_as_uint(fmaf(x[4 * (j0 + 1) + 2 * r], kPCodeMax, kFloatOffset));
        const uint32_t c3 = __float_as_uint(fmaf(x[4 * (j0 + 1) + 2 * r + 1], kPCodeMax, kFloatOffset));
        const uint32_t own = __byte_perm(__byte_perm(c0, c1, 0x0040), __byte_perm(c2, c3, 0x0040), 0x5410);
        a[c][2 * h + r] = kPermuted ? own : gather_a8(own, lane);
      }
    }
  }
}

// 16-bit P in the A-operand layout of k16 steps kFirst .. kFirst + kSteps - 1 (all eight:
// a whole tile); the accumulator's own pairs.
template <class T, int kSteps = kKeysPerTile / 16, int kFirst = 0>
__device__ __forceinline__ void pack_p16(uint32_t (&a)[kKeysPerTile / 16][4], const float (&x)[64]) {
#pragma unroll
  for (int kk = kFirst; kk < kFirst + kSteps; ++kk) {
#pragma unroll
    for (int q4 = 0; q4 < 4; ++q4) {
      // q4: (block 2kk, row g), (2kk, g+8), (2kk+1, g), (2kk+1, g+8)
      const int base = 4 * (2 * kk + (q4 >> 1)) + 2 * (q4 & 1);
      a[kk][q4] = Pack16<T>::pack(x[base], x[base + 1]);
    }
  }
}

// Q quantized in the kernel (the fused accurate / fast path, head dim 128): warpgroup wg's
// kRowsPerWarpgroup rows of 16-bit Q, rotated and quantized as the pre-pass does
// (row_quant.cuh), the codes stored 128-byte swizzled into its part of the Q tile (the
// layout TMA writes), the scales and q · k_mean into shared memory. Rows past the end
// quantize zeros (their outputs are not stored).
template <class T, TinyDivide kTiny, class Smem>
__device__ __forceinline__ void quantize_q_tile(const Sm90FwdParams& p, Smem& sm, int wg, int tid, int b, int hq,
                                                int hkv, int wg_row0) {
  constexpr int kRowsPerPass = kThreadsPerWarpgroup / kLanesPerRow;
  constexpr int kPasses = kRowsPerWarpgroup / kRowsPerPass;
  const int part = tid % kLanesPerRow;
  const float* center = p.k_center + (static_cast<int64_t>(b) * p.kv_heads + hkv) * kHeadDim + part * kPerLane;
  uint8_t* tile = reinterpret_cast<uint8_t*>(sm.q) + wg * kRowsPerWarpgroup * kHeadDim;
  // every pass's loads first: one round trip to memory, not one a pass
  float y[kPasses][kPerLane];
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int row = wg_row0 + pass * kRowsPerPass + tid / kLanesPerRow;
    const T* src = static_cast<const T*>(p.q) + b * p.q_stride[0] + hq * p.q_stride[1] +
                   static_cast<int64_t>(row) * p.q_stride[2] + part * kPerLane;
    load_row_part<T>(src, row < p.q_len, y[pass]);
  }
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int local = pass * kRowsPerPass + tid / kLanesPerRow;
    uint32_t packed[kPerLane / 4];
    float dot = 0.f;
    const float scale = quantize_row_part<kTiny>(y[pass], part, center, packed, &dot);
#pragma unroll
    for (int c = 0; c < kPerLane / 16; ++c) {
      // 16-byte chunk `chunk` of the row lands at chunk ^ (row & 7) (128-byte swizzle)
      const int chunk = part * (kPerLane / 16) + c;
      *reinterpret_cast<uint4*>(tile + local * kHeadDim + ((chunk ^ (local & 7)) << 4)) =
          make_uint4(packed[4 * c], packed[4 * c + 1], packed[4 * c + 2], packed[4 * c + 3]);
    }
    if (part == 0) {
      sm.q_row_scale[wg * kRowsPerWarpgroup + local] = scale;
      sm.q_row_dot[wg * kRowsPerWarpgroup + local] = dot;
    }
  }
}

template <class T, bool kPvInt8, bool kCausal, int kD, bool kQuantizeQ>
__global__ void __launch_bounds__(CtaShape<kPvInt8>::kThreads, CtaShape<kPvInt8>::kCtasPerSm)
    forward_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ Sm90FwdParams p) {
  static_assert(!kQuantizeQ || kD == kHeadDim, "Q is quantized in the kernel at head dim 128 only (row_quant.cuh)");
  using Dims = HeadDim<kD>;
  constexpr int kAcc = Dims::kAcc;
  using Smem = SharedStorage<kPvInt8, kD>;
  using Shape = CtaShape<kPvInt8>;
  constexpr int kStages = Shape::kStages;
  constexpr int kRowsPerCta = Shape::kRows;
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte alignment for the swizzled tiles (the launcher allocates 1 KB extra)
  const uint32_t raw = smem_addr(smem_raw);
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw + (((raw + 1023u) & ~1023u) - raw));

  // causal calls visit the heavy (late) query blocks first
  const int m_block = kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int hq = blockIdx.y;
  const int b = blockIdx.z;
  const int hkv = hq / (p.q_heads / p.kv_heads);
  const int m0 = m_block * kRowsPerCta;

  // Key tiles this CTA visits: causal rows m0 .. m0+127 see keys <= row, unless the head
  // may hold a non-finite V, where every key is visited (0 · NaN must stay NaN).
  const bool may_skip = kCausal && !(p.nonfinite != nullptr && p.nonfinite[b * p.q_heads + hq] != 0);
  const int kv_end = may_skip ? min(p.kv_len, m0 + kRowsPerCta) : p.kv_len;
  const int n_tiles = kv_end > 0 ? (kv_end + kKeysPerTile - 1) / kKeysPerTile : 0;

  // broadcast from lane 0: ptxas then knows the value (and every loop bound derived from
  // it) is warp-uniform; a product in flight across a branch it deems divergent makes it
  // serialize every wgmma (C7518)
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kThreadsPerWarpgroup, 0);
  if (threadIdx.x == 0) {
    barrier_init(&sm.q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      barrier_init(&sm.k_full[s], kKBarrierArrivals);
      barrier_init(&sm.v_full[s], 1);
      barrier_init(&sm.kv_empty[s], Shape::kConsumers * kThreadsPerWarpgroup);
    }
    barrier_init_fence();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ------------------------------------------------------------ producer (warp 0)
    registers_release<kProducerRegisters>();
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    const float* k_scale = p.k_scale + (static_cast<int64_t>(b) * p.kv_heads + hkv) * p.kv_len;
    if (lane == 0) {
      tma_prefetch_map(&tm_k);
      tma_prefetch_map(&tm_v);
      if constexpr (!kQuantizeQ) {
        tma_prefetch_map(&tm_q);
        barrier_expect_bytes(&sm.q_full, Smem::kQTileBytes);
        tma_load_4d(sm.q, &tm_q, &sm.q_full, 0, m0, hq, b);
      }
    }
    for (int it = 0; it < n_tiles; ++it) {
      const int s = it % kStages;
      const uint32_t phase = (it / kStages) & 1;
      barrier_wait(&sm.kv_empty[s], phase ^ 1);
      const int n0 = it * kKeysPerTile;
      if (lane == 0) {
        barrier_expect_bytes(&sm.k_full[s], Dims::kKTileBytes);
        tma_load_4d(sm.k[s], &tm_k, &sm.k_full[s], 0, n0, hkv, b);
        if constexpr (kPvInt8) {
          barrier_expect_bytes(&sm.v_full[s], Dims::kV8TileBytes);
          tma_load_4d(sm.v[s], &tm_v, &sm.v_full[s], n0, 0, hkv, b);  // V^T: tokens innermost
        } else {
          barrier_expect_bytes(&sm.v_full[s], Dims::kV16TileBytes);
#pragma unroll
          for (int box = 0; box < Dims::kV16Boxes; ++box) {
            tma_load_4d(sm.v[s] + box * kV16BoxBytes, &tm_v, &sm.v_full[s], box * kV16BoxChannels, n0, hkv, b);
          }
        }
      }
      // the tile's K scales (keys past the end: 0, masked by the consumers)
#pragma unroll
      for (int i = 0; i < kKeysPerTile / 32; ++i) {
        const int key = n0 + i * 32 + lane;
        const float ks = key < p.kv_len ? k_scale[key] : 0.f;
        // an infinite scale makes every score of its key NaN, as the float-bits form of
        // the scores did (qk * inf alone would give a row -inf and drop the key)
        sm.k_scale[s][k_scale_slot(i * 32 + lane)] = isinf(ks) ? NAN : ks;
      }
      barrier_arrive(&sm.k_full[s]);
    }
    return;
  }

  // -------------------------------------------------------------- consumers
  registers_claim<Shape::kConsumerRegisters>();
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x % kThreadsPerWarpgroup;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int wg_row0 = m0 + wg * kRowsPerWarpgroup;
  const int row[2] = {wg_row0 + warp * 16 + g, wg_row0 + warp * 16 + g + 8};
  // this warpgroup's own causal limit: its rows see keys below its last row + 1; tiles from
  // n_active on are waited for and released without computing
  auto active_tiles = [&](int first_row) {  // (of the warpgroup whose rows start at first_row)
    const int key_end = may_skip ? min(p.kv_len, first_row + kRowsPerWarpgroup) : p.kv_len;
    return min(n_tiles, key_end > 0 ? (key_end + kKeysPerTile - 1) / kKeysPerTile : 0);
  };
  const int n_active = active_tiles(wg_row0);

  // this thread's rows within the CTA's tile (the in-kernel Q's shared scales)
  const int tile_row[2] = {row[0] - m0, row[1] - m0};
  if constexpr (kQuantizeQ) {
    // (the division form by P·V precision: row_quant.cuh TinyDivide, a measured choice)
    quantize_q_tile<T, kPvInt8 ? TinyDivide::kLifted : TinyDivide::kPerElement>(p, sm, wg, tid, b, hq, hkv, wg_row0);
    fence_proxy_async();  // the codes, stored st.shared, are read by wgmma
    named_barrier_sync(kQReadyBarrier + wg, kThreadsPerWarpgroup);
  } else {
    barrier_wait(&sm.q_full, 0);
  }
  const float* q_scale = kQuantizeQ ? nullptr : p.q_scale + (static_cast<int64_t>(b) * p.q_heads + hq) * p.q_len;
  auto row_scale = [&](int r) { return kQuantizeQ ? sm.q_row_scale[tile_row[r]] : q_scale[row[r]]; };
  // per-row factor: Q scale * softmax scale * log2(e) (scores in base-2 units)
  float row_factor[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) row_factor[r] = row[r] < p.q_len ? row_scale(r) * p.softmax_scale * kLog2e : 0.f;

  float o[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_part[2] = {0.f, 0.f};  // this thread's share of the row sums (quad-summed at the end)
  // softmax factors of the newest tile: int8 P·V folds them in when that tile's P·V is
  // done (before the next softmax overwrites them); 16-bit P·V rescales O at once
  float alpha[2], beta[2];

  const int8_t* q_tile = sm.q + wg * (kRowsPerWarpgroup * kD);

  // Pipelines: the 16-bit P·V path in half tiles (half_step), the int8 one a tile at a
  // time (below the 16-bit path).
  int32_t acc_s[64];
  float x[64];
  uint32_t pa8[4][4];
  uint32_t pa16[kKeysPerTile / 16][4];
  int32_t acc_pv[kAcc];
  int32_t acc_half[2][kHalfBlocks * 4];  // 16-bit P·V: the two half tiles' Q·Kᵀ
  float tile_max[2];

  // Descriptors: built once, then moved by byte offsets (the start address field counts
  // 16-byte units; every tile lies in the 256 KB the field covers, so adds never carry out).
  const uint64_t q_desc = swizzled_descriptor<Dims::kQKSwizzle>(q_tile, 0, Dims::kQKGroupBytes);
  const uint64_t k_desc0 = swizzled_descriptor<Dims::kQKSwizzle>(sm.k[0], 0, Dims::kQKGroupBytes);
  const uint64_t v_desc0 = kPvInt8 ? sw128_descriptor(sm.v[0], 0, kSwizzleGroupBytes)
                                   : sw128_descriptor(sm.v[0], kV16BoxBytes, kSwizzleGroupBytes);
  auto moved = [](uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); };
  auto issue_qk = [&](int s) {
    const uint64_t k_desc = moved(k_desc0, s * Dims::kKTileBytes);
#pragma unroll
    for (int kk = 0; kk < kD / 32; ++kk) {
      wgmma_s8_ss(acc_s, moved(q_desc, kk * 32), moved(k_desc, kk * 32), kk > 0);
    }
  };
  // 16-bit P·V: Q·Kᵀ and P·V of a tile in halves of kHalfKeys keys (acc_half[h]; P·V
  // k16 steps of the half) so that one half's softmax overlaps the other half's products
  auto issue_qk_half = [&](int s, int h) {
    const uint64_t k_desc = moved(k_desc0, s * Dims::kKTileBytes + h * kHalfKeys * kD);
#pragma unroll
    for (int kk = 0; kk < kD / 32; ++kk) {
      wgmma_s8_ss(acc_half[h], moved(q_desc, kk * 32), moved(k_desc, kk * 32), kk > 0);
    }
  };
  auto issue_pv_half = [&](int s, int h) {
    const uint64_t v_desc = moved(v_desc0, s * Smem::kVTileBytes);
#pragma unroll
    for (int kk = h * kHalfSteps; kk < (h + 1) * kHalfSteps; ++kk) {
      Pack16<T>::mma(o, pa16[kk], moved(v_desc, kk * 16 * kSwizzleRowBytes), 1);
    }
  };
  auto issue_pv8 = [&](int s) {  // int8 P·V: a fresh int32 accumulator a tile
    const uint64_t v_desc = moved(v_desc0, s * Smem::kVTileBytes);
#pragma unroll
    for (int c = 0; c < 4; ++c) wgmma_s8_rs(acc_pv, pa8[c], moved(v_desc, c * 32), c > 0);
  };
  // O <- O * alpha + (int32 P·V) * beta / 127 (the int8 path; bit trick of kFloatOffset)
  auto fold_pv8 = [&]() {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      const int r = (i >> 1) & 1;
      const float w = beta[r] * (1.f / kPCodeMax);
      o[i] = fmaf(__int_as_float(acc_pv[i] + kFloatOffsetBits), w, fmaf(o[i], alpha[r], -kFloatOffset * w));
    }
  };
  // int8 P·V: the softmax of a whole tile; `full`: no key of the tile is masked (past the
  // end, or past a row's causal limit). The 16-bit path runs masked and unmasked tiles in
  // separate loops instead (softmax_half): a branch between the two with a product in
  // flight makes ptxas retire the product before it, losing the overlap.
  auto softmax_tile = [&](int s, int n0, bool full) {
    if (full) {
      scores<kCausal, false>(x, acc_s, sm.k_scale[s], t, n0, p.kv_len, row[0], tile_max);
    } else {
      scores<kCausal, true>(x, acc_s, sm.k_scale[s], t, n0, p.kv_len, row[0], tile_max);
    }
    softmax_step<true>(x, tile_max, row_factor, m_run, l_part, alpha, beta);
  };
  using Masked = std::true_type;
  using Unmasked = std::false_type;
  // leading tiles with no masked key: below the sequence end and, causal, wholly at or
  // below this warpgroup's first row (also where a non-finite head visits the tiles past
  // its diagonal: those are masked, P = 0, and only 0 · inf / NaN may reach O from them)
  int n_full = p.kv_len / kKeysPerTile;
  if (kCausal) n_full = min(n_full, (wg_row0 + 1) / kKeysPerTile);
  n_full = min(n_full, n_active);

  auto rescale_o = [&]() {
    // after the first tiles a row's max rarely moves: skip the rescale when no row of the
    // warp needs it (alpha == 1 exactly)
    if (!__all_sync(0xffffffffu, alpha[0] == 1.f && alpha[1] == 1.f)) {
#pragma unroll
      for (int i = 0; i < kAcc; ++i) o[i] *= alpha[(i >> 1) & 1];
    }
  };
  if constexpr (!kPvInt8) {
    // 16-bit P·V, per tile i in two halves a, b of kHalfKeys keys (QKa(i) = Q·Kᵀ of half a
    // of tile i, PVb(i-1) = P·V of half b of tile i-1), one product group in flight while a
    // half's softmax runs:
    //   wait PVa(i-1), rescale O for half b(i-1); issue QKa(i), PVb(i-1), QKb(i);
    //   wait QKa(i): softmax a(i) (PVb(i-1), QKb(i) run); pack P a(i);
    //   wait all: release tile i-1, rescale O for half a(i); issue PVa(i): softmax b(i); pack P b(i).
    // O is rescaled only where no product writes it. Masked tiles run in their own loop.
    auto softmax_half = [&](int s, int n0, int h, auto mask) {
      constexpr bool kM = decltype(mask)::value;
      if (h == 0) {
        scores<kCausal, kM, kHalfBlocks, 0>(x, acc_half[0], sm.k_scale[s], t, n0, p.kv_len, row[0], tile_max);
        softmax_step<false, kHalfBlocks, 0>(x, tile_max, row_factor, m_run, l_part, alpha, beta);
      } else {
        scores<kCausal, kM, kHalfBlocks, kHalfBlocks>(x, acc_half[1], sm.k_scale[s], t, n0, p.kv_len, row[0],
                                                       tile_max);
        softmax_step<false, kHalfBlocks, kHalfBlocks>(x, tile_max, row_factor, m_run, l_part, alpha, beta);
      }
    };
    auto half_step = [&](int it, auto mask) {
      const int s = it % kStages;
      const int sp = (it - 1) % kStages;
      const int n0 = it * kKeysPerTile;
      wgmma_wait<0>();  // PVa(i-1)
      wgmma_fence_operands(o);
      rescale_o();  // for half b of tile i-1
      barrier_wait(&sm.k_full[s], (it / kStages) & 1);
      wgmma_fence();
      issue_qk_half(s, 0);
      wgmma_commit();
      issue_pv_half(sp, 1);
      wgmma_commit();
      issue_qk_half(s, 1);
      wgmma_commit();
      wgmma_wait<2>();
      wgmma_fence_operands(acc_half[0]);
      softmax_half(s, n0, 0, mask);
      pack_p16<T, kHalfSteps, 0>(pa16, x);
      pin_before_wait(&sm.pin[tid + wg * kThreadsPerWarpgroup], l_part[0] + l_part[1]);
      wgmma_wait<0>();
      wgmma_fence_operands(o);
      wgmma_fence_operands(acc_half[1]);
      barrier_arrive(&sm.kv_empty[sp]);
      rescale_o();  // for half a of tile i
      barrier_wait(&sm.v_full[s], (it / kStages) & 1);
      wgmma_fence();
      issue_pv_half(s, 0);
      wgmma_commit();
      softmax_half(s, n0, 1, mask);
      pack_p16<T, kHalfSteps, kHalfSteps>(pa16, x);
      wgmma_fence_operands(x);
    };
    // The stagger: warpgroup 1 starts half a key tile after warpgroup 0, and the two stay
    // that far apart (they share the ring, which lets one run up to a stage ahead). Started
    // together, both run their softmax at the same time on the same schedulers and
    // exponential units while the tensor cores idle, then both wait on products (measured:
    // the two softmaxes overlapped 84 % of the time); offset, one's softmax runs beside the
    // other's products. H100, sessions 11-12: 2-9 % faster kernel-only (docs/hopper.md).
    // Warpgroup 0 always has a tile (its first row sees key 0, and launch_forward rejects
    // kv_len < 1), so its arrival below is never skipped. (An arrival on a path without
    // a tile, as an else branch, made ptxas serialize every wgmma: C7515.)
    if (wg == 1) named_barrier_sync(kStaggerBarrier, kStaggerThreads);
    if (n_active > 0) {
      // tile 0: as a step, with no tile before it (O is 0: no rescale)
      barrier_wait(&sm.k_full[0], 0);
      wgmma_fence();
      issue_qk_half(0, 0);
      wgmma_commit();
      issue_qk_half(0, 1);
      wgmma_commit();
      wgmma_wait<1>();
      wgmma_fence_operands(acc_half[0]);
      if (n_full > 0) {
        softmax_half(0, 0, 0, Unmasked{});
      } else {
        softmax_half(0, 0, 0, Masked{});
      }
      pack_p16<T, kHalfSteps, 0>(pa16, x);
      wgmma_wait<0>();
      wgmma_fence_operands(acc_half[1]);
      if (wg == 0) named_barrier_arrive(kStaggerBarrier, kStaggerThreads);
      barrier_wait(&sm.v_full[0], 0);
      wgmma_fence_operands(o);
      wgmma_fence();
      issue_pv_half(0, 0);
      wgmma_commit();
      if (n_full > 0) {
        softmax_half(0, 0, 1, Unmasked{});
      } else {
        softmax_half(0, 0, 1, Masked{});
      }
      pack_p16<T, kHalfSteps, kHalfSteps>(pa16, x);
    }
    for (int it = 1; it < n_full; ++it) half_step(it, Unmasked{});
    for (int it = max(1, n_full); it < n_active; ++it) half_step(it, Masked{});
    wgmma_wait<0>();  // (on every path: ptxas cannot tell that the loops ran only if n_active > 0)
    wgmma_fence_operands(o);
    if (n_active > 0) {  // P·V of the last tile's half b
      const int sp = (n_active - 1) % kStages;
      rescale_o();
      wgmma_fence();
      issue_pv_half(sp, 1);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(o);
      barrier_arrive(&sm.kv_empty[sp]);
    }
  } else {
    // (two copies of the loop, V^T in the pre-pass's token order or not: a branch on it
    // inside the loop would split the P packing into basic blocks)
    auto pv8_loop = [&](auto permuted) {
      // int8 P·V, per tile i after the first: issue PV(i-1), wait, fold it into O; issue QK(i),
      // wait; softmax(i); pack P(i). One product in flight at a time: the int32 P·V
      // accumulator (64 registers) and S are never live together; the other CTA on the SM
      // keeps the tensor cores busy meanwhile (CtaShape).
      if (n_active > 0) {  // tile 0
        barrier_wait(&sm.k_full[0], 0);
        wgmma_fence();
        issue_qk(0);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(acc_s);
        softmax_tile(0, 0, n_full > 0);
        pack_p8<decltype(permuted)::value>(pa8, x, lane);
      }
      // (no product is in flight across the mask branch here, and one loop keeps the
      // register pressure of this path below the spill point)
      for (int it = 1; it < n_active; ++it) {
        const int s = it % kStages;
        const int sp = (it - 1) % kStages;
        barrier_wait(&sm.k_full[s], (it / kStages) & 1);
        barrier_wait(&sm.v_full[sp], ((it - 1) / kStages) & 1);
        wgmma_fence();
        issue_pv8(sp);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(acc_pv);
        barrier_arrive(&sm.kv_empty[sp]);
        fold_pv8();
        wgmma_fence_operands(o);
        wgmma_fence();
        issue_qk(s);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(acc_s);
        softmax_tile(s, it * kKeysPerTile, it < n_full);
        pack_p8<decltype(permuted)::value>(pa8, x, lane);
      }
      if (n_active > 0) {  // P·V of the last tile
        const int sp = (n_active - 1) % kStages;
        barrier_wait(&sm.v_full[sp], ((n_active - 1) / kStages) & 1);
        wgmma_fence_operands(o);
        wgmma_fence();
        issue_pv8(sp);
        wgmma_commit();
        wgmma_wait<0>();
        barrier_arrive(&sm.kv_empty[sp]);
        wgmma_fence_operands(acc_pv);
        fold_pv8();
      }
    };
    if (p.v_keys_permuted) {
      pv8_loop(std::true_type{});
    } else {
      pv8_loop(std::false_type{});
    }
  }
  // tiles past this warpgroup's causal limit: wait (so no warpgroup runs a ring ahead and
  // arrives twice on one phase) and release
  for (int it = n_active; it < n_tiles; ++it) {
    const int s = it % kStages;
    const uint32_t phase = (it / kStages) & 1;
    barrier_wait(&sm.k_full[s], phase);
    barrier_wait(&sm.v_full[s], phase);
    barrier_arrive(&sm.kv_empty[s]);
  }

  // -------------------------------------------------------------- epilogue
  // The tensors' head dim D <= kD: channels D .. kD-1 of the tile came in as TMA's zero
  // fill and are neither read from global memory nor stored.
  const int D = p.head_dim;
  const float* v_scale = kPvInt8 ? p.v_scale + (static_cast<int64_t>(b) * p.kv_heads + hkv) * D : nullptr;
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.q_heads + hq) * p.q_len * D;
  const int8_t* q_codes = static_cast<const int8_t*>(p.q);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_part[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    // lse (natural log) of the smoothed scores, plus scale · q · k_mean when K was smoothed
    float mean_term = 0.f;
    if constexpr (kQuantizeQ) {
      mean_term = sm.q_row_dot[tile_row[r]] * p.softmax_scale;
    } else if (p.lse_shift != nullptr) {
      if (row[r] < p.q_len) {
        mean_term = p.lse_shift[(static_cast<int64_t>(b) * p.q_heads + hq) * p.q_len + row[r]] * p.softmax_scale;
      }
    } else if (p.k_mean != nullptr) {
      const float* km = p.k_mean + (static_cast<int64_t>(b) * p.kv_heads + hkv) * D;
      float part = 0.f;
      if (row[r] < p.q_len) {
        const int8_t* qrow = q_codes + b * p.q_stride[0] + hq * p.q_stride[1] + row[r] * p.q_stride[2];
        const int d_end = min(D, (t + 1) * (kD / 4));
#pragma unroll 4
        for (int d = t * (kD / 4); d < d_end; ++d) part += static_cast<float>(qrow[d]) * km[d];
      }
      mean_term = quad_sum(part) * (row[r] < p.q_len ? row_scale(r) : 0.f) * p.softmax_scale;
    }
    if (row[r] >= p.q_len) continue;
    if (t == 0) {
      const float m_use = m_run[r] == -INFINITY ? 0.f : m_run[r];
      p.lse[(static_cast<int64_t>(b) * p.q_heads + hq) * p.q_len + row[r]] =
          l > 0.f ? (m_use + log2f(l)) * kLn2 + mean_term : -INFINITY;
    }
    T* orow = out + static_cast<int64_t>(row[r]) * D;
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      if (8 * j >= D) break;  // (D is a multiple of 16: a block of 8 is wholly inside or past it)
      const int col = 8 * j + 2 * t;
      float v0 = o[4 * j + 2 * r] * inv;
      float v1 = o[4 * j + 2 * r + 1] * inv;
      if constexpr (kPvInt8) {
        v0 *= v_scale[col];
        v1 *= v_scale[col + 1];
      }
      *reinterpret_cast<uint32_t*>(orow + col) = Pack16<T>::pack(v0, v1);
    }
  }
}

}  // namespace flash_quant_sm90
