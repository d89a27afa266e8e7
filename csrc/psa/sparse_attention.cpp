// The whole pipeline as one composite op (CompositeImplicitAutograd): the stage ops through the
// dispatcher, so each runs on the backend of the inputs, autograd differentiates kv_pyramid and
// attention_over_pyramid (the estimate and the level map have no gradient) and torch.compile records
// the stages. The pyramid comes first: the pooled estimator reads its level-8 keys instead of reading
// k again (docs/spec.md section 4).
#include "check.h"
#include "ops.h"
#include "stage_ops.h"

namespace psa {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& force_keys,
    const std::optional<at::Tensor>& force_queries, const std::optional<at::Tensor>& q_offsets,
    const std::optional<at::Tensor>& k_offsets, int64_t block_m, int64_t block_n, const std::string& mode,
    at::ArrayRef<double> bounds, const std::string& estimator, double min_full,
    std::optional<at::ArrayRef<double>> sim_thresholds, bool causal, bool sink, int64_t stride,
    std::optional<double> scale, const std::string& precision) {
  // Checked here too, so that errors name the op the user called; the stages check again (the
  // symbolic shapes of a dynamic torch.compile trace only reach the stages).
  if (!any_symbolic({q, k, v})) check_qkv("psa.sparse_attention", q, k, v);
  static const auto pyramid = stage_op<KvPyramidCall>("psa::kv_pyramid");
  static const auto estimate = stage_op<EstimateImportanceCall>("psa::estimate_importance");
  static const auto assign = stage_op<AssignLevelsCall>("psa::assign_levels");
  static const auto attend = stage_op<AttentionOverPyramidCall>("psa::attention_over_pyramid");
  const auto [k2, v2, k4, v4, k8, v8] = pyramid.call(k, v);
  const auto scores =
      estimate.call(q, k, q_offsets, k_offsets, estimator == "pooled" ? std::optional<at::Tensor>(k8) : std::nullopt,
                    block_m, block_n, estimator, scale, causal, stride, precision);
  const auto levels = assign.call(scores, force_keys, force_queries, k, mode, bounds, block_m, block_n,
                                  q.sym_size(2), k.sym_size(2), min_full, causal, sink, sim_thresholds);
  auto [out, lse] = attend.call(q, k, v, k2, v2, k4, v4, k8, v8, levels, block_m, block_n, scale, causal);
  return {out, lse, levels};
}

}  // namespace psa
