// Registers the CPU kernels for the schemas of csrc/schema.cpp.
#include <torch/library.h>

#include "cpu/kernels_cpu.h"

TORCH_LIBRARY_IMPL(flash_quant, CPU, m) {
  m.impl("quantize", &flash_quant::cpu::quantize_cpu);
  m.impl("dequantize", &flash_quant::cpu::dequantize_cpu);
  m.impl("attention_forward", &flash_quant::cpu::attention_forward_cpu);
  m.impl("attention_backward", &flash_quant::cpu::attention_backward_cpu);
}
