// (tests/cuda_emu) The driver API names fwd_sm90.cu uses: a tensor map here is a plain
// description of the tiled copy, which ptx_emu.h's tma_load_4d carries out.
#pragma once
#include "cuda_emu.h"
typedef uint64_t cuuint64_t;
typedef uint32_t cuuint32_t;
typedef int CUresult;
constexpr CUresult CUDA_SUCCESS = 0;
enum CUtensorMapDataType { CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0, CU_TENSOR_MAP_DATA_TYPE_FLOAT16 = 6,
                           CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 = 9 };
enum CUtensorMapInterleave { CU_TENSOR_MAP_INTERLEAVE_NONE = 0 };
enum CUtensorMapSwizzle { CU_TENSOR_MAP_SWIZZLE_NONE = 0, CU_TENSOR_MAP_SWIZZLE_32B, CU_TENSOR_MAP_SWIZZLE_64B,
                          CU_TENSOR_MAP_SWIZZLE_128B };
enum CUtensorMapL2promotion { CU_TENSOR_MAP_L2_PROMOTION_L2_256B = 3 };
enum CUtensorMapFloatOOBfill { CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0 };
struct CUtensorMap {
  const uint8_t* base = nullptr;
  int elem = 1;
  uint64_t dims[4] = {};
  uint64_t strides[3] = {};  // bytes, dims 1..3
  uint32_t box[4] = {};
  int swizzle = 0;  // bytes: 128, 64, 32 or 0
};
inline CUresult emu_encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* base,
                                 const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle swizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill) {
  if (rank != 4) return 1;
  map->base = static_cast<const uint8_t*>(base);
  map->elem = type == CU_TENSOR_MAP_DATA_TYPE_UINT8 ? 1 : 2;
  for (int i = 0; i < 4; ++i) map->dims[i] = dims[i], map->box[i] = box[i];
  for (int i = 0; i < 3; ++i) map->strides[i] = strides[i];
  map->swizzle = swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? 128 : swizzle == CU_TENSOR_MAP_SWIZZLE_64B ? 64
                 : swizzle == CU_TENSOR_MAP_SWIZZLE_32B ? 32 : 0;
  // the driver's rules the kernel relies on: 16-byte aligned base and strides, box rows
  // no wider than the swizzle
  if (reinterpret_cast<uintptr_t>(base) % 16) return 2;
  for (int i = 0; i < 3; ++i) if (strides[i] % 16) return 3;
  if (map->swizzle && box[0] * map->elem > static_cast<uint32_t>(map->swizzle)) return 4;
  return CUDA_SUCCESS;
}
