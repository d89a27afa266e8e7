// AttentionParams as both passes over a level map fill it (attention_over_pyramid.cpp and
// attention_over_pyramid_backward.cpp): q, every level's K and V with their strides, the level map and
// the sizes. out and lse stay null: only the forward writes them.
#pragma once

#include <vector>

#include "common.h"
#include "kernels/params.h"

namespace psa::cuda {

// pooled = {k2, v2, k4, v4, k8, v8}; every tensor prepared (rows 16-byte aligned), level_map contiguous.
inline kernels::AttentionParams level_map_attention_params(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const std::vector<at::Tensor>& pooled,
                                                           const at::Tensor& level_map, int64_t block_m,
                                                           int64_t block_n, double scale, bool causal) {
  kernels::AttentionParams params{};
  params.q = q.data_ptr();
  set_strides(params.q_stride, q);
  for (int level = 0; level < kernels::kNumLevels; ++level) {
    const at::Tensor& level_k = level == 0 ? k : pooled[2 * (level - 1)];
    const at::Tensor& level_v = level == 0 ? v : pooled[2 * (level - 1) + 1];
    params.k[level] = level_k.data_ptr();
    params.v[level] = level_v.data_ptr();
    set_strides(params.k_stride[level], level_k);
    set_strides(params.v_stride[level], level_v);
  }
  params.levels = level_map.data_ptr<int8_t>();
  params.batch = static_cast<int>(q.size(0));
  params.q_heads = static_cast<int>(q.size(1));
  params.kv_heads = static_cast<int>(k.size(1));
  params.q_len = static_cast<int>(q.size(2));
  params.k_len = static_cast<int>(k.size(2));
  params.block_n = static_cast<int>(block_n);
  params.n_q = static_cast<int>(ceil_div(q.size(2), block_m));
  params.n_k = static_cast<int>(ceil_div(k.size(2), block_n));
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  params.causal = causal;
  return params;
}

}  // namespace psa::cuda
