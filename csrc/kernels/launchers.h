// Declarations of the kernel launchers, for host code. Each is defined in its .cuh and explicitly
// instantiated per dtype in instantiations/ (see generate_instantiations.py).
#pragma once

#include <cuda_runtime.h>

#include "params.h"

namespace psa::kernels {

template <typename T>
cudaError_t launch_kv_pyramid(const PyramidParams& params, cudaStream_t stream);

}  // namespace psa::kernels
