// Where the key-major dK / dV passes write: level L's rows of dK_L and dV_L for one (batch x key head).
// Shared by the mma.sync kernel (attention_backward.cuh) and the Hopper one
// (sm90/attention_backward_dkdv_sm90.cuh).
#pragma once

#include <cstdint>

#include "../params.h"

namespace psa::kernels {

template <typename T>
struct LevelGradientRows {
  T* dk;  // row 0 of (batch, key head) in dK_L: contiguous [tokens x head_dim]
  T* dv;
};

// Selected with constant indices: indexing the kernel parameters with a run-time L would copy them to
// local memory. `bkv` = batch * kv_heads + key head, `tokens` = level L's length.
template <typename T, int kHeadDim>
__device__ __forceinline__ LevelGradientRows<T> level_gradient_rows(const AttentionBackwardParams& bp, int L, int bkv,
                                                                    int tokens) {
  LevelGradientRows<T> rows{nullptr, nullptr};
  const int64_t first_row = static_cast<int64_t>(bkv) * tokens;
#pragma unroll
  for (int level = 0; level < kNumLevels; ++level) {
    if (level == L) {
      rows.dk = static_cast<T*>(bp.dk[level]) + first_row * kHeadDim;
      rows.dv = static_cast<T*>(bp.dv[level]) + first_row * kHeadDim;
    }
  }
  return rows;
}

}  // namespace psa::kernels
