// The Hopper (sm_90a) forward kernel: INT8 Q·Kᵀ on wgmma, online softmax in fp32 with
// exp2, P·V on INT8 wgmma (fast preset: int8 P per row and key tile, int8 V per channel)
// or 16-bit wgmma (accurate preset: P rounded to V's 16-bit type).
//
// Structure (docs/hopper.md): one CTA = one producer warpgroup + two consumer
// warpgroups. One producer thread issues TMA loads of the CTA's Q tile (128 rows) and of
// the K / V tiles into a ring of kStages stages, each guarded by a "full" mbarrier (the
// TMA bytes arrived) and an "empty" one (both consumers are done with the stage). Each
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

#include "fwd_params.h"
#include "ptx.cuh"

namespace flash_quant_sm90 {

constexpr int kStages = 2;
constexpr int kThreadsPerWarpgroup = 128;
constexpr int kThreads = kThreadsPerWarpgroup * (1 + kConsumerWarpgroups);
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;
constexpr int kSwizzleRowBytes = 128;                 // one 128-byte swizzle row
constexpr int kSwizzleGroupBytes = 8 * kSwizzleRowBytes;  // 8 rows: one swizzle atom
constexpr int kQTileBytes = kRowsPerCta * kHeadDim;          // int8
constexpr int kKTileBytes = kKeysPerTile * kHeadDim;         // int8
constexpr int kV8TileBytes = kHeadDim * kKeysPerTile;        // int8, K-major (V^T)
constexpr int kV16HalfBytes = kKeysPerTile * 64 * 2;         // 64 channels of 16-bit V
constexpr int kV16TileBytes = 2 * kV16HalfBytes;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
//: INT8 P's largest code (flash_quant Precision.INT8.qmax; docs/op_contract.md).
constexpr float kPCodeMax = 127.f;

template <bool kPvInt8>
struct SharedStorage {
  static constexpr int kVTileBytes = kPvInt8 ? kV8TileBytes : kV16TileBytes;
  alignas(1024) int8_t q[kQTileBytes];
  alignas(1024) int8_t k[kStages][kKTileBytes];
  alignas(1024) uint8_t v[kStages][kVTileBytes];
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
  static __device__ __forceinline__ void mma(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int acc) {
    wgmma_bf16_rs_tb(d, a, b, acc);
  }
};
template <>
struct Pack16<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int acc) {
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

template <class T, bool kPvInt8, bool kCausal>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ Sm90FwdParams p) {
  using Smem = SharedStorage<kPvInt8>;
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte alignment for the swizzled tiles (the launcher allocates 1 KB extra)
  const uint32_t raw = smem_addr(smem_raw);
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw + (((raw + 1023u) & ~1023u) - raw));

  // causal calls visit the heavy (late) query blocks first
  const int m_block = kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int hq = blockIdx.y;
  const int b = blockIdx.z;
  const int group = p.q_heads / p.kv_heads;
  const int hkv = hq / group;
  const int m0 = m_block * kRowsPerCta;

  // Key tiles this CTA visits: causal rows m0 .. m0+127 see keys <= row, unless the head
  // may hold a non-finite V, where every key is visited (0 · NaN must stay NaN).
  const bool may_skip = kCausal && !(p.nonfinite != nullptr && p.nonfinite[b * p.q_heads + hq] != 0);
  const int kv_end = may_skip ? min(p.kv_len, m0 + kRowsPerCta) : p.kv_len;
  const int n_tiles = kv_end > 0 ? (kv_end + kKeysPerTile - 1) / kKeysPerTile : 0;

  const int warpgroup = threadIdx.x / kThreadsPerWarpgroup;
  if (threadIdx.x == 0) {
    barrier_init(&sm.q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      barrier_init(&sm.k_full[s], 1);
      barrier_init(&sm.v_full[s], 1);
      barrier_init(&sm.kv_empty[s], kConsumerWarpgroups * kThreadsPerWarpgroup);
    }
    barrier_init_fence();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ------------------------------------------------------------ producer
    registers_release<kProducerRegisters>();
    if (threadIdx.x == 0) {
      tma_prefetch_map(&tm_q);
      tma_prefetch_map(&tm_k);
      tma_prefetch_map(&tm_v);
      barrier_expect_bytes(&sm.q_full, kQTileBytes);
      tma_load_4d(sm.q, &tm_q, &sm.q_full, 0, m0, hq, b);
      for (int it = 0; it < n_tiles; ++it) {
        const int s = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        barrier_wait(&sm.kv_empty[s], phase ^ 1);
        const int n0 = it * kKeysPerTile;
        barrier_expect_bytes(&sm.k_full[s], kKTileBytes);
        tma_load_4d(sm.k[s], &tm_k, &sm.k_full[s], 0, n0, hkv, b);
        if constexpr (kPvInt8) {
          barrier_expect_bytes(&sm.v_full[s], kV8TileBytes);
          tma_load_4d(sm.v[s], &tm_v, &sm.v_full[s], n0, 0, hkv, b);  // V^T: tokens innermost
        } else {
          barrier_expect_bytes(&sm.v_full[s], kV16TileBytes);
          tma_load_4d(sm.v[s], &tm_v, &sm.v_full[s], 0, n0, hkv, b);
          tma_load_4d(sm.v[s] + kV16HalfBytes, &tm_v, &sm.v_full[s], 64, n0, hkv, b);
        }
      }
    }
    return;
  }

  // -------------------------------------------------------------- consumers
  registers_claim<kConsumerRegisters>();
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x % kThreadsPerWarpgroup;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int wg_row0 = m0 + wg * kRowsPerWarpgroup;
  const int row[2] = {wg_row0 + warp * 16 + g, wg_row0 + warp * 16 + g + 8};
  // this warpgroup's own causal limit: its rows see keys < wg_key_end
  const int wg_key_end = may_skip ? min(p.kv_len, wg_row0 + kRowsPerWarpgroup) : p.kv_len;

  const float* q_scale = p.q_scale + (static_cast<int64_t>(b) * p.q_heads + hq) * p.q_len;
  const float* k_scale = p.k_scale + (static_cast<int64_t>(b) * p.kv_heads + hkv) * p.kv_len;
  // per-row factor: Q scale * softmax scale * log2(e) (scores in base-2 units)
  float row_factor[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) row_factor[r] = row[r] < p.q_len ? q_scale[row[r]] * p.softmax_scale * kLog2e : 0.f;

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_part[2] = {0.f, 0.f};  // this thread's share of the row sums (quad-summed at the end)

  const int8_t* q_tile = sm.q + wg * (kRowsPerWarpgroup * kHeadDim);
  barrier_wait(&sm.q_full, 0);

  for (int it = 0; it < n_tiles; ++it) {
    const int s = it % kStages;
    const uint32_t phase = (it / kStages) & 1;
    const int n0 = it * kKeysPerTile;
    // every consumer waits on every tile, computing or not, so that no warpgroup runs a
    // full ring ahead and arrives twice on one phase of an empty barrier
    const bool active = n0 < wg_key_end;
    const bool needs_mask = (n0 + kKeysPerTile > p.kv_len) || (kCausal && n0 + kKeysPerTile - 1 > wg_row0);
    barrier_wait(&sm.k_full[s], phase);

    float x[64];  // base-2 scores, accumulator layout
    float alpha[2], beta[2];
    if (active) {
      int32_t acc_s[64];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 32; ++kk) {
        wgmma_s8_ss(acc_s, sw128_descriptor(q_tile + kk * 32, 0, kSwizzleGroupBytes),
                    sw128_descriptor(sm.k[s] + kk * 32, 0, kSwizzleGroupBytes), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(acc_s);

      // scores: int32 · K scale · row factor, masked keys -inf
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + 8 * j + 2 * t + e;
          const float ks = k_scale[min(col, p.kv_len - 1)];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float v = static_cast<float>(acc_s[4 * j + 2 * r + e]) * ks * row_factor[r];
            if (needs_mask && (col >= p.kv_len || (kCausal && col > row[r]))) v = -INFINITY;
            x[4 * j + 2 * r + e] = v;
            tile_max[r] = fmaxf(tile_max[r], v);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = quad_max(tile_max[r]);
        const float m_new = fmaxf(m_run[r], tile_max[r]);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        alpha[r] = exp2f(m_run[r] - m_use);
        if constexpr (kPvInt8) {
          // int8 P relative to the tile's own row max: codes of exp2(x - tile max) in
          // [0, 1]; the tile factor beta = exp2(tile max - running max) goes on P·V
          const float t_use = tile_max[r] == -INFINITY ? 0.f : tile_max[r];
          beta[r] = exp2f(tile_max[r] - m_use);
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < 16; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float pe = exp2f(x[4 * j + 2 * r + e] - t_use);
              sum += pe;
              x[4 * j + 2 * r + e] = pe;
            }
          }
          l_part[r] = l_part[r] * alpha[r] + beta[r] * sum;
        } else {
          beta[r] = 1.f;
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < 16; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float pe = exp2f(x[4 * j + 2 * r + e] - m_use);
              sum += pe;
              x[4 * j + 2 * r + e] = pe;
            }
          }
          l_part[r] = l_part[r] * alpha[r] + sum;
        }
        m_run[r] = m_new;
      }
    }

    barrier_wait(&sm.v_full[s], phase);
    if (active) {
      if constexpr (kPvInt8) {
        // own[r][c][h]: int8 codes of row r, k32 step c, key half h (see gather_a8)
        uint32_t a[4][4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int j0 = 4 * c + 2 * h;  // the half's first 8-column block
              uint32_t own = 0;
#pragma unroll
              for (int bb = 0; bb < 2; ++bb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  const uint32_t code = static_cast<uint32_t>(__float2int_rn(x[4 * (j0 + bb) + 2 * r + e] * kPCodeMax));
                  own |= code << (8 * (2 * bb + e));
                }
              }
              a[c][2 * h + r] = gather_a8(own, lane);
            }
          }
        }
        int32_t acc_pv[64];
        wgmma_fence();
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          wgmma_s8_rs(acc_pv, a[c], sw128_descriptor(sm.v[s] + c * 32, 0, kSwizzleGroupBytes), c > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(acc_pv);
#pragma unroll
        for (int i = 0; i < 64; ++i) {
          const int r = (i >> 1) & 1;
          o[i] = o[i] * alpha[r] + static_cast<float>(acc_pv[i]) * (beta[r] * (1.f / kPCodeMax));
        }
      } else {
        // all A operands first: a register written between two wgmmas of one batch
        // would make the compiler serialise them
        uint32_t a[kKeysPerTile / 16][4];
#pragma unroll
        for (int kk = 0; kk < kKeysPerTile / 16; ++kk) {
#pragma unroll
          for (int q4 = 0; q4 < 4; ++q4) {
            // q4: (block 2kk, row g), (2kk, g+8), (2kk+1, g), (2kk+1, g+8)
            const int base = 4 * (2 * kk + (q4 >> 1)) + 2 * (q4 & 1);
            a[kk][q4] = Pack16<T>::pack(x[base], x[base + 1]);
          }
        }
#pragma unroll
        for (int i = 0; i < 64; ++i) o[i] *= alpha[(i >> 1) & 1];
        wgmma_fence_operands(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kKeysPerTile / 16; ++kk) {
          // 16 keys = two 8-row groups of the MN-major V tile
          Pack16<T>::mma(o, a[kk],
                         sw128_descriptor(sm.v[s] + kk * 16 * kSwizzleRowBytes, kV16HalfBytes, kSwizzleGroupBytes), 1);
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(o);
      }
    }
    barrier_arrive(&sm.kv_empty[s]);
  }

  // -------------------------------------------------------------- epilogue
  const float* v_scale = kPvInt8 ? p.v_scale + (static_cast<int64_t>(b) * p.kv_heads + hkv) * kHeadDim : nullptr;
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.q_heads + hq) * p.q_len * kHeadDim;
  const int8_t* q_codes = static_cast<const int8_t*>(p.q);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_part[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    // lse (natural log) of the smoothed scores, plus scale · q · k_mean when K was smoothed
    float mean_term = 0.f;
    if (p.k_mean != nullptr) {
      const float* km = p.k_mean + (static_cast<int64_t>(b) * p.kv_heads + hkv) * kHeadDim;
      float part = 0.f;
      if (row[r] < p.q_len) {
        const int8_t* qrow = q_codes + b * p.q_stride[0] + hq * p.q_stride[1] + row[r] * p.q_stride[2];
#pragma unroll 4
        for (int d = t * 32; d < t * 32 + 32; ++d) part += static_cast<float>(qrow[d]) * km[d];
      }
      mean_term = quad_sum(part) * (row[r] < p.q_len ? q_scale[row[r]] : 0.f) * p.softmax_scale;
    }
    if (row[r] >= p.q_len) continue;
    if (t == 0) {
      const float m_use = m_run[r] == -INFINITY ? 0.f : m_run[r];
      p.lse[(static_cast<int64_t>(b) * p.q_heads + hq) * p.q_len + row[r]] =
          l > 0.f ? (m_use + log2f(l)) * kLn2 + mean_term : -INFINITY;
    }
    T* orow = out + static_cast<int64_t>(row[r]) * kHeadDim;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
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
