// The "pooled" block-importance estimator (docs/spec.md section 4): softmax over candidate key blocks of
// scale * qbar_i . kbar_j, qbar_i the mean of query block i, kbar_j key block j's level-8 keys weighted by
// their counts.
//
// Its arithmetic is tiny (n_q x n_k dot products of head_dim); its cost is reading the inputs once. In
// the pipeline the pyramid has already written k8 (an eighth of k), so what is left to read is q. Two
// launches, no host synchronisation:
//   - pooled_means_kernel: the fp32 means of every query block and every key block, one launch for
//     both (a CTA takes whole blocks of one side). Memory-bound on q: a CTA per query block, every
//     thread's loads issued before its first add (one block, up to 32 KiB, in flight a CTA).
//   - pooled_scores_kernel: the logits of 16 query blocks per CTA against every key block on the
//     tensor cores (3xTF32 mma.sync: fp32 operands split into two tf32 values each, about fp32's
//     precision), each row's softmax kept online per lane and combined over the CTA, so no pass walks a
//     row in a dependent loop.
#pragma once

#include <cfloat>
#include <cstdint>

#include "candidate_blocks.cuh"
#include "device_utils.cuh"
#include "params.h"
#include "pyramid_group.cuh"
#include "shapes.h"

namespace psa::kernels {

// The mean of query block `block` of head `bh` (one block per CTA): thread (chunk, row group) adds the
// block's rows row_group, row_group + kRowGroups, ... of its 8 columns, every load issued before the first
// add; the row groups are then added through shared memory.
template <typename T, int kHeadDim>
__device__ __forceinline__ void query_block_mean(const PooledParams& p, int bh, int block, float* partial) {
  constexpr int kChunks = kHeadDim / 8, kRowGroups = PooledMeansShape::kThreads / kChunks;
  constexpr int kMaxRows = 128 / kRowGroups;  // rows per thread at the largest block
  const int chunk = threadIdx.x % kChunks, row_group = threadIdx.x / kChunks;
  const int first = block * p.block_m, count = min(p.block_m, p.q_len - first);
  const int b = bh / p.q_heads, h = bh % p.q_heads;
  const T* base = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] +
                  static_cast<int64_t>(first) * p.q_stride[2] + chunk * 8;
  uint4 raw[kMaxRows];
#pragma unroll
  for (int u = 0; u < kMaxRows; ++u) {
    const int row = row_group + u * kRowGroups;
    raw[u] = row < count ? __ldg(reinterpret_cast<const uint4*>(base + static_cast<int64_t>(row) * p.q_stride[2]))
                         : make_uint4(0, 0, 0, 0);
  }
  float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int u = 0; u < kMaxRows; ++u) {
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] += to_float(reinterpret_cast<const T*>(&raw[u])[e]);
  }
  // partial[row group][kHeadDim + 1]: a column's row groups sit in different banks.
#pragma unroll
  for (int e = 0; e < 8; ++e) partial[row_group * (kHeadDim + 1) + chunk * 8 + e] = sum[e];
  __syncthreads();
  if (threadIdx.x < kHeadDim) {
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) total += partial[g * (kHeadDim + 1) + threadIdx.x];
    p.q_means[(static_cast<int64_t>(bh) * p.n_q + block) * kHeadDim + threadIdx.x] = total / static_cast<float>(count);
  }
}

// The contribution of level-8 key `group` (a real one) of a key block to its mean: the key, times the
// number of keys it covers (exact in fp32). The two key paths below add these in group order, so reading
// k8 and pooling k give the same sums bit for bit.
__device__ __forceinline__ float level8_contribution(float key, int count) { return static_cast<float>(count) * key; }

// The means of key blocks [first_block, first_block + kThreads / kChunks) of head `bh` from the pyramid's
// k8: thread (block, chunk) adds the block's level-8 keys in order, loading kBatch of them before adding.
template <typename T, int kHeadDim>
__device__ __forceinline__ void key_block_means_from_level8(const PooledParams& p, int bh, int first_block) {
  constexpr int kChunks = kHeadDim / 8, kBatch = 8;  // 8 loads in flight: the query path's register budget
  const int chunk = threadIdx.x % kChunks, block = first_block + threadIdx.x / kChunks;
  if (block >= p.n_k) return;
  const int groups = p.block_n / 8, first_group = block * groups;
  const int b = bh / p.kv_heads, h = bh % p.kv_heads;
  const T* base = static_cast<const T*>(p.k8) + b * p.k8_stride[0] + h * p.k8_stride[1] + chunk * 8;
  float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int batch = 0; batch < groups; batch += kBatch) {
    uint4 raw[kBatch];
#pragma unroll
    for (int g = 0; g < kBatch; ++g) {
      const int group = first_group + batch + g;
      const bool real = batch + g < groups && 8 * group < p.k_len;
      raw[g] = real ? __ldg(reinterpret_cast<const uint4*>(base + static_cast<int64_t>(group) * p.k8_stride[2]))
                    : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int g = 0; g < kBatch; ++g) {
      const int count = min(8, p.k_len - 8 * (first_group + batch + g));
      if (batch + g >= groups || count <= 0) break;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        sum[e] += level8_contribution(to_float(reinterpret_cast<const T*>(&raw[g])[e]), count);
      }
    }
  }
  const int count = min(p.block_n, p.k_len - block * p.block_n);
  float* out = p.k_means + (static_cast<int64_t>(bh) * p.n_k + block) * kHeadDim + chunk * 8;
  reinterpret_cast<float4*>(out)[0] = make_float4(sum[0] / count, sum[1] / count, sum[2] / count, sum[3] / count);
  reinterpret_cast<float4*>(out)[1] = make_float4(sum[4] / count, sum[5] / count, sum[6] / count, sum[7] / count);
}

// The means of key blocks [first_block, ...) of head `bh` pooling k itself (no k8 given): thread (block,
// group, chunk) forms the group's level-8 key as kv_pyramid does (pyramid_group.cuh), then the groups'
// contributions are added in order through shared memory.
template <typename T, int kHeadDim>
__device__ __forceinline__ void key_block_means_from_keys(const PooledParams& p, int bh, int first_block,
                                                          float* partial) {
  constexpr int kChunks = kHeadDim / 8;
  const int groups = p.block_n / 8;
  const int blocks_here = min(PooledMeansShape::key_blocks_per_cta(kHeadDim, p.block_n, false), p.n_k - first_block);
  const int tid = threadIdx.x, chunk = tid % kChunks, group = tid / kChunks % groups,
            local_block = tid / (kChunks * groups);
  float contribution[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (local_block < blocks_here) {
    const int b = bh / p.kv_heads, h = bh % p.kv_heads;
    const int first = (first_block + local_block) * p.block_n + 8 * group;  // the group's first key
    const int count = min(8, p.k_len - first);
    const T* base = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1] + chunk * 8;
    uint4 raw[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      raw[t] = t < count ? __ldg(reinterpret_cast<const uint4*>(base + static_cast<int64_t>(first + t) * p.k_stride[2]))
                         : make_uint4(0, 0, 0, 0);
    }
    if (count > 0) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float column[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) column[t] = to_float(reinterpret_cast<const T*>(&raw[t])[e]);
        const T key = from_float<T>(pooled_mean(pyramid_group_sums(column).s8, count));  // kv_pyramid's k8
        contribution[e] = level8_contribution(to_float(key), count);
      }
    }
  }
  // partial[item][8], item = (local block, group, chunk) = tid: for a fixed group, 32 consecutive
  // columns are 32 consecutive floats (no bank conflicts on the reads below).
  reinterpret_cast<float4*>(partial + 8 * tid)[0] =
      make_float4(contribution[0], contribution[1], contribution[2], contribution[3]);
  reinterpret_cast<float4*>(partial + 8 * tid)[1] =
      make_float4(contribution[4], contribution[5], contribution[6], contribution[7]);
  __syncthreads();
  for (int index = tid; index < blocks_here * kHeadDim; index += PooledMeansShape::kThreads) {
    const int block_local = index / kHeadDim, d = index % kHeadDim, block = first_block + block_local;
    const float* column = partial + block_local * groups * kHeadDim + d;
    float sum = 0.f;
    for (int g = 0; g < groups && 8 * (block * groups + g) < p.k_len; ++g) sum += column[g * kHeadDim];
    const int count = min(p.block_n, p.k_len - block * p.block_n);
    p.k_means[(static_cast<int64_t>(bh) * p.n_k + block) * kHeadDim + d] = sum / count;
  }
}

// CTAs [0, key_ctas) average key blocks (from k8 when kKeysFromLevel8, else from k), the rest one query
// block each: one launch for both sides. The key CTAs go first: each thread's loads are a few dependent
// batches, longer than a query CTA's one, so at the end of the grid they would be its tail.
template <typename T, int kHeadDim, bool kKeysFromLevel8>
__global__ void __launch_bounds__(PooledMeansShape::kThreads, PooledMeansShape::kMinCtasPerSm)
    pooled_means_kernel(const PooledParams p) {
  using Shape = PooledMeansShape;
  // The query path's [row groups][kHeadDim + 1] or the key path's [items][8].
  constexpr int kRowGroupFloats = Shape::kThreads / (kHeadDim / 8) * (kHeadDim + 1);
  __shared__ __align__(16) float partial[Shape::kThreads * 8 > kRowGroupFloats ? Shape::kThreads * 8 : kRowGroupFloats];
  const int per_cta = Shape::key_blocks_per_cta(kHeadDim, p.block_n, kKeysFromLevel8);
  const int per_head = (p.n_k + per_cta - 1) / per_cta;
  const int64_t key_ctas = static_cast<int64_t>(p.batch) * p.kv_heads * per_head;
  const int64_t cta = blockIdx.x;
  if (cta >= key_ctas) {
    const int64_t query_cta = cta - key_ctas;
    query_block_mean<T, kHeadDim>(p, static_cast<int>(query_cta / p.n_q), static_cast<int>(query_cta % p.n_q),
                                  partial);
    return;
  }
  const int bh = static_cast<int>(cta / per_head), first_block = static_cast<int>(cta % per_head) * per_cta;
  if constexpr (kKeysFromLevel8) {
    key_block_means_from_level8<T, kHeadDim>(p, bh, first_block);
  } else {
    key_block_means_from_keys<T, kHeadDim>(p, bh, first_block, partial);
  }
}

// scores[bh][i][j] for the CTA's 16 query blocks i (non-candidates 0; a row with no candidate all 0): the
// logits of the fp32 means on the tensor cores (mma.sync m16n8k8 in 3xTF32, about fp32's precision), the
// query means as the A operand (split once, held in registers), each warp taking kTilesPerWarp n8 tiles
// of keys per pass, their B fragments loaded straight from k_means, all before the pass's first MMA. A
// tile's three 3xTF32 products go to three accumulators, so the warp runs 3 kTilesPerWarp independent
// MMA chains: with one accumulator a tile, its 48 MMAs (head_dim 128) were one dependent chain, and the
// kernel was bound by their latency (18.5 -> 16.4 us on wan1.3b, H200). The k order of the MMAs is a
// permutation of the columns: lane (g, t) feeds columns 16 c + 4 t + {0, 1} to k step 2 c and
// 16 c + 4 t + {2, 3} to k step 2 c + 1, the same for A and B, so each of its loads is one float4. A
// lane keeps the online softmax (max, rescaled sum) of its two rows over the keys it saw; the CTA
// combines them, then every lane turns the logits it stored into probabilities. No pass walks a row in a
// dependent loop.
template <int kHeadDim>
__global__ void __launch_bounds__(PooledScoresShape::kThreads) pooled_scores_kernel(const PooledParams p) {
  using Shape = PooledScoresShape;
  constexpr int kRows = Shape::kRowsPerCta, kWarps = Shape::kThreads / 32, kTiles = Shape::kTilesPerWarp;
  constexpr int kKeysPerPass = kWarps * kTiles * 8;
  constexpr int kChunks = kHeadDim / 16;     // 16-column chunks: two k8 steps each
  constexpr int kRowStride = kHeadDim + 16;  // floats, 16 mod 32: a quarter warp's float4 loads hit distinct banks
  static_assert(kRows == 16, "one m16 tile of query blocks");
  __shared__ __align__(16) float query_means[kRows * kRowStride];
  __shared__ int row_last[kRows];
  __shared__ float warp_peak[kWarps][kRows], warp_total[kWarps][kRows];
  const int bh = blockIdx.x, first_row = blockIdx.y * kRows;
  const int kv_bh = (bh / p.q_heads) * p.kv_heads + (bh % p.q_heads) / (p.q_heads / p.kv_heads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const CandidateBlocks candidates(p.n_k, p.block_m, p.block_n, p.q_len, p.k_len, p.causal);
  const int rows = min(kRows, p.n_q - first_row);
  if (tid < kRows) row_last[tid] = tid < rows ? candidates.last(first_row + tid) : -1;
  for (int index = tid; index < kRows * kHeadDim / 4; index += Shape::kThreads) {
    const int r = index / (kHeadDim / 4), d = 4 * (index % (kHeadDim / 4));
    *reinterpret_cast<float4*>(&query_means[r * kRowStride + d]) =
        r < rows ? *reinterpret_cast<const float4*>(p.q_means +
                                                    (static_cast<int64_t>(bh) * p.n_q + first_row + r) * kHeadDim + d)
                 : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __syncthreads();
  // A fragments of both k steps of every chunk: [chunk][k step][a0..a3] = rows g, g + 8 at column +0 / +1.
  Tf32Pair a[kChunks][2][4];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const float4 top = *reinterpret_cast<const float4*>(&query_means[g * kRowStride + 16 * c + 4 * t]);
    const float4 bottom = *reinterpret_cast<const float4*>(&query_means[(g + 8) * kRowStride + 16 * c + 4 * t]);
    a[c][0][0] = split_tf32(top.x), a[c][0][1] = split_tf32(bottom.x);
    a[c][0][2] = split_tf32(top.y), a[c][0][3] = split_tf32(bottom.y);
    a[c][1][0] = split_tf32(top.z), a[c][1][1] = split_tf32(bottom.z);
    a[c][1][2] = split_tf32(top.w), a[c][1][3] = split_tf32(bottom.w);
  }
  const int last[2] = {row_last[g], row_last[g + 8]};  // -1 for rows past `rows`: no candidate
  int active = 0;  // key blocks any of these rows may see
#pragma unroll
  for (int r = 0; r < kRows; ++r) active = max(active, row_last[r] + 1);
  float* scores = p.scores + (static_cast<int64_t>(bh) * p.n_q + first_row) * p.n_k;
  // This lane's softmax state of rows g and g + 8 over the candidates it has seen (log2 domain).
  float peak[2] = {-INFINITY, -INFINITY}, total[2] = {0.f, 0.f};

  for (int key_base = 0; key_base < active; key_base += kKeysPerPass) {
    // Every B fragment of the pass is loaded before the first MMA; then the k steps run across the tiles,
    // each tile's three products in their own accumulators: 3 kTiles independent MMA chains.
    float4 b[kTiles][kChunks];
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
      const int key = key_base + (warp * kTiles + tile) * 8 + g;  // this lane's B fragment column
      const float* key_mean = p.k_means + (static_cast<int64_t>(kv_bh) * p.n_k + key) * kHeadDim + 4 * t;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        b[tile][c] = key < p.n_k ? *reinterpret_cast<const float4*>(key_mean + 16 * c) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    float products[kTiles][3][4] = {};  // rows g, g + 8 x keys first_key + 2 t, + 1; lo*hi, hi*lo, hi*hi
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
        mma_1688_3xtf32(products[tile], a[c][0], split_tf32(b[tile][c].x), split_tf32(b[tile][c].y));
        mma_1688_3xtf32(products[tile], a[c][1], split_tf32(b[tile][c].z), split_tf32(b[tile][c].w));
      }
    }
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
      const int first_key = key_base + (warp * kTiles + tile) * 8;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = first_key + 2 * t + e;
          if (j > last[h]) continue;  // past the row's candidates, past n_k, or a row past `rows`
          const int i = 2 * h + e;
          const float logit = ((products[tile][0][i] + products[tile][1][i]) + products[tile][2][i]) * p.scale_log2;
          scores[static_cast<int64_t>(g + 8 * h) * p.n_k + j] = logit;
          const float next = max_nan(peak[h], logit);
          const float base = next == -INFINITY ? 0.f : next;  // -inf - -inf would be NaN
          total[h] = total[h] * exp2f(peak[h] - base) + exp2f(logit - base);
          peak[h] = next;
        }
      }
    }
  }

  // The rows' softmax over the CTA: peaks, then totals rescaled to them (quads, then across warps).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float m = quad_max(peak[h]);
    if (t == 0) warp_peak[warp][g + 8 * h] = m;
  }
  __syncthreads();
  float base[2];  // what each row's exp2 subtracts: its peak, or 0 for a row without candidates
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m = warp_peak[0][g + 8 * h];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) m = max_nan(m, warp_peak[w][g + 8 * h]);
    base[h] = m == -INFINITY ? 0.f : m;
    const float sum = quad_sum(total[h] * exp2f(peak[h] - base[h]));  // a lane without candidates adds 0
    if (t == 0) warp_total[warp][g + 8 * h] = sum;
  }
  __syncthreads();
  float inverse[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = warp_total[0][g + 8 * h];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += warp_total[w][g + 8 * h];
    inverse[h] = sum == 0.f ? 0.f : 1.f / sum;  // NaN stays NaN: the row runs dense
  }

  // This lane's entries, logits to probabilities, kPassesPerBatch passes at a time: all loads of a batch
  // are issued before its first store (the compiler may not sink them, see below), so a batch costs one
  // round trip to L2, not one per load. A non-candidate is 0 * inverse: 0, or NaN in a NaN row, as the
  // reference's softmax gives.
  constexpr int kPassesPerBatch = 4;
  for (int batch_base = 0; batch_base < p.n_k; batch_base += kPassesPerBatch * kKeysPerPass) {
    float logit[kPassesPerBatch][kTiles][2][2];
#pragma unroll
    for (int pass = 0; pass < kPassesPerBatch; ++pass) {
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = batch_base + pass * kKeysPerPass + (warp * kTiles + tile) * 8 + 2 * t + e;
            logit[pass][tile][h][e] = j <= last[h] ? scores[static_cast<int64_t>(g + 8 * h) * p.n_k + j] : 0.f;
          }
        }
      }
    }
    // Without this the compiler interleaved loads and stores whose addresses it could tell apart, and
    // each load's wait held up the rest (a third of the kernel's stall samples, ncu on the H200).
    asm volatile("" ::: "memory");
#pragma unroll
    for (int pass = 0; pass < kPassesPerBatch; ++pass) {
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = batch_base + pass * kKeysPerPass + (warp * kTiles + tile) * 8 + 2 * t + e;
            if (g + 8 * h < rows && j < p.n_k) {
              scores[static_cast<int64_t>(g + 8 * h) * p.n_k + j] =
                  (j <= last[h] ? exp2f(logit[pass][tile][h][e] - base[h]) : 0.f) * inverse[h];
            }
          }
        }
      }
    }
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_estimate_pooled(const PooledParams& p, cudaStream_t stream) {
  using Means = PooledMeansShape;
  const bool from_level8 = p.k8 != nullptr;
  const int64_t key_ctas_per_head = (p.n_k + Means::key_blocks_per_cta(kHeadDim, p.block_n, from_level8) - 1) /
                                    Means::key_blocks_per_cta(kHeadDim, p.block_n, from_level8);
  const dim3 means_grid(static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.q_heads * p.n_q +
                                              static_cast<int64_t>(p.batch) * p.kv_heads * key_ctas_per_head));
  if (from_level8) {
    pooled_means_kernel<T, kHeadDim, true><<<means_grid, Means::kThreads, 0, stream>>>(p);
  } else {
    pooled_means_kernel<T, kHeadDim, false><<<means_grid, Means::kThreads, 0, stream>>>(p);
  }
  const dim3 grid(p.batch * p.q_heads, (p.n_q + PooledScoresShape::kRowsPerCta - 1) / PooledScoresShape::kRowsPerCta);
  pooled_scores_kernel<kHeadDim><<<grid, PooledScoresShape::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
