// Level assignment (docs/spec.md section 5) on the GPU: one CTA per row of blocks.
//
// The row's candidate blocks are a prefix [0, m) of the key blocks (all of them without causal
// masking; up to the diagonal block with it). A block radix sort ranks them by score, descending;
// the sort key is (score as float32, descending; block index, ascending) packed into 32 + index_bits
// bits, so ties go to the lower block index exactly as in the CPU backend's stable_sort, whatever
// the sort's own tie order. The sort only passes over those bits (ceil(log2(n_k)) index bits, not
// 32): 11 radix passes instead of 16 for up to 1024 blocks. Non-candidates get the largest keys and sort last. (Scores are ranked at float32
// precision; the estimators produce float32. The mass sums below use the double values.) A block scan gives the
// mass ranked ahead of each block (threshold mode); quotas come from m (topk mode). Rows of at most 256
// key blocks rank by counting instead (kCountingRank): each candidate's rank is the number of keys
// below its own, read from shared memory, m compares per item and no radix passes; the keys and hence
// the order are the sort's. Then the fix-ups
// (floor, causal diagonal and sink, forced blocks, similarity cap) apply per block and every level of
// the row is written once.
#pragma once

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "params.h"
#include "shapes.h"

namespace psa::kernels {

template <typename Score, int kThreads, int kItems, bool kCountingRank>
__global__ void __launch_bounds__(kThreads) assign_levels_kernel(const AssignParams p) {
  using Sort = cub::BlockRadixSort<unsigned long long, kThreads, kItems>;
  using Reduce = cub::BlockReduce<double, kThreads>;
  using Scan = cub::BlockScan<double, kThreads>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } temp;
  __shared__ double s_total;
  // Slack for ceil(min_full * m) and round(e * m), so that 0.06 * 50 = 3.0000000000000004 counts as 3
  // (the CPU backend and psa/reference.py use the same value).
  constexpr double kCountEps = 1e-9;

  const int64_t row = blockIdx.x;  // (b, h, i) flattened
  const int i = static_cast<int>(row % p.n_q);
  const int h = static_cast<int>(row / p.n_q % p.q_heads);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.n_q) * p.q_heads));
  int m = p.n_k;
  if (p.causal) {
    const int horizon = min((i + 1) * p.block_m, p.q_len) - 1 + (p.k_len - p.q_len);
    m = horizon < 0 ? 0 : min(p.n_k, horizon / p.block_n + 1);
  }
  const Score* scores = static_cast<const Score*>(p.scores) + row * p.n_k;
  int8_t* levels = p.levels + row * p.n_k;

  // Slots past n_k hold indices up to kThreads * kItems - 1: the index field covers those too.
  const int index_bits = 32 - __clz(kThreads * kItems - 1);
  unsigned long long key[kItems];
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int j = threadIdx.x * kItems + item;
    // Non-negative floats order like their bit patterns; the complement sorts the largest first.
    const unsigned high = j < m ? ~__float_as_uint(static_cast<float>(scores[j])) : 0xffffffffu;
    key[item] = (static_cast<unsigned long long>(high) << index_bits) | static_cast<unsigned>(j);
  }
  int block[kItems];  // the block ranked threadIdx.x * kItems + item
  if constexpr (kCountingRank) {
    // Keys are unique (they carry the index), so a candidate's rank is the number of keys below its
    // own; keys past m are non-candidates, above every candidate, so counting stops at m. The loop
    // reads two keys per shared load (every thread the same address: a broadcast) and compares each
    // with all of this thread's items. m may be odd: slot m then holds a non-candidate (or m == the
    // even slot count), which adds nothing.
    __shared__ __align__(16) unsigned long long s_key[kThreads * kItems];
    __shared__ int s_ranked[kThreads * kItems];
#pragma unroll
    for (int item = 0; item < kItems; ++item) s_key[threadIdx.x * kItems + item] = key[item];
    __syncthreads();
    int rank[kItems] = {};
    for (int k = 0; k < m; k += 2) {
      const ulonglong2 pair = *reinterpret_cast<const ulonglong2*>(&s_key[k]);
#pragma unroll
      for (int item = 0; item < kItems; ++item) rank[item] += (pair.x < key[item]) + (pair.y < key[item]);
    }
#pragma unroll
    for (int item = 0; item < kItems; ++item) {
      const int j = threadIdx.x * kItems + item;
      s_ranked[j < m ? rank[item] : j] = j;  // non-candidates follow in index order, as their keys sort
    }
    __syncthreads();
#pragma unroll
    for (int item = 0; item < kItems; ++item) block[item] = s_ranked[threadIdx.x * kItems + item];
  } else {
    Sort(temp.sort).Sort(key, 0, 32 + index_bits);
    __syncthreads();
#pragma unroll
    for (int item = 0; item < kItems; ++item) block[item] = static_cast<int>(key[item] & ((1ull << index_bits) - 1));
  }

  // The ranks of this thread's items are threadIdx.x * kItems + item.
  double mass[kItems];
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    mass[item] = threadIdx.x * kItems + item < m ? static_cast<double>(scores[block[item]]) : 0.0;
  }
  const double total = Reduce(temp.reduce).Sum(mass);
  if (threadIdx.x == 0) s_total = total;
  __syncthreads();
  const double row_total = s_total;
  // A non-finite score anywhere in the row makes its sum non-finite: the row is computed densely.
  const bool dense_row = !isfinite(row_total);
  // The mass ahead of a block is (sum of the scores ranked ahead) / total, divided once, as in the CPU
  // backend and psa/reference.py: sums of exactly representable scores then agree in every backend.
  double before[kItems];
  Scan(temp.scan).ExclusiveSum(mass, before);
#pragma unroll
  for (int item = 0; item < kItems; ++item) before[item] = row_total > 0.0 ? before[item] / row_total : 0.0;

  const int full_floor = max(1, static_cast<int>(ceil(p.min_full * m - kCountEps)));
  int quota[4];
#pragma unroll
  for (int l = 0; l < 4; ++l) quota[l] = static_cast<int>(floor(p.bounds[l] * m + 0.5 + kCountEps));
  const bool* forced_keys = p.force_key_blocks ? p.force_key_blocks + static_cast<int64_t>(b) * p.n_k : nullptr;
  const bool whole_row = p.force_query_blocks && p.force_query_blocks[static_cast<int64_t>(b) * p.n_q + i];
  const int64_t* cap = p.cap ? p.cap + (static_cast<int64_t>(b) * p.cap_heads + h / (p.q_heads / p.cap_heads)) * p.n_k
                             : nullptr;

#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int rank = threadIdx.x * kItems + item, j = block[item];
    if (j >= p.n_k) continue;
    int level = 0;
    if (rank < m) {
      // The finest level whose bound exceeds the mass ahead (threshold) or whose quota covers the rank.
      for (int l = 3; l >= 0; --l) {
        if (p.threshold_mode ? before[item] < p.bounds[l] : rank < quota[l]) level = 1 << l;
      }
      if (rank < full_floor || dense_row) level = 1;
      if (p.causal && (j == m - 1 || (p.sink && j == 0))) level = 1;  // diagonal block and sink
      if (whole_row || (forced_keys && forced_keys[j])) level = 1;
      if (cap && level > cap[j]) level = static_cast<int>(cap[j]);
    }
    levels[j] = static_cast<int8_t>(level);
  }
}

template <typename Score>
cudaError_t launch_assign_levels(const AssignParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.q_heads * p.n_q));
  // Slots sized to the row (every slot is a key through all radix passes): wan14b's 591 blocks per
  // row take 640 slots, not 2048.
  if (p.n_k <= 128) {
    assign_levels_kernel<Score, 128, 1, true><<<grid, 128, 0, stream>>>(p);
  } else if (p.n_k <= 256) {
    assign_levels_kernel<Score, 128, 2, true><<<grid, 128, 0, stream>>>(p);
  } else if (p.n_k <= 384) {
    assign_levels_kernel<Score, 128, 3, false><<<grid, 128, 0, stream>>>(p);
  } else if (p.n_k <= 512) {
    assign_levels_kernel<Score, 128, 4, false><<<grid, 128, 0, stream>>>(p);
  } else if (p.n_k <= 640) {
    assign_levels_kernel<Score, 128, 5, false><<<grid, 128, 0, stream>>>(p);
  } else if (p.n_k <= 1024) {
    assign_levels_kernel<Score, 256, 4, false><<<grid, 256, 0, stream>>>(p);
  } else if (p.n_k <= 2048) {
    assign_levels_kernel<Score, 128, 16, false><<<grid, 128, 0, stream>>>(p);
  } else {
    assign_levels_kernel<Score, 256, 16, false><<<grid, 256, 0, stream>>>(p);  // up to kAssignMaxBlocks
  }
  return cudaGetLastError();
}

}  // namespace psa::kernels
