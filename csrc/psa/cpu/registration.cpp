// The CPU backend's kernels under the CPU dispatch key: each op's shared preparation (../ops.h), the
// checks of tensor contents that are free on the host, then the reference kernels (and the ATen
// estimators).
#include <torch/library.h>

#include "../check.h"
#include "../ops.h"

namespace psa::cpu {
namespace {

PyramidTensors kv_pyramid_op(const at::Tensor& k, const at::Tensor& v) {
  prepare_kv_pyramid(k, v);
  return pyramid_tuple(kv_pyramid(k, v));
}

at::Tensor estimate_importance_op(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_offsets,
                                  const std::optional<at::Tensor>& k_offsets, int64_t block_m, int64_t block_n,
                                  const std::string& method, std::optional<double> scale, bool causal,
                                  int64_t stride) {
  const EstimateArgs args =
      prepare_estimate_importance(q, k, q_offsets, k_offsets, block_m, block_n, method, scale, stride);
  check_offsets_in_block(args, block_m, block_n);
  switch (args.method) {
    case EstimateMethod::kSampled:
      return aten::estimate_sampled(q, k, block_m, block_n, args.scale, causal, args.q_offsets, args.k_offsets);
    case EstimateMethod::kAntidiagonal:
      return aten::estimate_antidiagonal(q, k, block_m, block_n, args.scale, causal, stride);
    case EstimateMethod::kPooled:
    default:
      return aten::estimate_pooled(q, k, block_m, block_n, args.scale, causal);
  }
}

at::Tensor assign_levels_op(const at::Tensor& scores, const std::optional<at::Tensor>& force_keys,
                            const std::optional<at::Tensor>& force_queries, const std::optional<at::Tensor>& k,
                            const std::string& mode, at::ArrayRef<double> bounds, int64_t block_m, int64_t block_n,
                            int64_t q_len, int64_t k_len, double min_full, bool causal, bool sink,
                            std::optional<at::ArrayRef<double>> sim_thresholds) {
  const AssignArgs args = prepare_assign_levels(scores, force_keys, force_queries, k, mode, bounds, block_m, block_n,
                                                q_len, k_len, min_full, sim_thresholds);
  check_scores_non_negative(scores);
  return assign_levels(scores, args.threshold_mode, bounds, block_m, block_n, q_len, k_len, min_full, causal, sink,
                       args.force_key_blocks, args.force_query_blocks, args.cap);
}

std::tuple<at::Tensor, at::Tensor> attention_over_pyramid_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k2, const at::Tensor& v2,
    const at::Tensor& k4, const at::Tensor& v4, const at::Tensor& k8, const at::Tensor& v8, const at::Tensor& levels,
    int64_t block_m, int64_t block_n, std::optional<double> scale, bool causal) {
  const std::vector<at::Tensor> pooled = {k2, v2, k4, v4, k8, v8};
  const double softmax_scale = prepare_attention_over_pyramid(q, k, v, pooled, levels, block_m, block_n, scale);
  check_level_values("psa.attention_over_pyramid", levels);
  return attention_over_pyramid(q, k, v, pooled, levels, block_m, block_n, softmax_scale, causal);
}

}  // namespace
}  // namespace psa::cpu

TORCH_LIBRARY_IMPL(psa, CPU, m) {
  m.impl("kv_pyramid", &psa::cpu::kv_pyramid_op);
  m.impl("estimate_importance", &psa::cpu::estimate_importance_op);
  m.impl("assign_levels", &psa::cpu::assign_levels_op);
  m.impl("attention_over_pyramid", &psa::cpu::attention_over_pyramid_op);
}
