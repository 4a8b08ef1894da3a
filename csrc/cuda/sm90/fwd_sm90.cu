// Host side of the Hopper forward kernel: TMA descriptors, the instantiations the presets
// use (16-bit or int8 P·V, causal or not, bf16 / fp16) and the launch. No torch here: this
// file compiles on its own (tests/test_sm90_sass.py builds it for sm_90a and reads the
// SASS); csrc/cuda/sm90/register_sm90.cpp checks torch tensors and calls launch_forward.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <stdexcept>
#include <string>

#include "fwd_kernel.cuh"
#include "fwd_launch.h"

namespace flash_quant_sm90 {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  // The driver entry point through the runtime: no link against libcuda.
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found);
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || ptr == nullptr) {
      throw std::runtime_error("flash_quant sm90: the CUDA driver has no cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// A 4-D map (innermost first: inner, rows, heads, batch) of a tensor with swizzled boxes
// of box_inner x box_rows elements (128-byte swizzle, or 64-byte for 64-byte box rows).
CUtensorMap make_map(const void* base, CUtensorMapDataType type, int elem_bytes, uint64_t inner, uint64_t rows,
                     uint64_t heads, uint64_t batch, const int64_t (&stride)[3], uint32_t box_inner,
                     uint32_t box_rows, const char* what) {
  const CUtensorMapSwizzle swizzle =
      box_inner * elem_bytes >= 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  CUtensorMap map;
  const cuuint64_t dims[4] = {inner, rows, heads, batch};
  // byte strides of dims 1..3 (batch, head, row given in elements, as in the params)
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(stride[2]) * elem_bytes,
                                 static_cast<cuuint64_t>(stride[1]) * elem_bytes,
                                 static_cast<cuuint64_t>(stride[0]) * elem_bytes};
  const cuuint32_t box[4] = {box_inner, box_rows, 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult res = encode_tiled()(&map, type, 4, const_cast<void*>(base), dims, strides, box, elem_strides,
                                      CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    throw std::runtime_error(std::string("flash_quant sm90: cuTensorMapEncodeTiled failed for ") + what +
                             " (error " + std::to_string(static_cast<int>(res)) +
                             "; strides must be multiples of 16 bytes and the base 16-byte aligned)");
  }
  return map;
}

//: The most dynamic shared memory a CTA may take on sm_90 (227 KB).
constexpr int kMaxSharedBytes = 227 * 1024;
//: An SM's shared memory, and what the system reserves of it per CTA (sm_90).
constexpr size_t kSharedBytesPerSm = 228 * 1024;
constexpr size_t kReservedSharedBytes = 1024;
//: The launcher's slack for aligning the swizzled tiles to 1024 bytes (the kernel rounds
//: its dynamic shared memory base up).
constexpr size_t kAlignSlackBytes = 1024;

template <class T, bool kPvInt8, bool kCausal, int kD, bool kQuantizeQ = false>
void launch(const Sm90FwdParams& p, const CUtensorMap& tm_q, const CUtensorMap& tm_k, const CUtensorMap& tm_v,
            cudaStream_t stream) {
  auto kernel = forward_kernel<T, kPvInt8, kCausal, kD, kQuantizeQ>;
  using Smem = SharedStorage<kPvInt8, kD>;
  using Shape = CtaShape<kPvInt8>;
  constexpr size_t kSmemBytes = sizeof(Smem) + kAlignSlackBytes;
  static_assert(kSmemBytes <= kMaxSharedBytes, "the ring does not fit in shared memory");
  static_assert(Shape::kCtasPerSm * (kSmemBytes + kReservedSharedBytes) <= kSharedBytesPerSm,
                "the CTAs an SM is meant to hold do not fit its shared memory");
  const int smem = static_cast<int>(kSmemBytes);
  // (set on every launch: the attribute is per device, and setting it costs ~1 us)
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flash_quant sm90: cannot reserve shared memory: ") + cudaGetErrorString(err));
  }
  const dim3 grid((p.q_len + Shape::kRows - 1) / Shape::kRows, p.q_heads, p.batch);
  kernel<<<grid, Shape::kThreads, smem, stream>>>(tm_q, tm_k, tm_v, p);
  err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flash_quant sm90: launch failed: ") + cudaGetErrorString(err));
  }
}

template <class T, bool kPvInt8, bool kCausal>
void dispatch_head_dim(const Sm90FwdParams& p, const CUtensorMap& q, const CUtensorMap& k, const CUtensorMap& v,
                       cudaStream_t stream) {
  if (p.quantize_q) {  // (head dim 128, checked by launch_forward)
    launch<T, kPvInt8, kCausal, 128, true>(p, q, k, v, stream);
  } else if (tile_head_dim(p.head_dim) == 64) {
    launch<T, kPvInt8, kCausal, 64>(p, q, k, v, stream);
  } else {
    launch<T, kPvInt8, kCausal, 128>(p, q, k, v, stream);
  }
}

template <class T>
void dispatch_modes(const Sm90FwdParams& p, const CUtensorMap& q, const CUtensorMap& k, const CUtensorMap& v,
                    cudaStream_t stream) {
  if (p.pv_int8) {
    if (p.causal) {
      dispatch_head_dim<T, true, true>(p, q, k, v, stream);
    } else {
      dispatch_head_dim<T, true, false>(p, q, k, v, stream);
    }
  } else {
    if (p.causal) {
      dispatch_head_dim<T, false, true>(p, q, k, v, stream);
    } else {
      dispatch_head_dim<T, false, false>(p, q, k, v, stream);
    }
  }
}

}  // namespace

void launch_forward(const Sm90FwdParams& p, cudaStream_t stream) {
  if (p.q_len < 1 || p.kv_len < 1 || p.batch < 1 || p.q_heads < 1 || p.kv_heads < 1 || p.q_heads % p.kv_heads) {
    throw std::invalid_argument("flash_quant sm90: empty or inconsistent shapes");
  }
  if (tile_head_dim(p.head_dim) == 0) {
    throw std::invalid_argument("flash_quant sm90: head dim " + std::to_string(p.head_dim) + " (a multiple of " +
                                std::to_string(kHeadDimGranule) + " up to " + std::to_string(kMaxTileHeadDim) + ")");
  }
  if (p.quantize_q && (p.head_dim != kHeadDim || p.k_center == nullptr)) {
    throw std::invalid_argument("flash_quant sm90: Q quantized in the kernel needs head dim 128 and k_center");
  }
  // D channels in memory, boxes of the tile's width: TMA fills channels D .. tile-1 with zeros
  const int D = p.head_dim;
  const int tile_d = tile_head_dim(D);
  const CUtensorMap tm_k = make_map(p.k, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, D, p.kv_len, p.kv_heads,
                                    p.batch, p.k_stride, tile_d, kKeysPerTile, "k");
  // (Q quantized in the kernel is read with plain loads: the kernel ignores tm_q)
  const CUtensorMap tm_q = p.quantize_q ? tm_k
                                        : make_map(p.q, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, D, p.q_len, p.q_heads,
                                                   p.batch, p.q_stride, tile_d, rows_per_cta(p.pv_int8), "q");
  CUtensorMap tm_v;
  if (p.pv_int8) {
    // V^T: tokens innermost (stride 1), channels at v_stride[2]. In the permuted order a
    // group's real tokens may sit past kv_len (up to the group's end, inside the buffer's
    // padding): the map then reaches to the end of the last group
    const int64_t tokens = p.v_keys_permuted
                               ? (p.kv_len + kVPermutedGroup - 1) / kVPermutedGroup * int64_t{kVPermutedGroup}
                               : p.kv_len;
    tm_v = make_map(p.v, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, tokens, D, p.kv_heads, p.batch, p.v_stride,
                    kKeysPerTile, tile_d, "v (K-major int8)");
  } else {
    const CUtensorMapDataType type =
        p.out_type == OutType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    // boxes of 64 channels (128 bytes) per key tile, tile_d / 64 of them
    tm_v = make_map(p.v, type, 2, D, p.kv_len, p.kv_heads, p.batch, p.v_stride, kV16BoxChannels, kKeysPerTile, "v");
  }
  if (p.out_type == OutType::kBFloat16) {
    dispatch_modes<__nv_bfloat16>(p, tm_q, tm_k, tm_v, stream);
  } else {
    dispatch_modes<__half>(p, tm_q, tm_k, tm_v, stream);
  }
}

}  // namespace flash_quant_sm90
