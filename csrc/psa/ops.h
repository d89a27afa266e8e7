// Host code of the psa operators (schemas: registration.cpp): the shared preparation of each op, the
// composite ops, and the kernels of each backend (registered per dispatch key in cpu/registration.cpp
// and cuda/registration.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace psa {

// ---- Shared preparation, one per op: validates the op's arguments for every backend (messages name the
// op and the argument) and derives what the backends need. Each backend's registration
// (cpu/registration.cpp, cuda/registration.cpp) calls it, adds the checks only its device can make
// without a synchronisation, and picks its kernels.

// k and v for kv_pyramid.
void prepare_kv_pyramid(const at::Tensor& k, const at::Tensor& v);
// The gradients {dk2, dv2, dk4, dv4, dk8, dv8} of kv_pyramid's outputs, for keys of length k_len.
void prepare_kv_pyramid_backward(const std::vector<at::Tensor>& d_pooled, int64_t k_len);

enum class EstimateMethod { kSampled, kAntidiagonal, kPooled };
// What the antidiagonal estimator multiplies (docs/spec.md section 4): Q and K at their own precision, or
// quantized to float8 e4m3 with a scale per group of `stride` tokens (opt-in).
enum class EstimatePrecision { kFull, kFp8 };
// The sampled estimator's default offsets (docs/spec.md section 4): block / 4 of them, every
// kDefaultSampleStep-th token of a block from token kDefaultSampleStep / 2.
constexpr int64_t kDefaultSampleStep = 4;
struct EstimateArgs {
  EstimateMethod method;
  double scale;
  at::Tensor q_offsets, k_offsets;  // sampled: the given offsets or the default ones
  // sampled: the offsets are the default ones (known without reading them), so the CUDA kernel may read
  // the sampled rows of full blocks in place (every kDefaultSampleStep-th token).
  bool default_q_offsets = false, default_k_offsets = false;
  // pooled: the pyramid's level-8 keys of k (kv_pyramid's k8), or undefined: the backend pools k itself.
  at::Tensor k8;
  EstimatePrecision precision = EstimatePrecision::kFull;  // kFp8 for the antidiagonal method only
};
EstimateArgs prepare_estimate_importance(const at::Tensor& q, const at::Tensor& k,
                                         const std::optional<at::Tensor>& q_offsets,
                                         const std::optional<at::Tensor>& k_offsets, int64_t block_m,
                                         int64_t block_n, const std::string& method, std::optional<double> scale,
                                         int64_t stride, const std::optional<at::Tensor>& k8,
                                         const std::string& precision);
// CPU only, sampled method: offsets within [0, block) (on the GPU the check would cost a host sync; the
// kernels clamp).
void check_offsets_in_block(const EstimateArgs& args, int64_t block_m, int64_t block_n);

struct AssignArgs {
  bool threshold_mode;
  at::Tensor force_key_blocks, force_query_blocks;  // bool [B, n_k], [B, n_q], or undefined: none forced
  at::Tensor cap;                                   // int64 [B, Hkv, n_k], or undefined without sim_thresholds
};
AssignArgs prepare_assign_levels(const at::Tensor& scores, const std::optional<at::Tensor>& force_keys,
                                 const std::optional<at::Tensor>& force_queries, const std::optional<at::Tensor>& k,
                                 const std::string& mode, at::ArrayRef<double> bounds, int64_t block_m,
                                 int64_t block_n, int64_t q_len, int64_t k_len, double min_full,
                                 std::optional<at::ArrayRef<double>> sim_thresholds);
// CPU only: scores >= 0 (NaN and inf are allowed: they make their row dense).
void check_scores_non_negative(const at::Tensor& scores);

// Returns the softmax scale. pooled = {k2, v2, k4, v4, k8, v8}.
double prepare_attention_over_pyramid(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::vector<at::Tensor>& pooled, const at::Tensor& levels,
                                      int64_t block_m, int64_t block_n, std::optional<double> scale);

// The backward of attention_over_pyramid: its inputs as above, plus the forward's out and lse and the
// gradients of either (grad_out [B, Hq, Lq, D], grad_lse [B, Hq, Lq]; at least one defined). Returns the
// softmax scale.
double prepare_attention_over_pyramid_backward(const std::optional<at::Tensor>& grad_out,
                                               const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                                               const at::Tensor& k, const at::Tensor& v,
                                               const std::vector<at::Tensor>& pooled, const at::Tensor& levels,
                                               const at::Tensor& out, const at::Tensor& lse, int64_t block_m,
                                               int64_t block_n, std::optional<double> scale);

// ---- The composite ops (CompositeImplicitAutograd): they call the stage ops through the dispatcher, so
// autograd and torch.compile see the stages, and every backend is served by the stages' kernels.

// (out [B, Hq, Lq, D] in q's dtype, lse float32 [B, Hq, Lq]): kv_pyramid -> attention_over_pyramid.
std::tuple<at::Tensor, at::Tensor> attention_with_levels(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& levels,
                                                         int64_t block_m, int64_t block_n,
                                                         std::optional<double> scale, bool causal);

// (out, lse, levels): kv_pyramid -> estimate_importance (the pooled estimator reads the pyramid's k8) ->
// assign_levels -> attention_over_pyramid.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& force_keys,
    const std::optional<at::Tensor>& force_queries, const std::optional<at::Tensor>& q_offsets,
    const std::optional<at::Tensor>& k_offsets, int64_t block_m, int64_t block_n, const std::string& mode,
    at::ArrayRef<double> bounds, const std::string& estimator, double min_full,
    std::optional<at::ArrayRef<double>> sim_thresholds, bool causal, bool sink, int64_t stride,
    std::optional<double> scale, const std::string& precision);

// Pooled K and V at levels 2, 4, 8 as the ops return them: (k2, v2, k4, v4, k8, v8).
using PyramidTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
inline PyramidTensors pyramid_tuple(const std::vector<at::Tensor>& t) { return {t[0], t[1], t[2], t[3], t[4], t[5]}; }

// The estimators and the pyramid's pooling as device-generic ATen code (aten/): the CPU backend's kernels
// and the CUDA backend's fallback. Inputs arrive validated.
namespace aten {
// {x2, x4, x8}: x [B, H, L, D] pooled at levels 2, 4, 8 (docs/spec.md section 2), pairwise fp32 sums
// (fp64 for fp64) divided by the real count and rounded to x's dtype (aten/pyramid.cpp).
std::vector<at::Tensor> pool_levels(const at::Tensor& x);
// How many of `length` positions each consecutive group of `group` covers (the last may be partial):
// [ceil(length / group)] with `options` (a pooled token's count, a block's real rows).
at::Tensor group_counts(int64_t length, int64_t group, const at::TensorOptions& options);
at::Tensor estimate_sampled(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                            double scale, bool causal, const at::Tensor& q_offsets, const at::Tensor& k_offsets);
at::Tensor estimate_antidiagonal(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                                 double scale, bool causal, int64_t stride, EstimatePrecision precision);
// k8: the pyramid's level-8 keys of k, or undefined (pooled here from k).
at::Tensor estimate_pooled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k8, int64_t block_m,
                           int64_t block_n, double scale, bool causal);
}  // namespace aten

// The CPU reference backend. Inputs arrive prepared.
namespace cpu {
// {k2, v2, k4, v4, k8, v8}
std::vector<at::Tensor> kv_pyramid(const at::Tensor& k, const at::Tensor& v);
// {dk, dv} [B, H, k_len, D] from d_pooled = {dk2, dv2, dk4, dv4, dk8, dv8}, in their dtype.
std::vector<at::Tensor> kv_pyramid_backward(const std::vector<at::Tensor>& d_pooled, int64_t k_len);
// force_key_blocks [B, n_k] and force_query_blocks [B, n_q] are bool or undefined (none forced); cap
// [B, Hkv, n_k] int64 or undefined.
at::Tensor assign_levels(const at::Tensor& scores, bool threshold_mode, at::ArrayRef<double> bounds,
                         int64_t block_m, int64_t block_n, int64_t q_len, int64_t k_len, double min_full,
                         bool causal, bool sink, const at::Tensor& force_key_blocks,
                         const at::Tensor& force_query_blocks, const at::Tensor& cap);
// pooled = {k2, v2, k4, v4, k8, v8}.
std::tuple<at::Tensor, at::Tensor> attention_over_pyramid(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::vector<at::Tensor>& pooled,
                                                          const at::Tensor& levels, int64_t block_m,
                                                          int64_t block_n, double scale, bool causal);
// {dq, dk, dv, dk2, dv2, dk4, dv4, dk8, dv8}, each in its input's dtype; grad_out or grad_lse may be
// undefined (no gradient reached that output).
std::vector<at::Tensor> attention_over_pyramid_backward(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                                        const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::vector<at::Tensor>& pooled,
                                                        const at::Tensor& levels, const at::Tensor& out,
                                                        const at::Tensor& lse, int64_t block_m, int64_t block_n,
                                                        double scale, bool causal);
}  // namespace cpu

#ifdef PSA_WITH_CUDA
// The CUDA backend. Inputs arrive prepared and on one device.
namespace cuda {
// {k2, v2, k4, v4, k8, v8}
std::vector<at::Tensor> kv_pyramid(const at::Tensor& k, const at::Tensor& v);
// {dk, dv} [B, H, k_len, D] from d_pooled = {dk2, dv2, dk4, dv4, dk8, dv8}, in their dtype.
std::vector<at::Tensor> kv_pyramid_backward(const std::vector<at::Tensor>& d_pooled, int64_t k_len);
// The fused kernel for 8, 16 or 32 offsets per block, else aten::estimate_sampled. default_*_offsets: the
// offsets are known to be the default ones (EstimateArgs), which lets the Hopper kernel read rows in place.
at::Tensor estimate_sampled(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                            double scale, bool causal, const at::Tensor& q_offsets, const at::Tensor& k_offsets,
                            bool default_q_offsets, bool default_k_offsets);
// k8: the pyramid's level-8 keys of k, or undefined (the kernel pools k itself, to the same values).
at::Tensor estimate_pooled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k8, int64_t block_m,
                           int64_t block_n, double scale, bool causal);
// The fused kernel where block_m / stride divides 64 and block_n / stride is 8, 16, 32 or 64, else
// aten::estimate_antidiagonal.
at::Tensor estimate_antidiagonal(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                                 double scale, bool causal, int64_t stride, EstimatePrecision precision);
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
// As cpu::attention_over_pyramid_backward: the fused kernels (kernels/attention_backward.cuh; on Hopper the
// dq pass is the forward's kernel in its dq mode, kernels/sm90/attention_with_levels_sm90.cuh, and dK / dV
// kernels/sm90/attention_backward_dkdv_sm90.cuh).
std::vector<at::Tensor> attention_over_pyramid_backward(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                                        const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::vector<at::Tensor>& pooled,
                                                        const at::Tensor& levels, const at::Tensor& out,
                                                        const at::Tensor& lse, int64_t block_m, int64_t block_n,
                                                        double scale, bool causal);
}  // namespace cuda
#endif

}  // namespace psa
