// CUDA host side of level assignment: one CTA per row of blocks (kernels/assign_levels.cuh).
#include "../ops.h"
#include "common.h"
#include "kernels/launchers.h"

namespace psa::cuda {

at::Tensor assign_levels(const at::Tensor& scores_in, bool threshold_mode, at::ArrayRef<double> bounds,
                         int64_t block_m, int64_t block_n, int64_t q_len, int64_t k_len, double min_full,
                         bool causal, bool sink, const at::Tensor& force_key_blocks,
                         const at::Tensor& force_query_blocks, const at::Tensor& cap_in) {
  constexpr const char* op = "psa.assign_levels";
  const c10::cuda::CUDAGuard device_guard(scores_in.device());
  const int64_t batch = scores_in.size(0), q_heads = scores_in.size(1);
  const int64_t n_q = scores_in.size(2), n_k = scores_in.size(3);
  PSA_CHECK(n_k <= kernels::kAssignMaxBlocks, op, ": ceil(k_len / block_n) must be at most ",
            kernels::kAssignMaxBlocks, " on CUDA, got ", n_k);
  const bool is_double = scores_in.scalar_type() == at::kDouble;
  const auto scores = scores_in.to(is_double ? at::kDouble : at::kFloat).contiguous();
  const auto key_blocks = force_key_blocks.defined() ? force_key_blocks.contiguous() : force_key_blocks;
  const auto query_blocks = force_query_blocks.defined() ? force_query_blocks.contiguous() : force_query_blocks;
  const auto cap = cap_in.defined() ? cap_in.contiguous() : cap_in;
  auto levels = at::empty(scores.sizes(), scores.options().dtype(at::kChar));

  kernels::AssignParams params{};
  params.scores = scores.data_ptr();
  params.force_key_blocks = key_blocks.defined() ? key_blocks.data_ptr<bool>() : nullptr;
  params.force_query_blocks = query_blocks.defined() ? query_blocks.data_ptr<bool>() : nullptr;
  params.cap = cap.defined() ? cap.data_ptr<int64_t>() : nullptr;
  params.levels = levels.data_ptr<int8_t>();
  for (int l = 0; l < 4; ++l) params.bounds[l] = bounds[l];
  params.min_full = min_full;
  params.batch = static_cast<int>(batch);
  params.q_heads = static_cast<int>(q_heads);
  params.cap_heads = cap.defined() ? static_cast<int>(cap.size(1)) : 1;
  params.q_len = static_cast<int>(q_len);
  params.k_len = static_cast<int>(k_len);
  params.block_m = static_cast<int>(block_m);
  params.block_n = static_cast<int>(block_n);
  params.n_q = static_cast<int>(n_q);
  params.n_k = static_cast<int>(n_k);
  params.threshold_mode = threshold_mode;
  params.causal = causal;
  params.sink = sink;
  if (levels.numel() == 0) return levels;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(op, is_double ? kernels::launch_assign_levels<double>(params, stream)
                             : kernels::launch_assign_levels<float>(params, stream));
  return levels;
}

}  // namespace psa::cuda
