// The emulated pre-pass behind a C entry point (ctypes): prepass.cu is included after its
// kernel launches were rewritten to emu_launch (tests/test_sm90_prepass_emulated.py).
#include <cstdio>
#include <stdexcept>

#include "cuda_emu.h"
#include "operands.h"
#include PREPASS_SOURCE

using namespace flash_quant_sm90;

extern "C" int run_prepass(const void* q, const void* k, const void* v, const int64_t* qs, const int64_t* ks,
                           const int64_t* vs, int B, int Hq, int Hkv, int Sq, int Skv, int bf16, int8_t* q_data,
                           float* q_scale, int8_t* k_data, float* k_scale, float* work,
                           float* q_center_dot, int32_t* nonfinite, int8_t* v_data, long long v_keys_padded,
                           float* v_scale, float* v_work) {
  PrepassParams p;
  emu_set_operands(p, q, k, v, qs, ks, vs, B, Hq, Hkv, Sq, Skv);
  p.in_type = bf16 ? OutType::kBFloat16 : OutType::kFloat16;
  p.q_data = q_data;
  p.q_scale = q_scale;
  p.k_data = k_data;
  p.k_scale = k_scale;
  int rows_per_block = 0, blocks = 0;
  center_blocks(Skv, &rows_per_block, &blocks);
  p.block_means = work;  // as register_sm90.cpp lays the workspace out
  p.k_center = work + static_cast<int64_t>(B) * Hkv * blocks * kHeadDim;
  p.q_center_dot = q_center_dot;
  p.nonfinite = nonfinite;
  if (v_data != nullptr) {
    p.v_data = v_data;
    p.v_keys_padded = v_keys_padded;
    p.v_scale = v_scale;
    p.v_block_amax = v_work;
  }
  try {
    launch_prepass(p, nullptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return -1;
  }
  return blocks;
}
