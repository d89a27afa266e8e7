#include <cmath>

#include "check.h"
#include "ops.h"

namespace psa {

double prepare_attention_over_pyramid(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::vector<at::Tensor>& pooled, const at::Tensor& levels,
                                      int64_t block_m, int64_t block_n, std::optional<double> scale) {
  constexpr const char* op = "psa.attention_over_pyramid";
  check_qkv(op, q, k, v);
  check_block_sizes(op, block_m, block_n);
  check_levels(op, levels, q, k, block_m, block_n);
  check_pyramid(op, k, pooled);
  const double softmax_scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  PSA_CHECK(std::isfinite(softmax_scale), op, ": scale must be finite, got ", softmax_scale);
  return softmax_scale;
}

}  // namespace psa
