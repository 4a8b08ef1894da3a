// Head-dim limits of every flash_quant attention kernel, for C++: the CPU kernels
// (csrc/cpu/attention_common.cpp), the MPS host logic (csrc/mps/host_logic.cpp) and the
// Metal kernels (through metal/fq_params.h). flash_quant/support.py holds the same numbers
// for Python; tests/test_support.py checks that the two agree and that no other file
// writes them.
//
// Preprocessor definitions only (plus a host-side helper), so that the Metal compiler can
// include this header too.
#pragma once

#define FQ_MIN_HEAD_DIM 16
#define FQ_MAX_HEAD_DIM 256
#define FQ_HEAD_DIM_MULTIPLE 8

#ifndef __METAL_VERSION__
// Whether every attention kernel takes head dim `d` (flash_quant.support.head_dim_supported).
constexpr bool fq_head_dim_supported(long long d) {
  return d >= FQ_MIN_HEAD_DIM && d <= FQ_MAX_HEAD_DIM && d % FQ_HEAD_DIM_MULTIPLE == 0;
}
#endif
