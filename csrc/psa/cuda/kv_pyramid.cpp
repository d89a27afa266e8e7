// CUDA host side of kv_pyramid and its backward: allocate, fill params, launch on the current stream.
#include "../ops.h"
#include "common.h"
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
  check_launch("psa.kv_pyramid", dispatch_input_dtype("psa.kv_pyramid", k.scalar_type(), [&](auto tag) {
                 return kernels::launch_kv_pyramid<decltype(tag)>(params, stream);
               }));
  return outputs;
}

std::vector<at::Tensor> kv_pyramid_backward(const std::vector<at::Tensor>& d_pooled_in, int64_t k_len) {
  const c10::cuda::CUDAGuard device_guard(d_pooled_in[0].device());
  std::vector<at::Tensor> d_pooled;  // the kernel indexes contiguous [B, H, ceil(L/l), D] rows
  for (const auto& t : d_pooled_in) d_pooled.push_back(t.contiguous());
  const at::Tensor& first = d_pooled[0];
  const int64_t batch = first.size(0), heads = first.size(1), dim = first.size(3);
  PSA_CHECK(batch * heads <= 65535, "psa.kv_pyramid_backward: B * H must be at most 65535 on CUDA, got ",
            batch * heads);
  std::vector<at::Tensor> outputs = {at::empty({batch, heads, k_len, dim}, first.options()),
                                     at::empty({batch, heads, k_len, dim}, d_pooled[1].options())};
  if (outputs[0].numel() == 0) return outputs;
  kernels::PyramidBackwardParams params{};
  for (int i = 0; i < 3; ++i) {
    params.d_keys[i] = d_pooled[2 * i].data_ptr();
    params.d_values[i] = d_pooled[2 * i + 1].data_ptr();
  }
  params.dk = outputs[0].data_ptr();
  params.dv = outputs[1].data_ptr();
  params.batch = static_cast<int>(batch);
  params.heads = static_cast<int>(heads);
  params.length = static_cast<int>(k_len);
  params.head_dim = static_cast<int>(dim);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr const char* kOp = "psa.kv_pyramid_backward";
  check_launch(kOp, dispatch_input_dtype(kOp, first.scalar_type(), [&](auto tag) {
                 return kernels::launch_kv_pyramid_backward<decltype(tag)>(params, stream);
               }));
  return outputs;
}

}  // namespace psa::cuda
