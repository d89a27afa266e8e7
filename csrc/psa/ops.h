// Host entry points of the psa operators (schemas: registration.cpp). Each entry validates its inputs
// once, for every backend, then hands the work to the backend of the inputs' device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace psa {

// Pooled K and V at levels 2, 4, 8: (k2, v2, k4, v4, k8, v8), each [B, Hkv, ceil(Lk/l), D].
using PyramidTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
PyramidTensors kv_pyramid(const at::Tensor& k, const at::Tensor& v);

// Block scores, float32 [B, Hq, n_q, n_k], rows summing to 1 over their candidate blocks.
at::Tensor estimate_importance(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_offsets,
                               const std::optional<at::Tensor>& k_offsets, int64_t block_m, int64_t block_n,
                               const std::string& method, std::optional<double> scale, bool causal,
                               int64_t stride);

// Level map, int8 [B, Hq, n_q, n_k] with values in {0, 1, 2, 4, 8}.
at::Tensor assign_levels(const at::Tensor& scores, const std::optional<at::Tensor>& force_keys,
                         const std::optional<at::Tensor>& force_queries, const std::optional<at::Tensor>& k,
                         const std::string& mode, at::ArrayRef<double> bounds, int64_t block_m, int64_t block_n,
                         int64_t q_len, int64_t k_len, double min_full, bool causal, bool sink,
                         std::optional<at::ArrayRef<double>> sim_thresholds);

// (out [B, Hq, Lq, D] in q's dtype, lse float32 [B, Hq, Lq]) of attention over a level map, given the
// pyramid of k and v as kv_pyramid returns it.
std::tuple<at::Tensor, at::Tensor> attention_over_pyramid(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& k2,
                                                          const at::Tensor& v2, const at::Tensor& k4,
                                                          const at::Tensor& v4, const at::Tensor& k8,
                                                          const at::Tensor& v8, const at::Tensor& levels,
                                                          int64_t block_m, int64_t block_n,
                                                          std::optional<double> scale, bool causal);

// The composite ops (CompositeImplicitAutograd): they call the stage ops through the dispatcher, so
// autograd and torch.compile see the stages, and every backend is served by the stages' kernels.
// kv_pyramid -> attention_over_pyramid.
std::tuple<at::Tensor, at::Tensor> attention_with_levels(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& levels,
                                                         int64_t block_m, int64_t block_n,
                                                         std::optional<double> scale, bool causal);

// (out, lse, levels): estimate_importance -> assign_levels -> attention_with_levels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& force_keys,
    const std::optional<at::Tensor>& force_queries, const std::optional<at::Tensor>& q_offsets,
    const std::optional<at::Tensor>& k_offsets, int64_t block_m, int64_t block_n, const std::string& mode,
    at::ArrayRef<double> bounds, const std::string& estimator, double min_full,
    std::optional<at::ArrayRef<double>> sim_thresholds, bool causal, bool sink, int64_t stride,
    std::optional<double> scale);

// The estimators as device-generic ATen code (aten/estimators.cpp): the CPU backend's kernels and the
// CUDA backend's fallback. Inputs arrive validated.
namespace aten {
at::Tensor estimate_sampled(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                            double scale, bool causal, const at::Tensor& q_offsets, const at::Tensor& k_offsets);
at::Tensor estimate_antidiagonal(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                                 double scale, bool causal, int64_t stride);
at::Tensor estimate_pooled(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                           double scale, bool causal);
}  // namespace aten

// The CPU reference backend. Inputs arrive validated.
namespace cpu {
// {k2, v2, k4, v4, k8, v8}
std::vector<at::Tensor> kv_pyramid(const at::Tensor& k, const at::Tensor& v);
// force_key_blocks [B, n_k] and force_query_blocks [B, n_q] are bool; cap [B, Hkv, n_k] int64 or undefined.
at::Tensor assign_levels(const at::Tensor& scores, bool threshold_mode, at::ArrayRef<double> bounds,
                         int64_t block_m, int64_t block_n, int64_t q_len, int64_t k_len, double min_full,
                         bool causal, bool sink, const at::Tensor& force_key_blocks,
                         const at::Tensor& force_query_blocks, const at::Tensor& cap);
// pooled = {k2, v2, k4, v4, k8, v8}.
std::tuple<at::Tensor, at::Tensor> attention_over_pyramid(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::vector<at::Tensor>& pooled,
                                                          const at::Tensor& levels, int64_t block_m,
                                                          int64_t block_n, double scale, bool causal);
}  // namespace cpu

#ifdef PSA_WITH_CUDA
// The CUDA backend. Inputs arrive validated and on one device.
namespace cuda {
// {k2, v2, k4, v4, k8, v8}
std::vector<at::Tensor> kv_pyramid(const at::Tensor& k, const at::Tensor& v);
// The fused kernel for 8, 16 or 32 offsets per block, else aten::estimate_sampled.
at::Tensor estimate_sampled(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                            double scale, bool causal, const at::Tensor& q_offsets, const at::Tensor& k_offsets);
at::Tensor estimate_pooled(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n, double scale,
                           bool causal);
// Arguments as cpu::assign_levels.
at::Tensor assign_levels(const at::Tensor& scores, bool threshold_mode, at::ArrayRef<double> bounds,
                         int64_t block_m, int64_t block_n, int64_t q_len, int64_t k_len, double min_full,
                         bool causal, bool sink, const at::Tensor& force_key_blocks,
                         const at::Tensor& force_query_blocks, const at::Tensor& cap);
// pooled = {k2, v2, k4, v4, k8, v8}.
std::tuple<at::Tensor, at::Tensor> attention_over_pyramid(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::vector<at::Tensor>& pooled,
                                                          const at::Tensor& levels, int64_t block_m,
                                                          int64_t block_n, double scale, bool causal);
}  // namespace cuda
#endif

}  // namespace psa
