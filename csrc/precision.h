// The numbers of each quantized precision (docs/op_contract.md), for C++: the CPU kernels
// (csrc/cpu), quantize_with_scale (csrc/quantize_with_scale.cpp), the MPS host logic
// (csrc/mps/host_logic.cpp) and the Metal kernels (through metal/fq_common.h).
// flash_quant/config.py's Precision table holds the same numbers for Python;
// tests/test_precision_table.py checks that the two agree and that no other file writes them.
//
// Preprocessor definitions only, so that the Metal compiler can include this header too
// (it takes no program-scope variable outside the constant address space).
#pragma once

// Integer codes: symmetric data uses [-QMAX, QMAX], asymmetric data [QMIN, QMAX].
#define FQ_INT8_QMIN (-128.0f)
#define FQ_INT8_QMAX 127.0f
#define FQ_INT4_QMIN (-8.0f)
#define FQ_INT4_QMAX 7.0f
// Float8: the largest finite magnitude (the range is [-MAX, MAX]).
#define FQ_FP8_E4M3_MAX 448.0f
#define FQ_FP8_E5M2_MAX 57344.0f
// INT4 data: two signed nibbles per byte, the even element in the low nibble.
#define FQ_INT4_PER_BYTE 2
