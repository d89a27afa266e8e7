// attention_with_levels = kv_pyramid, then attention_over_pyramid: a composite op (registered as
// CompositeImplicitAutograd), so autograd differentiates the two stages (the attention's gradient
// reaches the pooled keys and values, the pyramid's spreads it back over the keys they average) and
// torch.compile records the two stage ops.
#include <cmath>

#include "check.h"
#include "ops.h"
#include "stage_ops.h"

namespace psa {

std::tuple<at::Tensor, at::Tensor> attention_with_levels(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& levels,
                                                         int64_t block_m, int64_t block_n,
                                                         std::optional<double> scale, bool causal) {
  constexpr const char* op = "psa.attention_with_levels";
  // Checked here too, so that errors name the op the user called; the stages check again (the
  // symbolic shapes of a dynamic torch.compile trace only reach the stages).
  if (!any_symbolic({q, k, v, levels})) {
    check_qkv(op, q, k, v);
    check_block_sizes(op, block_m, block_n);
    check_levels(op, levels, q, k, block_m, block_n);
    PSA_CHECK(!scale.has_value() || std::isfinite(*scale), op, ": scale must be finite, got ", scale.value_or(0.0));
  }
  static const auto pyramid = stage_op<KvPyramidCall>("psa::kv_pyramid");
  static const auto attend = stage_op<AttentionOverPyramidCall>("psa::attention_over_pyramid");
  const auto [k2, v2, k4, v4, k8, v8] = pyramid.call(k, v);
  return attend.call(q, k, v, k2, v2, k4, v4, k8, v8, levels, block_m, block_n, scale, causal);
}

}  // namespace psa
