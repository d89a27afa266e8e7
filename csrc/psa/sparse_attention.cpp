// The whole pipeline as one op. It calls the stage ops through the dispatcher, so each stage runs on
// the backend of the inputs and this file serves every backend.
#include <ATen/core/dispatch/Dispatcher.h>

#include "ops.h"

namespace psa {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> stage(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& force_keys,
    const std::optional<at::Tensor>& force_queries, const std::optional<at::Tensor>& q_offsets,
    const std::optional<at::Tensor>& k_offsets, int64_t block_m, int64_t block_n, const std::string& mode,
    at::ArrayRef<double> bounds, const std::string& estimator, double min_full,
    std::optional<at::ArrayRef<double>> sim_thresholds, bool causal, bool sink, int64_t stride,
    std::optional<double> scale) {
  static const auto estimate = stage<decltype(estimate_importance)>("psa::estimate_importance");
  static const auto assign = stage<decltype(assign_levels)>("psa::assign_levels");
  static const auto attend = stage<decltype(attention_with_levels)>("psa::attention_with_levels");
  const auto scores = estimate.call(q, k, q_offsets, k_offsets, block_m, block_n, estimator, scale, causal, stride);
  auto levels = assign.call(scores, force_keys, force_queries, k, mode, bounds, block_m, block_n, q.size(2),
                            k.size(2), min_full, causal, sink, sim_thresholds);
  auto [out, lse] = attend.call(q, k, v, levels, block_m, block_n, scale, causal);
  return {out, lse, levels};
}

}  // namespace psa
