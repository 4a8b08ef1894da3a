// The one entry point of the Hopper forward kernel (defined in fwd_sm90.cu).
#pragma once
#include <cuda_runtime.h>

#include "fwd_params.h"

namespace flash_quant_sm90 {

// Launches the forward kernel on `stream`. Throws std::runtime_error / invalid_argument
// with the reason when the arguments cannot be described to TMA or the launch fails.
void launch_forward(const Sm90FwdParams& params, cudaStream_t stream);

}  // namespace flash_quant_sm90
