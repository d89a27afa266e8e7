#include "../ops.h"

namespace psa::cpu {

std::vector<at::Tensor> kv_pyramid(const at::Tensor& k, const at::Tensor& v) {
  auto k_levels = aten::pool_levels(k);
  auto v_levels = aten::pool_levels(v);
  return {k_levels[0], v_levels[0], k_levels[1], v_levels[1], k_levels[2], v_levels[2]};
}

// Each level's gradient over its tokens' counts, repeated over the tokens each pooled token averages;
// summed in fp32 (fp64 for double) from the finest pooled level to the coarsest, as psa/backward.py does.
std::vector<at::Tensor> kv_pyramid_backward(const std::vector<at::Tensor>& d_pooled, int64_t k_len) {
  std::vector<at::Tensor> totals;  // {dk, dv}
  for (int slot = 0; slot < 2; ++slot) {
    const auto dtype = d_pooled[slot].scalar_type();
    const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor total;
    for (int64_t index = 0, level = 2; level <= 8; ++index, level *= 2) {
      const at::Tensor& grad = d_pooled[2 * index + slot];
      const auto counts = aten::group_counts(k_len, level, grad.options().dtype(acc_dtype));
      auto spread = (grad.to(acc_dtype) / counts.unsqueeze(-1)).repeat_interleave(level, 2).narrow(2, 0, k_len);
      total = total.defined() ? total + spread : spread;
    }
    totals.push_back(total.to(dtype));
  }
  return totals;
}

}  // namespace psa::cpu
