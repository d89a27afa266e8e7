#include "../ops.h"

namespace psa::cpu {
namespace {

// Sums of groups of 2, 4 and 8 tokens, built pairwise from one fp32 copy, then divided by how many
// real tokens each group covers (the last group of a level may be partial).
std::vector<at::Tensor> pool_levels(const at::Tensor& x) {
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t length = x.size(2);
  const int64_t padded_length = (length + 7) / 8 * 8;
  auto sums = at::constant_pad_nd(x.to(acc_dtype), {0, 0, 0, padded_length - length});
  std::vector<at::Tensor> pooled;
  for (int64_t level = 2; level <= 8; level *= 2) {
    sums = sums.unflatten(2, {sums.size(2) / 2, 2}).sum(3);
    const int64_t tokens = (length + level - 1) / level;
    auto counts = at::clamp_max(length - at::arange(0, length, level, x.options().dtype(acc_dtype)), level);
    pooled.push_back((sums.narrow(2, 0, tokens) / counts.unsqueeze(-1)).to(x.scalar_type()));
  }
  return pooled;
}

}  // namespace

std::vector<at::Tensor> kv_pyramid(const at::Tensor& k, const at::Tensor& v) {
  auto k_levels = pool_levels(k);
  auto v_levels = pool_levels(v);
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
      auto counts = at::clamp_max(k_len - at::arange(0, k_len, level, grad.options().dtype(acc_dtype)), level);
      auto spread = (grad.to(acc_dtype) / counts.unsqueeze(-1)).repeat_interleave(level, 2).narrow(2, 0, k_len);
      total = total.defined() ? total + spread : spread;
    }
    totals.push_back(total.to(dtype));
  }
  return totals;
}

}  // namespace psa::cpu
