#include "check.h"
#include "ops.h"

namespace psa {

double prepare_attention_over_pyramid(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::vector<at::Tensor>& pooled, const at::Tensor& levels,
                                      int64_t block_m, int64_t block_n, std::optional<double> scale) {
  constexpr const char* op = "psa.attention_over_pyramid";
  const double softmax_scale = check_attention_inputs(op, q, k, v, levels, block_m, block_n, scale);
  check_pyramid(op, k, pooled);
  return softmax_scale;
}

}  // namespace psa
