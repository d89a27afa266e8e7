// The "pooled" block-importance estimator (docs/spec.md section 4): softmax over candidate key blocks of
// scale * (mean of query block i) . (mean of key block j).
//
// Its arithmetic is tiny (n_q x n_k dot products of head_dim); its cost is reading Q and K once to take
// the block means. So: one memory-bound pass writes the fp32 means of every query and key block
// (block_means_kernel, 16-byte loads, several in flight per thread), then one small kernel computes
// the logits of kRowsPerCta query blocks against key blocks staged through shared memory and
// normalises each row (pooled_scores_kernel). Nothing is materialised at full sequence length.
#pragma once

#include <cfloat>
#include <cstdint>

#include "candidate_blocks.cuh"
#include "device_utils.cuh"
#include "params.h"

namespace psa::kernels {

// Means over the real rows of each block of `block_size` rows: out[bh][block][d] (fp32). One CTA per
// (batch * head, block); a thread sums 8 columns of every kRowGroups-th row, then the row groups are
// added through shared memory.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) block_means_kernel(const T* __restrict__ x, int64_t batch_stride,
                                                          int64_t head_stride, int64_t token_stride, int heads,
                                                          int length, int block_size, float* __restrict__ out) {
  constexpr int kChunks = kHeadDim / 8, kRowGroups = 256 / kChunks;
  __shared__ float partial[kRowGroups][kHeadDim + 1];  // +1: a column's row groups sit in different banks
  const int bh = blockIdx.x, block = blockIdx.y, b = bh / heads, h = bh % heads;
  const int chunk = threadIdx.x % kChunks, group = threadIdx.x / kChunks;
  const int first = block * block_size, count = min(block_size, length - first);
  const T* base = x + b * batch_stride + h * head_stride + static_cast<int64_t>(first) * token_stride + chunk * 8;
  float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread
  for (int row = group; row < count; row += kRowGroups * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = row + u * kRowGroups;
      raw[u] = r < count ? __ldg(reinterpret_cast<const uint4*>(base + r * token_stride)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const T* values = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum[e] += to_float(values[e]);
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) partial[group][chunk * 8 + e] = sum[e];
  __syncthreads();
  if (threadIdx.x < kHeadDim) {
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) total += partial[g][threadIdx.x];
    out[(static_cast<int64_t>(bh) * gridDim.y + block) * kHeadDim + threadIdx.x] = total / count;
  }
}

struct PooledScoresShape {
  static constexpr int kThreads = 256;
  static constexpr int kRowsPerCta = 16;   // query blocks per CTA: key means are staged once for all
  static constexpr int kKeysPerStage = 64;
  static constexpr int kRowsPerThread = kRowsPerCta / (kThreads / kKeysPerStage);
  static constexpr int kPad = 4;           // floats: 16-byte rows 33 x 16 bytes apart, no bank conflicts
};

// scores[bh][i][j] for kRowsPerCta query blocks i: logits in the log2 domain into the output row, then
// each warp normalises its rows (non-candidates 0; a row with no candidate all 0).
template <int kHeadDim>
__global__ void __launch_bounds__(PooledScoresShape::kThreads) pooled_scores_kernel(const PooledParams p) {
  using Shape = PooledScoresShape;
  constexpr int kRows = Shape::kRowsPerCta, kKeys = Shape::kKeysPerStage, kRowsPerThread = Shape::kRowsPerThread;
  __shared__ __align__(16) float q_means[kRows][kHeadDim + Shape::kPad];
  __shared__ __align__(16) float k_means[kKeys][kHeadDim + Shape::kPad];
  const int bh = blockIdx.x, first_row = blockIdx.y * kRows;
  const int kv_bh = (bh / p.q_heads) * p.kv_heads + (bh % p.q_heads) / (p.q_heads / p.kv_heads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const CandidateBlocks candidates(p.n_k, p.block_m, p.block_n, p.q_len, p.k_len, p.causal);
  const int rows = min(kRows, p.n_q - first_row);
  int active = 0;  // key blocks any of these rows may see
  for (int r = 0; r < rows; ++r) active = max(active, candidates.last(first_row + r) + 1);

  for (int index = tid; index < kRows * kHeadDim / 4; index += Shape::kThreads) {
    const int r = index / (kHeadDim / 4), d = 4 * (index % (kHeadDim / 4));
    *reinterpret_cast<float4*>(&q_means[r][d]) =
        r < rows ? *reinterpret_cast<const float4*>(p.q_means + (static_cast<int64_t>(bh) * p.n_q + first_row + r) *
                                                                    kHeadDim + d)
                 : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float* scores = p.scores + (static_cast<int64_t>(bh) * p.n_q + first_row) * p.n_k;
  // Thread -> (key j_local, rows r_first .. r_first + kRowsPerThread - 1): a warp's lanes take 32
  // different keys of the same rows, so q_means reads are broadcasts.
  const int j_local = tid % kKeys, r_first = (tid / kKeys) * kRowsPerThread;
  for (int key_base = 0; key_base < active; key_base += kKeys) {
    __syncthreads();  // the previous stage's readers are done (and q_means is written)
    for (int index = tid; index < kKeys * kHeadDim / 4; index += Shape::kThreads) {
      const int j = index / (kHeadDim / 4), d = 4 * (index % (kHeadDim / 4));
      *reinterpret_cast<float4*>(&k_means[j][d]) =
          key_base + j < p.n_k
              ? *reinterpret_cast<const float4*>(p.k_means + (static_cast<int64_t>(kv_bh) * p.n_k + key_base + j) *
                                                                 kHeadDim + d)
              : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    __syncthreads();
    const int j = key_base + j_local;
    if (j >= p.n_k) continue;
    float dot[kRowsPerThread] = {};
#pragma unroll 8
    for (int d = 0; d < kHeadDim; d += 4) {
      const float4 key = *reinterpret_cast<const float4*>(&k_means[j_local][d]);
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const float4 query = *reinterpret_cast<const float4*>(&q_means[r_first + r][d]);
        dot[r] = fmaf(query.x, key.x, fmaf(query.y, key.y, fmaf(query.z, key.z, fmaf(query.w, key.w, dot[r]))));
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = r_first + r;
      if (row < rows) {
        scores[static_cast<int64_t>(row) * p.n_k + j] = j <= candidates.last(first_row + row) ? dot[r] * p.scale_log2
                                                                                               : -INFINITY;
      }
    }
  }
  __syncthreads();  // every logit of these rows is written (global memory, visible within the CTA)

  for (int r = warp; r < rows; r += Shape::kThreads / 32) {
    float* row = scores + static_cast<int64_t>(r) * p.n_k;
    const int last = candidates.last(first_row + r);
    float peak = -INFINITY;
    for (int j = lane; j <= last; j += 32) peak = max_nan(peak, row[j]);
    peak = warp_max(peak);
    float total = 0.f;
    for (int j = lane; j <= last; j += 32) total += exp2f(row[j] - peak);
    total = warp_sum(total);
    const float inverse = total == 0.f ? 0.f : 1.f / total;  // NaN stays NaN: the row runs dense
    for (int j = lane; j < p.n_k; j += 32) row[j] = (j <= last ? exp2f(row[j] - peak) : 0.f) * inverse;
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_estimate_pooled(const PooledParams& p, cudaStream_t stream) {
  block_means_kernel<T, kHeadDim><<<dim3(p.batch * p.q_heads, p.n_q), 256, 0, stream>>>(
      static_cast<const T*>(p.q), p.q_stride[0], p.q_stride[1], p.q_stride[2], p.q_heads, p.q_len, p.block_m,
      p.q_means);
  block_means_kernel<T, kHeadDim><<<dim3(p.batch * p.kv_heads, p.n_k), 256, 0, stream>>>(
      static_cast<const T*>(p.k), p.k_stride[0], p.k_stride[1], p.k_stride[2], p.kv_heads, p.k_len, p.block_n,
      p.k_means);
  const dim3 grid(p.batch * p.q_heads, (p.n_q + PooledScoresShape::kRowsPerCta - 1) / PooledScoresShape::kRowsPerCta);
  pooled_scores_kernel<kHeadDim><<<grid, PooledScoresShape::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
