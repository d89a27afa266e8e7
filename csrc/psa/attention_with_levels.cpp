#include <cmath>

#include "check.h"
#include "ops.h"

namespace psa {

std::tuple<at::Tensor, at::Tensor> attention_with_levels(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& levels,
                                                         int64_t block_m, int64_t block_n,
                                                         std::optional<double> scale, bool causal) {
  constexpr const char* op = "psa.attention_with_levels";
  check_qkv(op, q, k, v);
  check_block_sizes(op, block_m, block_n);
  check_levels(op, levels, q, k, block_m, block_n);
  const double softmax_scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  PSA_CHECK(std::isfinite(softmax_scale), op, ": scale must be finite, got ", softmax_scale);
#ifdef PSA_WITH_CUDA
  if (q.is_cuda()) return cuda::attention_with_levels(q, k, v, levels, block_m, block_n, softmax_scale, causal);
#endif
  return cpu::attention_with_levels(q, k, v, levels, block_m, block_n, softmax_scale, causal);
}

}  // namespace psa
