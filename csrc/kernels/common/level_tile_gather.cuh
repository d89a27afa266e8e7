// The portable (sm80, cp.async) kernels' view of the pyramid: level L's K and V rows of one (batch, key
// head), and the gather of one schedule tile (common/tile_geometry.cuh) into shared memory with its
// per-column logit bias and last covered key. The forward (attention_with_levels.cuh) and the backward's
// dq pass (attention_backward.cuh) load their tiles with it; the key-major dK / dV pass reads its key
// block's rows through level_rows.
#pragma once

#include <cstdint>

#include "../device_utils.cuh"
#include "../params.h"
#include "tile_geometry.cuh"

namespace psa::kernels {

template <typename T>
struct LevelRows {
  const T* k;  // row 0 of (batch, key head) in level L's K
  const T* v;
  int64_t k_token_stride, v_token_stride;
};

// Selected with constant indices: indexing the kernel parameters with a run-time L would copy them to
// local memory.
template <typename T>
__device__ __forceinline__ LevelRows<T> level_rows(const AttentionParams& p, int L, int b, int kv_head) {
  LevelRows<T> rows{nullptr, nullptr, 0, 0};
#pragma unroll
  for (int level = 0; level < kNumLevels; ++level) {
    if (level == L) {
      rows.k = static_cast<const T*>(p.k[level]) + b * p.k_stride[level][0] + kv_head * p.k_stride[level][1];
      rows.v = static_cast<const T*>(p.v[level]) + b * p.v_stride[level][0] + kv_head * p.v_stride[level][1];
      rows.k_token_stride = p.k_stride[level][2];
      rows.v_token_stride = p.v_stride[level][2];
    }
  }
  return rows;
}

// Tile `geometry` of a schedule: its K and V rows into swizzled [kTileN x kHeadDim] tiles by cp.async
// (zeros for empty columns), and per column the bias log2(count) (-inf for an empty one) and the last
// original key it covers. The caller commits and waits.
template <typename T, int kHeadDim, int kTileN, int kThreads>
__device__ __forceinline__ void gather_level_tile(const AttentionParams& p, const TileGeometry<kTileN>& geometry,
                                                  const uint16_t* ids, int b, int kv_head, T* k_dst, T* v_dst,
                                                  float* bias, int* last, int tid) {
  using Rows = SwizzledRows<kHeadDim>;
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  const LevelRows<T> src = level_rows<T>(p, geometry.level, b, kv_head);
  for (int c = tid; c < kTileN * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const int64_t token = geometry.token(row, ids);
    const bool valid = token < geometry.tokens;
    cp_async_16(k_dst + Rows::offset(row, chunk), src.k + (valid ? token * src.k_token_stride + chunk * 8 : 0),
                valid);
    cp_async_16(v_dst + Rows::offset(row, chunk), src.v + (valid ? token * src.v_token_stride + chunk * 8 : 0),
                valid);
  }
  for (int row = tid; row < kTileN; row += kThreads) {
    bias[row] = geometry.bias(row);
    last[row] = geometry.last_key(row, ids);
  }
}

}  // namespace psa::kernels
