// The emulated sm90 forward behind a C entry point (ctypes): fwd_sm90.cu (its host code:
// tensor maps, instantiations, launch) and fwd_kernel.cuh, with ptx.cuh's primitives from
// ptx_emu.h and the launch rewritten to the emulation's (tests/test_sm90_forward_emulated.py).
#include <cstdio>
#include <stdexcept>

#include "cuda_emu.h"
#include "operands.h"
#include FORWARD_SOURCE

using namespace flash_quant_sm90;

extern "C" int run_forward(const void* q, const float* q_scale, const void* k, const float* k_scale, const void* v,
                           const float* v_scale, const int64_t* qs, const int64_t* ks, const int64_t* vs, int B,
                           int Hq, int Hkv, int Sq, int Skv, int D, int bf16, int pv_int8, int causal, float scale,
                           const float* lse_shift, const float* k_mean, const float* k_center, int quantize_q,
                           int v_permuted, void* out,
                           float* lse) {
  Sm90FwdParams p;
  emu_set_operands(p, q, k, v, qs, ks, vs, B, Hq, Hkv, Sq, Skv);
  p.q_scale = q_scale;
  p.k_scale = k_scale;
  p.v_scale = v_scale;
  p.lse_shift = lse_shift;
  p.k_mean = k_mean;
  p.k_center = k_center;
  p.out = out;
  p.lse = lse;
  p.head_dim = D;
  p.softmax_scale = scale;
  p.out_type = bf16 ? OutType::kBFloat16 : OutType::kFloat16;
  p.pv_int8 = pv_int8 != 0;
  p.causal = causal != 0;
  p.quantize_q = quantize_q != 0;
  p.v_keys_permuted = v_permuted != 0;
  try {
    launch_forward(p, nullptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return -1;
  }
  return 0;
}
