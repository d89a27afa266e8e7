// The pyramid's pooling (docs/spec.md section 2) as device-generic ATen code: the CPU backend's
// kv_pyramid and its pooled estimator's level-8 keys where no pyramid is given. The CUDA kernels add in
// the same pairs (kernels/pyramid_group.cuh); their division of a partial group's sum is fast-math's.
#include "../ops.h"

namespace psa::aten {

at::Tensor group_counts(int64_t length, int64_t group, const at::TensorOptions& options) {
  return at::clamp_max(length - at::arange(0, length, group, options), group);
}

std::vector<at::Tensor> pool_levels(const at::Tensor& x) {
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t length = x.size(2);
  const int64_t padded_length = (length + 7) / 8 * 8;
  auto sums = at::constant_pad_nd(x.to(acc_dtype), {0, 0, 0, padded_length - length});
  std::vector<at::Tensor> pooled;
  for (int64_t level = 2; level <= 8; level *= 2) {
    sums = sums.unflatten(2, {sums.size(2) / 2, 2}).sum(3);
    const int64_t tokens = (length + level - 1) / level;
    const auto counts = group_counts(length, level, x.options().dtype(acc_dtype));
    pooled.push_back((sums.narrow(2, 0, tokens) / counts.unsqueeze(-1)).to(x.scalar_type()));
  }
  return pooled;
}

}  // namespace psa::aten
