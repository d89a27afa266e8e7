// attention_with_levels = kv_pyramid, then attention_over_pyramid: a composite op (registered as
// CompositeImplicitAutograd), so autograd differentiates the two stages (the attention's gradient
// reaches the pooled keys and values, the pyramid's spreads it back over the keys they average) and
// torch.compile records the two stage ops.
#include "check.h"
#include "ops.h"
#include "stage_ops.h"

namespace psa {

std::tuple<at::Tensor, at::Tensor> attention_with_levels(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& levels,
                                                         int64_t block_m, int64_t block_n,
                                                         std::optional<double> scale, bool causal) {
  // Checked here too, so that errors name the op the user called; the stages check again (the
  // symbolic shapes of a dynamic torch.compile trace only reach the stages).
  if (!any_symbolic({q, k, v, levels})) {
    check_attention_inputs("psa.attention_with_levels", q, k, v, levels, block_m, block_n, scale);
  }
  static const auto pyramid = stage_op<KvPyramidCall>("psa::kv_pyramid");
  static const auto attend = stage_op<AttentionOverPyramidCall>("psa::attention_over_pyramid");
  const auto [k2, v2, k4, v4, k8, v8] = pyramid.call(k, v);
  return attend.call(q, k, v, k2, v2, k4, v4, k8, v8, levels, block_m, block_n, scale, causal);
}

}  // namespace psa
