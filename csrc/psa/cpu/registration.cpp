// The CPU backend's kernels under the CPU dispatch key: the reference kernels and the ATen estimators,
// after the checks of tensor contents the host makes for free (level values, sample offsets in their
// block, non-negative scores).
#include "../backend_ops.h"

namespace psa::cpu {
namespace {

struct CpuBackend {
  static std::vector<at::Tensor> kv_pyramid(const at::Tensor& k, const at::Tensor& v) { return cpu::kv_pyramid(k, v); }
  static constexpr auto kv_pyramid_backward = &cpu::kv_pyramid_backward;
  // The reference reads the offsets whichever they are.
  static at::Tensor estimate_sampled(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                                     double scale, bool causal, const at::Tensor& q_offsets,
                                     const at::Tensor& k_offsets, bool, bool) {
    return aten::estimate_sampled(q, k, block_m, block_n, scale, causal, q_offsets, k_offsets);
  }
  static constexpr auto estimate_antidiagonal = &aten::estimate_antidiagonal;
  static constexpr auto estimate_pooled = &aten::estimate_pooled;
  static constexpr auto assign_levels = &cpu::assign_levels;
  static constexpr auto attention_over_pyramid = &cpu::attention_over_pyramid;
  static constexpr auto attention_over_pyramid_backward = &cpu::attention_over_pyramid_backward;
  static void check_offsets(const EstimateArgs& args, int64_t block_m, int64_t block_n) {
    check_offsets_in_block(args, block_m, block_n);
  }
  static void check_scores(const at::Tensor& scores) { check_scores_non_negative(scores); }
  static void check_levels(const at::Tensor& levels) { check_level_values("psa.attention_over_pyramid", levels); }
};

}  // namespace
}  // namespace psa::cpu

TORCH_LIBRARY_IMPL(psa, CPU, m) {
  psa::BackendOps<psa::cpu::CpuBackend>::register_kernels(m);
  psa::BackendOps<psa::cpu::CpuBackend>::register_backward_kernel(m);
}
