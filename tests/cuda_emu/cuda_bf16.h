// (tests/cuda_emu: the CUDA headers prepass.cu includes, as the emulation)
#pragma once
#include "cuda_emu.h"
