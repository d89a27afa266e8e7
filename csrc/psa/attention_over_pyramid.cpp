#include <cmath>

#include "check.h"
#include "ops.h"

namespace psa {

std::tuple<at::Tensor, at::Tensor> attention_over_pyramid(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& k2,
                                                          const at::Tensor& v2, const at::Tensor& k4,
                                                          const at::Tensor& v4, const at::Tensor& k8,
                                                          const at::Tensor& v8, const at::Tensor& levels,
                                                          int64_t block_m, int64_t block_n,
                                                          std::optional<double> scale, bool causal) {
  constexpr const char* op = "psa.attention_over_pyramid";
  check_qkv(op, q, k, v);
  check_block_sizes(op, block_m, block_n);
  check_levels(op, levels, q, k, block_m, block_n);
  const std::vector<at::Tensor> pooled = {k2, v2, k4, v4, k8, v8};
  check_pyramid(op, k, pooled);
  const double softmax_scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  PSA_CHECK(std::isfinite(softmax_scale), op, ": scale must be finite, got ", softmax_scale);
#ifdef PSA_WITH_CUDA
  if (q.is_cuda()) return cuda::attention_over_pyramid(q, k, v, pooled, levels, block_m, block_n, softmax_scale, causal);
#endif
  check_level_values(op, levels);
  return cpu::attention_over_pyramid(q, k, v, pooled, levels, block_m, block_n, softmax_scale, causal);
}

}  // namespace psa
