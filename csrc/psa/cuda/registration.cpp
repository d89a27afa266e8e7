// The CUDA backend's kernels under the CUDA dispatch key. Tensor contents are not checked here: that
// would cost a host synchronisation. The kernels clamp sample offsets into their block, and stop on
// level values outside {0, 1, 2, 4, 8}.
#include "../backend_ops.h"

namespace psa::cuda {
namespace {

struct CudaBackend {
  static std::vector<at::Tensor> kv_pyramid(const at::Tensor& k, const at::Tensor& v) { return cuda::kv_pyramid(k, v); }
  static constexpr auto kv_pyramid_backward = &cuda::kv_pyramid_backward;
  static constexpr auto estimate_sampled = &cuda::estimate_sampled;
  static constexpr auto estimate_antidiagonal = &cuda::estimate_antidiagonal;
  static constexpr auto estimate_pooled = &cuda::estimate_pooled;
  static constexpr auto assign_levels = &cuda::assign_levels;
  static constexpr auto attention_over_pyramid = &cuda::attention_over_pyramid;
  static constexpr auto attention_over_pyramid_backward = &cuda::attention_over_pyramid_backward;
  static void check_offsets(const EstimateArgs&, int64_t, int64_t) {}
  static void check_scores(const at::Tensor&) {}
  static void check_levels(const at::Tensor&) {}
};

}  // namespace
}  // namespace psa::cuda

TORCH_LIBRARY_IMPL(psa, CUDA, m) {
  psa::BackendOps<psa::cuda::CudaBackend>::register_kernels(m);
  psa::BackendOps<psa::cuda::CudaBackend>::register_backward_kernel(m);
}
