// The accurate preset's quantization pre-pass (prepass.h): K block means, the centre, and
// the INT8 codes of K (and of Q, unless the forward quantizes Q), in three
// launches with no host work between them. Memory-bound: K is read twice (means, codes),
// Q once; nothing rotated or centred goes to memory. Plain CUDA (any sm_80+ would run it;
// it is built with the sm90 sources).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../../precision.h"
#include "float_bits.h"
#include "prepass.h"
#include "row_quant.cuh"

namespace flash_quant_sm90 {
namespace {

constexpr int kWarp = 32;
//: The codes kernel: kLanesPerRow lanes a row (row_quant.cuh), kRowsPerWarp rows a warp.
constexpr int kRowsPerWarp = kWarp / kLanesPerRow;

//: The means kernel: 16 threads a row (8 channels, one 16-byte load each), 16 rows at once.
constexpr int kMeansThreads = 256;
constexpr int kChannelsPerThread = kValuesPerLoad;
constexpr int kThreadsPerRow = kHeadDim / kChannelsPerThread;
constexpr int kRowsInFlight = kMeansThreads / kThreadsPerRow;
//: Warps per CTA of the codes kernel.
constexpr int kRowWarps = 8;
//: The centre kernel: a CTA takes kCenterChannels channels of one head, kCenterSlices
//: threads a channel (they share the rank selection). Spread over kHeadDim /
//: kCenterChannels CTAs a head, the few hundred comparisons a channel run on as many SMs
//: (one CTA a head took 9.9 us at the Flux shape, H200, session 8).
constexpr int kCenterChannels = 32;
constexpr int kCenterSlices = 16;
constexpr int kCenterSplits = kHeadDim / kCenterChannels;

// Sum of 8 16-bit values into acc (one 16-byte load).
template <class T>
__device__ __forceinline__ void add8(const T* src, float (&acc)[kChannelsPerThread]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kChannelsPerThread; ++i) acc[i] += to_float<T>(v[i]);
}

// max(a, b) that keeps a NaN (fmaxf drops it): a channel's absmax is NaN once any of its
// values is not finite.
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || b != b) ? NAN : fmaxf(a, b); }

// Sum and absmax of 8 16-bit values (V: its finite check and its per-channel scale); an
// inf / NaN value makes that channel's absmax NaN.
template <class T>
__device__ __forceinline__ void add_amax8(const T* src, float (&acc)[kChannelsPerThread],
                                          float (&amax)[kChannelsPerThread]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kChannelsPerThread; ++i) {
    const float x = to_float<T>(v[i]);
    acc[i] += x;
    amax[i] = isfinite(x) ? nan_max(amax[i], fabsf(x)) : NAN;
  }
}

// Grid (blocks, B * Hkv): the float32 mean of each block of keys per channel, and, when
// p.nonfinite is set, whether the block's K or V sums are finite; when p.v_data is set (the
// fast preset), V's absmax per channel over the block.
template <class T>
__global__ void __launch_bounds__(kMeansThreads) key_block_means(PrepassParams p, int rows_per_block, int blocks) {
  __shared__ float partial[kRowsInFlight][kHeadDim];
  __shared__ float vpartial[kRowsInFlight][kHeadDim];
  const int blk = blockIdx.x;
  const int bh = blockIdx.y;
  const int b = bh / p.kv_heads, h = bh % p.kv_heads;
  const int col = (threadIdx.x % kThreadsPerRow) * kChannelsPerThread;
  const int first = blk * rows_per_block;
  const int last = min(first + rows_per_block, p.kv_len);
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1] + col;
  float acc[kChannelsPerThread] = {};
  float vacc[kChannelsPerThread] = {};
#pragma unroll 4
  for (int r = first + threadIdx.x / kThreadsPerRow; r < last; r += kRowsInFlight) {
    add8<T>(k + r * p.k_stride[2], acc);
  }
  float vamax[kChannelsPerThread] = {};
  bool finite = true;
  if (p.nonfinite != nullptr || p.v_data != nullptr) {
    const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1] + col;
#pragma unroll 4
    for (int r = first + threadIdx.x / kThreadsPerRow; r < last; r += kRowsInFlight) {
      add_amax8<T>(v + r * p.v_stride[2], vacc, vamax);
    }
#pragma unroll
    for (int i = 0; i < kChannelsPerThread; ++i) finite = finite && isfinite(acc[i]) && isfinite(vacc[i]);
  }
#pragma unroll
  for (int i = 0; i < kChannelsPerThread; ++i) {
    partial[threadIdx.x / kThreadsPerRow][col + i] = acc[i];
    vpartial[threadIdx.x / kThreadsPerRow][col + i] = vamax[i];
  }
  const bool all_finite = __syncthreads_and(finite);
  if (threadIdx.x < kHeadDim) {
    float sum = 0.f;
#pragma unroll
    for (int g = 0; g < kRowsInFlight; ++g) sum += partial[g][threadIdx.x];
    p.block_means[(static_cast<int64_t>(bh) * blocks + blk) * kHeadDim + threadIdx.x] =
        sum / static_cast<float>(last - first);
    if (p.v_data != nullptr) {
      float m = 0.f;
#pragma unroll
      for (int g = 0; g < kRowsInFlight; ++g) m = nan_max(m, vpartial[g][threadIdx.x]);
      p.v_block_amax[(static_cast<int64_t>(bh) * blocks + blk) * kHeadDim + threadIdx.x] = m;
    }
  }
  if (!all_finite && threadIdx.x == 0 && p.nonfinite != nullptr) {
    // (every query head of the group reads this K / V head; plain stores of 1 race benignly)
    const int group = p.q_heads / p.kv_heads;
    for (int g = 0; g < group; ++g) p.nonfinite[b * p.q_heads + h * group + g] = 1;
  }
}

// Grid (B * Hkv, kCenterSplits), kCenterSlices x kCenterChannels threads: per channel the
// lower median of the block means (as torch.median; NaN if any is NaN) into k_center, and
// the fast preset's V scale (absmax over the block maxima / 127). Each of a channel's
// kCenterSlices threads ranks every kCenterSlices-th block mean against all of them (the
// loads are issued together: this kernel is latency-bound). The rotated centre k_mean is
// not made: its one use, q · k_mean, is taken from the unrotated q and centre (row_quant.cuh).
__global__ void __launch_bounds__(kCenterSlices * kCenterChannels) key_center(PrepassParams p, int blocks) {
  __shared__ float means[kMaxCenterBlocks][kCenterChannels];
  __shared__ int has_nan[kCenterChannels];
  __shared__ float vmax[kCenterSlices][kCenterChannels];
  const int bh = blockIdx.x;
  const int local = threadIdx.x % kCenterChannels;
  const int c = blockIdx.y * kCenterChannels + local;
  const int slice = threadIdx.x / kCenterChannels;
  const float* src = p.block_means + static_cast<int64_t>(bh) * blocks * kHeadDim;
  if (slice == 0) has_nan[local] = 0;
  if (p.v_data != nullptr) {
    const float* vsrc = p.v_block_amax + static_cast<int64_t>(bh) * blocks * kHeadDim;
    float m = 0.f;
    for (int i = slice; i < blocks; i += kCenterSlices) m = nan_max(m, vsrc[i * kHeadDim + c]);
    vmax[slice][local] = m;
  }
  bool nan = false;
#pragma unroll
  for (int i = slice; i < kMaxCenterBlocks; i += kCenterSlices) {
    if (i < blocks) {
      means[i][local] = src[i * kHeadDim + c];
      nan = nan || isnan(means[i][local]);
    }
  }
  __syncthreads();
  if (nan) has_nan[local] = 1;
  if (p.v_data != nullptr && slice == 0) {
    float m = vmax[0][local];
#pragma unroll
    for (int i = 1; i < kCenterSlices; ++i) m = nan_max(m, vmax[i][local]);
    // symmetric INT8 per channel (docs/op_contract.md): absmax / 127, 1 for an all-zero
    // channel; NaN for a channel with an inf / NaN value
    p.v_scale[static_cast<int64_t>(bh) * kHeadDim + c] = m != m ? NAN : (m > 0.f ? __fdiv_rn(m, kQMax) : 1.f);
  }
  // rank selection: the value with (n - 1) / 2 values below it and ties reaching past it
  // (equal values race to the store with the same bits; a NaN anywhere makes it NaN below)
  const int rank = (blocks - 1) / 2;
  float* center = p.k_center + static_cast<int64_t>(bh) * kHeadDim;
  for (int i = slice; i < blocks; i += kCenterSlices) {
    const float m = means[i][local];
    int below = 0, at_or_below = 0;
#pragma unroll 8
    for (int j = 0; j < blocks; ++j) {  // (unrolled: the shared loads overlap)
      below += means[j][local] < m;
      at_or_below += means[j][local] <= m;
    }
    if (below <= rank && rank < at_or_below) center[c] = m;
  }
  __syncthreads();
  if (slice == 0 && has_nan[local]) center[c] = NAN;
}

// kLanesPerRow lanes per row of Q (rows [0, B Hq Sq)) or K (the rows after), kPerLane
// consecutive channels each: subtract K's centre, rotate (the first log2(kPerLane)
// butterfly stages in registers, the last two across the row's lanes), scale = absmax /
// 127 (1 for an all-zero row; NaN for a row with an inf / NaN, so the scores that use it
// are NaN, as SDPA's), codes = round-half-even(y / scale). Rotating x - centre equals the
// general path's rotate(x) - rotate(centre) up to float32 rounding (the rotation is linear).
template <class T>
__global__ void __launch_bounds__(kRowWarps * kWarp) quantize_rows(PrepassParams p) {
  const int lane = threadIdx.x % kWarp;
  const int part = lane % kLanesPerRow;  // which kPerLane channels of the row
  // (32-bit row arithmetic: the host checks that the rows number below 2^31; no Q rows
  // when the forward quantizes Q itself)
  const int q_rows = p.q_data != nullptr ? p.batch * p.q_heads * p.q_len : 0;
  const int all_rows = q_rows + p.batch * p.kv_heads * p.kv_len;
  int row = (blockIdx.x * kRowWarps + threadIdx.x / kWarp) * kRowsPerWarp + lane / kLanesPerRow;
  // Lanes past the last row redo the last row without storing: every lane of the warp
  // must reach the shuffles of quantize_row_part.
  const bool live = row < all_rows;
  if (!live) row = all_rows - 1;
  const bool is_q = row < q_rows;
  const int r = is_q ? row : row - q_rows;
  const int len = is_q ? p.q_len : p.kv_len;
  const int heads = is_q ? p.q_heads : p.kv_heads;
  const int s = r % len;
  const int h = (r / len) % heads;
  const int b = r / (len * heads);
  const int64_t* stride = is_q ? p.q_stride : p.k_stride;
  const T* src = static_cast<const T*>(is_q ? p.q : p.k) + b * stride[0] + h * stride[1] + s * stride[2] +
                 part * kPerLane;
  float y[kPerLane];
  load_row_part<T>(src, true, y);
  if (!is_q) {
    const float* row_center = p.k_center + (static_cast<int64_t>(b) * p.kv_heads + h) * kHeadDim + part * kPerLane;
    const float4* center = reinterpret_cast<const float4*>(row_center);
#pragma unroll
    for (int c = 0; c < kPerLane / 4; ++c) {
      const float4 m4 = center[c];
      y[4 * c] -= m4.x;
      y[4 * c + 1] -= m4.y;
      y[4 * c + 2] -= m4.z;
      y[4 * c + 3] -= m4.w;
    }
  }
  // Q rows: q · k_center for the lse (K rows pass none: quantize_row_part's shuffles sit
  // outside its centre branch, so a warp holding Q and K rows stays converged there)
  const float* center = is_q ? p.k_center + (static_cast<int64_t>(b) * p.kv_heads + h / (p.q_heads / p.kv_heads)) *
                                                kHeadDim + part * kPerLane
                             : nullptr;
  uint32_t packed[kPerLane / 4];
  float dot = 0.f;
  const float scale = quantize_row_part(y, part, center, packed, &dot);
  if (!live) return;
  int8_t* data = (is_q ? p.q_data : p.k_data) + static_cast<int64_t>(r) * kHeadDim + part * kPerLane;
#pragma unroll
  for (int c = 0; c < kPerLane / 16; ++c) {
    reinterpret_cast<uint4*>(data)[c] = make_uint4(packed[4 * c], packed[4 * c + 1], packed[4 * c + 2],
                                                   packed[4 * c + 3]);
  }
  if (part == 0) {
    (is_q ? p.q_scale : p.k_scale)[r] = scale;
    if (is_q) p.q_center_dot[r] = dot;
  }
}

//: The V codes kernel: a CTA quantizes kVTileKeys keys x kHeadDim channels and writes
//: them transposed; kVLanesPerKey threads a key, kVPerLane channels each.
constexpr int kVTileKeys = 64;
constexpr int kVThreads = 256;
constexpr int kVLanesPerKey = kVThreads / kVTileKeys;
constexpr int kVPerLane = kHeadDim / kVLanesPerKey;
constexpr int kVChunk = 16;  // bytes a thread stores at once (one 16-byte vector)
static_assert(kVPerLane % kChannelsPerThread == 0 && kVTileKeys % kVChunk == 0, "V codes tile layout");

// Where token a of a V^T tile goes in the fast preset's V codes (Sm90FwdParams::
// v_keys_permuted): in each group of kVPermutedGroup tokens, the forward's thread t holds
// P for keys 2t, 2t+1 of the group's two 8-key blocks, and the INT8 wgmma's A operand
// gives it positions 4t .. 4t+3 — so key 2t + i of block b sits at 4t + 2b + i, and P
// goes into the wgmma without a shuffle (SageAttention2's token permutation).
__device__ __forceinline__ int v_token_slot(int a) {
  const int within = a % kVPermutedGroup, w = within % 8, block = within / 8;
  return a - within + 4 * (w / 2) + 2 * block + w % 2;
}
static_assert(kVTileKeys % kVPermutedGroup == 0 && kVKeysAlign % kVPermutedGroup == 0,
              "a V codes tile, and the padded buffer, hold whole permuted groups (the forward reads the last whole)");

// Grid (ceil(S / kVTileKeys), B * Hkv): the fast preset's V codes, INT8 per channel with
// p.v_scale (key_center), round-half-even of the correctly rounded quotient (as
// quantize_rows), stored K-major: v_data[b, h, c, s'], s' = s's place in the permuted
// order (v_token_slot). Keys in [S, v_keys_padded) of the last tile get code 0 (their
// values load as 0); a NaN-scale channel gets codes 0 (its output column is NaN through
// the scale).
template <class T>
__global__ void __launch_bounds__(kVThreads) quantize_v_kmajor(PrepassParams p) {
  __shared__ float scale[kHeadDim];
  __shared__ float inv[kHeadDim];
  __shared__ uint8_t tile[kHeadDim][kVTileKeys];
  const int bh = blockIdx.y;
  const int b = bh / p.kv_heads, h = bh % p.kv_heads;
  const int s0 = blockIdx.x * kVTileKeys;
  if (threadIdx.x < kHeadDim) {
    const float sc = p.v_scale[static_cast<int64_t>(bh) * kHeadDim + threadIdx.x];
    scale[threadIdx.x] = sc;
    inv[threadIdx.x] = __fdiv_rn(1.f, sc);
  }
  __syncthreads();
  const int key = threadIdx.x / kVLanesPerKey;
  const int c0 = (threadIdx.x % kVLanesPerKey) * kVPerLane;
  const int s = s0 + key;
  const T* src = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1] + s * p.v_stride[2] + c0;
#pragma unroll
  for (int chunk = 0; chunk < kVPerLane / kChannelsPerThread; ++chunk) {
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (s < p.kv_len) raw = reinterpret_cast<const uint4*>(src)[chunk];
    const T* in = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) {
      const int c = c0 + chunk * kChannelsPerThread + j;
      const float y = to_float<T>(in[j]);
      const float sc = scale[c];
      float q;
      if (sc != sc) {
        q = 0.f;
      } else if (sc < kTinyScale) {
        q = __fdiv_rn(y, sc);
      } else {
        const float r = inv[c];
        q = y * r;
        q = fmaf(fmaf(-q, sc, y), r, q);
      }
      // clamp, then round half to even by the float adder (the code is the low byte)
      const float code = fminf(fmaxf(q, -kQMax), kQMax) + kFloatOffset;
      tile[c][v_token_slot(key)] = static_cast<uint8_t>(__float_as_uint(code) & 0xFF);
    }
  }
  __syncthreads();
  // kHeadDim rows of kVTileKeys codes; each 16-byte piece lies wholly inside or wholly past
  // the padded key dim (both are multiples of 16)
  int8_t* dst = p.v_data + static_cast<int64_t>(bh) * kHeadDim * p.v_keys_padded + s0;
  constexpr int kPiecesPerRow = kVTileKeys / kVChunk;
  for (int piece = threadIdx.x; piece < kHeadDim * kPiecesPerRow; piece += kVThreads) {
    const int c = piece / kPiecesPerRow;
    const int k0 = (piece % kPiecesPerRow) * kVChunk;
    if (s0 + k0 < p.v_keys_padded) {
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(c) * p.v_keys_padded + k0) =
          *reinterpret_cast<const uint4*>(&tile[c][k0]);
    }
  }
}

void check(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flash_quant sm90 pre-pass: ") + what + " launch failed: " +
                             cudaGetErrorString(err));
  }
}

template <class T>
void launch_all(const PrepassParams& p, cudaStream_t stream) {
  int rows_per_block = 0, blocks = 0;
  center_blocks(p.kv_len, &rows_per_block, &blocks);
  key_block_means<T><<<dim3(blocks, p.batch * p.kv_heads), kMeansThreads, 0, stream>>>(p, rows_per_block, blocks);
  check("key_block_means");
  key_center<<<dim3(p.batch * p.kv_heads, kCenterSplits), kCenterSlices * kCenterChannels, 0, stream>>>(p, blocks);
  check("key_center");
  const int64_t q_rows = p.q_data != nullptr ? static_cast<int64_t>(p.q_heads) * p.q_len : 0;
  const int64_t rows = static_cast<int64_t>(p.batch) * (q_rows + static_cast<int64_t>(p.kv_heads) * p.kv_len);
  if (rows >= (int64_t{1} << 31)) throw std::invalid_argument("flash_quant sm90 pre-pass: 2^31 rows or more");
  const int64_t rows_per_cta = static_cast<int64_t>(kRowWarps) * kRowsPerWarp;
  const unsigned ctas = static_cast<unsigned>((rows + rows_per_cta - 1) / rows_per_cta);
  quantize_rows<T><<<ctas, kRowWarps * kWarp, 0, stream>>>(p);
  check("quantize_rows");
  if (p.v_data != nullptr) {
    const unsigned tiles = static_cast<unsigned>((p.kv_len + kVTileKeys - 1) / kVTileKeys);
    quantize_v_kmajor<T><<<dim3(tiles, p.batch * p.kv_heads), kVThreads, 0, stream>>>(p);
    check("quantize_v_kmajor");
  }
}

}  // namespace

void launch_prepass(const PrepassParams& p, cudaStream_t stream) {
  if (p.batch < 1 || p.q_heads < 1 || p.kv_heads < 1 || p.q_len < 1 || p.kv_len < 1 || p.q_heads % p.kv_heads) {
    throw std::invalid_argument("flash_quant sm90 pre-pass: empty or inconsistent shapes");
  }
  if (p.v_data != nullptr && (p.v_keys_padded < p.kv_len || p.v_keys_padded % kVKeysAlign != 0 ||
                              p.v_scale == nullptr || p.v_block_amax == nullptr)) {
    throw std::invalid_argument("flash_quant sm90 pre-pass: V codes need v_scale, v_block_amax and a padded key "
                                "dim >= kv_len, a multiple of 16");
  }
  if (p.in_type == OutType::kBFloat16) {
    launch_all<__nv_bfloat16>(p, stream);
  } else {
    launch_all<__half>(p, stream);
  }
}

}  // namespace flash_quant_sm90
