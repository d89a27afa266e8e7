// The op bodies every backend registers under its own dispatch key (cpu/registration.cpp,
// cuda/registration.cpp): each op's shared preparation (ops.h), the checks of tensor contents that
// only some backends can make without a host synchronisation, then the backend's kernels.
//
// A Backend is a struct of static functions: the kernels (kv_pyramid, kv_pyramid_backward,
// estimate_sampled, estimate_antidiagonal, estimate_pooled, assign_levels, attention_over_pyramid, and
// attention_over_pyramid_backward where the backend has one, with the backend namespaces' signatures)
// and the content checks (check_offsets, check_scores, check_levels: empty where they would cost a sync).
#pragma once

#include <torch/library.h>

#include "check.h"
#include "ops.h"

namespace psa {

template <typename Backend>
struct BackendOps {
  static PyramidTensors kv_pyramid(const at::Tensor& k, const at::Tensor& v) {
    prepare_kv_pyramid(k, v);
    return pyramid_tuple(Backend::kv_pyramid(k, v));
  }

  static std::tuple<at::Tensor, at::Tensor> kv_pyramid_backward(const at::Tensor& dk2, const at::Tensor& dv2,
                                                                const at::Tensor& dk4, const at::Tensor& dv4,
                                                                const at::Tensor& dk8, const at::Tensor& dv8,
                                                                int64_t k_len) {
    const std::vector<at::Tensor> d_pooled = {dk2, dv2, dk4, dv4, dk8, dv8};
    prepare_kv_pyramid_backward(d_pooled, k_len);
    const auto grads = Backend::kv_pyramid_backward(d_pooled, k_len);
    return {grads[0], grads[1]};
  }

  static at::Tensor estimate_importance(const at::Tensor& q, const at::Tensor& k,
                                        const std::optional<at::Tensor>& q_offsets,
                                        const std::optional<at::Tensor>& k_offsets,
                                        const std::optional<at::Tensor>& k8, int64_t block_m, int64_t block_n,
                                        const std::string& method, std::optional<double> scale, bool causal,
                                        int64_t stride, const std::string& precision) {
    const EstimateArgs args = prepare_estimate_importance(q, k, q_offsets, k_offsets, block_m, block_n, method,
                                                          scale, stride, k8, precision);
    switch (args.method) {
      case EstimateMethod::kSampled:
        Backend::check_offsets(args, block_m, block_n);
        return Backend::estimate_sampled(q, k, block_m, block_n, args.scale, causal, args.q_offsets, args.k_offsets,
                                         args.default_q_offsets, args.default_k_offsets);
      case EstimateMethod::kAntidiagonal:
        return Backend::estimate_antidiagonal(q, k, block_m, block_n, args.scale, causal, stride, args.precision);
      case EstimateMethod::kPooled:
        return Backend::estimate_pooled(q, k, args.k8, block_m, block_n, args.scale, causal);
    }
    PSA_CHECK(false, "psa.estimate_importance: unknown method");
  }

  static at::Tensor assign_levels(const at::Tensor& scores, const std::optional<at::Tensor>& force_keys,
                                  const std::optional<at::Tensor>& force_queries, const std::optional<at::Tensor>& k,
                                  const std::string& mode, at::ArrayRef<double> bounds, int64_t block_m,
                                  int64_t block_n, int64_t q_len, int64_t k_len, double min_full, bool causal,
                                  bool sink, std::optional<at::ArrayRef<double>> sim_thresholds) {
    const AssignArgs args = prepare_assign_levels(scores, force_keys, force_queries, k, mode, bounds, block_m,
                                                  block_n, q_len, k_len, min_full, sim_thresholds);
    Backend::check_scores(scores);
    return Backend::assign_levels(scores, args.threshold_mode, bounds, block_m, block_n, q_len, k_len, min_full,
                                  causal, sink, args.force_key_blocks, args.force_query_blocks, args.cap);
  }

  static std::tuple<at::Tensor, at::Tensor> attention_over_pyramid(
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k2, const at::Tensor& v2,
      const at::Tensor& k4, const at::Tensor& v4, const at::Tensor& k8, const at::Tensor& v8,
      const at::Tensor& levels, int64_t block_m, int64_t block_n, std::optional<double> scale, bool causal) {
    const std::vector<at::Tensor> pooled = {k2, v2, k4, v4, k8, v8};
    const double softmax_scale = prepare_attention_over_pyramid(q, k, v, pooled, levels, block_m, block_n, scale);
    Backend::check_levels(levels);
    return Backend::attention_over_pyramid(q, k, v, pooled, levels, block_m, block_n, softmax_scale, causal);
  }

  // The backward of attention_over_pyramid, for a backend with its own kernel
  // (Backend::attention_over_pyramid_backward); registered by register_backward_kernel.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor>
  attention_over_pyramid_backward(const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_lse,
                                  const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k2,
                                  const at::Tensor& v2, const at::Tensor& k4, const at::Tensor& v4,
                                  const at::Tensor& k8, const at::Tensor& v8, const at::Tensor& levels,
                                  const at::Tensor& out, const at::Tensor& lse, int64_t block_m, int64_t block_n,
                                  std::optional<double> scale, bool causal) {
    const std::vector<at::Tensor> pooled = {k2, v2, k4, v4, k8, v8};
    const double softmax_scale = prepare_attention_over_pyramid_backward(grad_out, grad_lse, q, k, v, pooled, levels,
                                                                         out, lse, block_m, block_n, scale);
    Backend::check_levels(levels);
    const auto grads = Backend::attention_over_pyramid_backward(
        grad_out.value_or(at::Tensor()), grad_lse.value_or(at::Tensor()), q, k, v, pooled, levels, out, lse, block_m,
        block_n, softmax_scale, causal);
    return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6], grads[7], grads[8]};
  }

  static void register_backward_kernel(torch::Library& m) {
    m.impl("attention_over_pyramid_backward", &attention_over_pyramid_backward);
  }

  static void register_kernels(torch::Library& m) {
    m.impl("kv_pyramid", &kv_pyramid);
    m.impl("kv_pyramid_backward", &kv_pyramid_backward);
    m.impl("estimate_importance", &estimate_importance);
    m.impl("assign_levels", &assign_levels);
    m.impl("attention_over_pyramid", &attention_over_pyramid);
  }
};

}  // namespace psa
