// (tests/cuda_emu) The operand fields the pre-pass's and the forward's parameter structs
// share (PrepassParams, Sm90FwdParams), filled from the ctypes harnesses' arguments.
#pragma once
#include <cstdint>

template <class Params>
void emu_set_operands(Params& p, const void* q, const void* k, const void* v, const int64_t* qs, const int64_t* ks,
                      const int64_t* vs, int B, int Hq, int Hkv, int Sq, int Skv) {
  p.q = q;
  p.k = k;
  p.v = v;
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = qs[d];
    p.k_stride[d] = ks[d];
    p.v_stride[d] = vs[d];
  }
  p.batch = B;
  p.q_heads = Hq;
  p.kv_heads = Hkv;
  p.q_len = Sq;
  p.kv_len = Skv;
}
