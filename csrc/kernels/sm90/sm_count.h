// Host side: the current device's SM count, by which the persistent Hopper kernels size their grids. The
// kernel layer has no at::Device; the op's CUDAGuard has made the tensors' device current.
#pragma once

#include <cuda_runtime.h>

namespace psa::kernels::sm90 {

inline cudaError_t current_sm_count(int* sms) {
  int device = 0;
  const cudaError_t status = cudaGetDevice(&device);
  return status != cudaSuccess ? status : cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
}

}  // namespace psa::kernels::sm90
