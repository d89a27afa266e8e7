// CUDA host side of kv_pyramid: allocate, fill params, launch on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../check.h"
#include "../ops.h"
#include "kernels/launchers.h"

namespace psa::cuda {

std::vector<at::Tensor> kv_pyramid(const at::Tensor& k, const at::Tensor& v) {
  const c10::cuda::CUDAGuard device_guard(k.device());
  const int64_t batch = k.size(0), heads = k.size(1), length = k.size(2), dim = k.size(3);
  // B * H indexes gridDim.y.
  PSA_CHECK(batch * heads <= 65535, "psa.kv_pyramid: B * H must be at most 65535 on CUDA, got ", batch * heads);
  kernels::PyramidParams params{};
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    params.k_stride[i] = k.stride(i);
    params.v_stride[i] = v.stride(i);
  }
  std::vector<at::Tensor> outputs;  // {k2, v2, k4, v4, k8, v8}
  for (int level = 2, i = 0; level <= 8; level *= 2, ++i) {
    outputs.push_back(at::empty({batch, heads, ceil_div(length, level), dim}, k.options()));
    outputs.push_back(at::empty({batch, heads, ceil_div(length, level), dim}, v.options()));
    params.k_out[i] = outputs[2 * i].data_ptr();
    params.v_out[i] = outputs[2 * i + 1].data_ptr();
  }
  params.batch = static_cast<int>(batch);
  params.heads = static_cast<int>(heads);
  params.length = static_cast<int>(length);
  params.head_dim = static_cast<int>(dim);
  if (k.numel() == 0) return outputs;  // an empty batch or no heads: nothing to launch (a zero grid is an error)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status;
  switch (k.scalar_type()) {
    case at::kBFloat16: status = kernels::launch_kv_pyramid<__nv_bfloat16>(params, stream); break;
    case at::kHalf: status = kernels::launch_kv_pyramid<__half>(params, stream); break;
    default: PSA_CHECK(false, "psa.kv_pyramid: no CUDA kernel for dtype ", k.scalar_type());
  }
  PSA_CHECK(status == cudaSuccess, "psa.kv_pyramid: kernel launch failed: ", cudaGetErrorString(status));
  return outputs;
}

}  // namespace psa::cuda
