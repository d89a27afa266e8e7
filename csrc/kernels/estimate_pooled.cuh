// The "pooled" block-importance estimator (docs/spec.md section 4): softmax over candidate key blocks of
// scale * qbar_i . kbar_j, qbar_i the mean of query block i, kbar_j key block j's level-8 keys weighted by
// their counts.
//
// Its arithmetic is tiny (n_q x n_k dot products of head_dim); its cost is reading q once. In the pipeline
// the pyramid has already written k8 (an eighth of k). Two launches, no host synchronisation:
//   - pooled_key_means_from_level8_kernel (or _from_keys_kernel, pooling k itself when no k8 is given):
//     the fp32 means of every key block. On sm90 each CTA lets the scores kernel launch as it starts.
//   - pooled_scores_kernel: 16 query blocks per CTA. It first reads those blocks of q and leaves their
//     means in shared memory (no round trip through global memory; on sm90 this read, the bulk of the
//     bytes, may start before the key means kernel ends), then waits for the key means and takes the
//     logits on the tensor cores
//     (3xTF32 mma.sync: fp32 operands split into two tf32 values each, about fp32's precision), each row's
//     softmax kept online per lane and combined over the CTA, so no pass walks a row in a dependent loop.
//     The logit part is latency-bound: built to issue few instructions (see the kernel).
// Before, a means kernel wrote the query means too and the scores kernel read them back once it had ended.
// H200, the estimate under do_bench's L2 flush, before -> now: cogvideox 47.8 -> 46.6 us, wan14b 340.8 ->
// 321.7, but wan1.3b 48.6 -> 54.2: its 192 scores CTAs (1.5 an SM) read q more slowly than the old means
// kernel's thousands of small ones. The dependent launch gains cogvideox 2.5 us and costs wan1.3b 3.2
// (51.0 without it): launched while key CTAs hold SMs, its CTAs are spread less evenly.
#pragma once

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "candidate_blocks.cuh"
#include "device_utils.cuh"
#include "params.h"
#include "pyramid_group.cuh"
#include "shapes.h"

namespace psa::kernels {

// The contribution of level-8 key `group` (a real one) of a key block to its mean: the key, times the
// number of keys it covers (exact in fp32). The two key paths below add these in group order, so reading
// k8 and pooling k give the same sums bit for bit.
__device__ __forceinline__ float level8_contribution(float key, int count) { return static_cast<float>(count) * key; }

// The mean of 8 columns (chunk) of key block `block` of head `bh` from the pyramid's k8: the block's
// level-8 keys added in order, kBatch of them loaded before adding.
template <typename T, int kHeadDim>
__device__ __forceinline__ void key_block_mean_from_level8(const PooledParams& p, int bh, int block, int chunk) {
  constexpr int kBatch = 8;  // 8 loads in flight: 64 registers
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
      raw[g] = real ? load_global_256b_prefetch(base + static_cast<int64_t>(group) * p.k8_stride[2])
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
  const int blocks_here = min(PooledKeyMeansShape::key_blocks_per_cta(kHeadDim, p.block_n), p.n_k - first_block);
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
      raw[t] = t < count ? load_global_256b_prefetch(base + static_cast<int64_t>(first + t) * p.k_stride[2])
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
  for (int index = tid; index < blocks_here * kHeadDim; index += PooledKeyMeansShape::kThreads) {
    const int block_local = index / kHeadDim, d = index % kHeadDim, block = first_block + block_local;
    const float* column = partial + block_local * groups * kHeadDim + d;
    float sum = 0.f;
    for (int g = 0; g < groups && 8 * (block * groups + g) < p.k_len; ++g) sum += column[g * kHeadDim];
    const int count = min(p.block_n, p.k_len - block * p.block_n);
    p.k_means[(static_cast<int64_t>(bh) * p.n_k + block) * kHeadDim + d] = sum / count;
  }
}

// The key means from k8, the pipeline's path: a thread per (head, block, 8-column chunk), the chunks of a
// block in consecutive threads (a warp's loads cover whole 128-byte lines of a key row at head_dim 64).
// Wide, so that its few dependent loads a thread end early: measured on the H200 against one CTA an SM
// looping over items (so that four scores CTAs would fit beside it), whose 13 us (against 7.6) made the
// estimate 3.7 us slower on cogvideox.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(PooledKeyMeansShape::kLevel8Threads, PooledKeyMeansShape::kLevel8MinCtasPerSm)
    pooled_key_means_from_level8_kernel(const PooledParams p) {
  allow_dependent_launch();  // sm90: the scores kernel may launch now
  constexpr int kChunks = kHeadDim / 8;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * PooledKeyMeansShape::kLevel8Threads + threadIdx.x;
  if (item >= static_cast<int64_t>(p.batch) * p.kv_heads * p.n_k * kChunks) return;
  const int64_t block_of_all = item / kChunks;
  key_block_mean_from_level8<T, kHeadDim>(p, static_cast<int>(block_of_all / p.n_k),
                                          static_cast<int>(block_of_all % p.n_k), static_cast<int>(item % kChunks));
}

// The key means pooling k itself (no k8 given): reads all of k, so a wide launch; each CTA averages
// key_blocks_per_cta key blocks of one head.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(PooledKeyMeansShape::kThreads, PooledKeyMeansShape::kMinCtasPerSm)
    pooled_key_means_from_keys_kernel(const PooledParams p) {
  using Shape = PooledKeyMeansShape;
  allow_dependent_launch();  // sm90: the scores kernel may launch as the last wave starts
  __shared__ __align__(16) float partial[Shape::kThreads * 8];  // [items][8]
  const int per_cta = Shape::key_blocks_per_cta(kHeadDim, p.block_n);
  const int per_head = (p.n_k + per_cta - 1) / per_cta;
  key_block_means_from_keys<T, kHeadDim>(p, static_cast<int>(blockIdx.x / per_head),
                                         static_cast<int>(blockIdx.x % per_head) * per_cta, partial);
}

// A [rows][kHeadDim] fp32 tile in shared memory without padding: float4 slot s of row r sits at slot
// s ^ 4 (r & 1), so that the two rows a quarter warp reads with one float4 load each (fragment rows g and
// g + 1 at the same column) fall in different halves of the 32 banks.
template <int kHeadDim>
__device__ __forceinline__ int mean_tile_offset(int row, int slot) {
  return row * kHeadDim + 4 * (slot ^ ((row & 1) << 2));
}

// The fp32 means of query blocks first_row .. first_row + kRowsPerCta - 1 of head `bh` (zeros past `rows`),
// stored as the scores kernel's A fragments: float4 [chunk][k step][g][t] holds rows g, g + 8 at columns
// 16 chunk + 4 t + 2 step, + 1, in a0..a3 order. Warp w takes blocks w, w + kWarps, ...; lane (row_sub,
// chunk) adds rows row_sub, row_sub + kRowSubs, ... of a block's 8 columns chunk * 8 .. + 7, kBatch 16-byte
// loads issued before the first add (each asking L2 for its whole 256-byte span), then the row_subs' sums
// are added by shuffles. Memory-bound: the CTAs of a wave keep kBatch loads a lane in flight.
template <typename T, int kHeadDim>
__device__ __forceinline__ void query_block_means_to_fragments(const PooledParams& p, int bh, int first_row, int rows,
                                                               float4* a_fragments) {
  using Shape = PooledScoresShape;
  constexpr int kChunks = kHeadDim / 8, kRowSubs = 32 / kChunks, kWarps = Shape::kThreads / 32;
  constexpr int kBatch = Shape::query_loads_in_flight(kHeadDim), kRowsPerBatch = kBatch * kRowSubs;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, chunk = lane % kChunks, row_sub = lane / kChunks;
  const int b = bh / p.q_heads, h = bh % p.q_heads;
  // A lane's rows are kRowSubs rows apart: one pointer step and one compare with a constant a load.
  const int64_t row_step = static_cast<int64_t>(kRowSubs) * p.q_stride[2];
  const T* head = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] +
                  static_cast<int64_t>(row_sub) * p.q_stride[2] + chunk * 8;
#pragma unroll 1
  for (int r = warp; r < Shape::kRowsPerCta; r += kWarps) {
    const int first = (first_row + r) * p.block_m, count = r < rows ? min(p.block_m, p.q_len - first) : 0;
    const T* rows_at = head + static_cast<int64_t>(first) * p.q_stride[2];
    float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
    for (int batch = 0; batch < count; batch += kRowsPerBatch, rows_at += kBatch * row_step) {
      const int left = count - batch - row_sub;  // this lane's rows of the block from the batch's first on
      uint4 raw[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        raw[u] = u * kRowSubs < left ? load_global_256b_prefetch(rows_at + u * row_step) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
#pragma unroll
        for (int e = 0; e < 8; ++e) sum[e] += to_float(reinterpret_cast<const T*>(&raw[u])[e]);
      }
    }
#pragma unroll
    for (int offset = kChunks; offset < 32; offset *= 2) {
#pragma unroll
      for (int e = 0; e < 8; ++e) sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], offset);
    }
    if (row_sub == 0) {
      const float inverse = count > 0 ? 1.f / static_cast<float>(count) : 0.f;
      // Columns 8 chunk .. + 7 are float4 slots 2 chunk and 2 chunk + 1: slot s of row r holds its four
      // columns in k steps 2 (s / 4) (.x, .y) and 2 (s / 4) + 1 (.z, .w), at t = s % 4.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int slot = 2 * chunk + half;
        float* top = reinterpret_cast<float*>(&a_fragments[((slot / 4 * 2) * 8 + r % 8) * 4 + slot % 4]) + r / 8;
        top[0] = sum[4 * half + 0] * inverse, top[2] = sum[4 * half + 1] * inverse;
        top[32 * 4 + 0] = sum[4 * half + 2] * inverse, top[32 * 4 + 2] = sum[4 * half + 3] * inverse;
      }
    }
  }
}

// scores[bh][i][j] for the CTA's 16 query blocks i (non-candidates 0; a row with no candidate all 0): the
// means of those blocks of q (query_block_means_to_fragments), then the logits of the fp32 means on the
// tensor cores (mma.sync m16n8k8 in 3xTF32, about fp32's precision), then the rows' softmax.
//
// Past the read of q the kernel is short and bound by latency, not work (0.12 GFLOP on cogvideox): each
// warp's instruction stream is its critical path (ncu, H200: ~7 cycles between a warp's instructions, a
// third of the issue slots busy), so that part is built to issue few instructions and to wait for L2 few
// times.
//   - The first kStages passes' key means go out as cp.async right after the wait for them (each warp reads
//     only its own 16 keys of a pass, so each warp copies those itself), and the ring is refilled a pass
//     ahead. The query means, which every warp reads, sit in shared memory as A fragments: one float4
//     load gives a k step's four A registers. A warp syncs with the others once, for them.
//   - The A fragments are re-read from shared memory every pass rather than held (head_dim registers),
//     so the kernel fits 128 registers: four CTAs an SM at head_dim 64.
//   - Each warp runs kTilesPerWarp n8 tiles of keys a pass, each tile's three 3xTF32 products in three
//     accumulators (3 kTilesPerWarp independent MMA chains). The k order of the MMAs is a permutation of
//     the columns: lane (g, t) feeds columns 16 c + 4 t + {0, 1} to k step 2 c and 16 c + 4 t + {2, 3} to
//     k step 2 c + 1, the same for A and B, so each operand load is one float4.
//   - A lane keeps the online softmax (max, rescaled sum) of its two rows over the keys it saw, one
//     rescale a pass; the CTA combines them. The logits are stored as they come (-inf for non-candidates),
//     and the last pass rewrites them as probabilities, each warp whole rows (coalesced), with no test of
//     the candidates: exp2(-inf) is 0.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(PooledScoresShape::kThreads, PooledScoresShape::min_ctas_per_sm(kHeadDim))
    pooled_scores_kernel(const PooledParams p) {
  using Shape = PooledScoresShape;
  constexpr int kRows = Shape::kRowsPerCta, kWarps = Shape::kThreads / 32, kTiles = Shape::kTilesPerWarp;
  constexpr int kKeysPerWarp = kTiles * 8, kKeysPerPass = Shape::kKeysPerPass;
  constexpr int kStages = Shape::stages(kHeadDim);
  constexpr int kSlots = kHeadDim / 4;    // float4 slots of a row
  constexpr int kChunks = kHeadDim / 16;  // 16-column chunks: two k8 steps each
  constexpr int kKeysPerCopy = 32 / kSlots;
  static_assert(kRows == 16 && kKeysPerPass == kWarps * kKeysPerWarp, "one m16 tile of query blocks");
  extern __shared__ __align__(16) float shared[];
  // The query means as A fragments (the layout: query_block_means_to_fragments).
  float4* a_fragments = reinterpret_cast<float4*>(shared);
  float* key_ring = shared + kRows * kHeadDim;  // [kStages][kWarps][kKeysPerWarp][kHeadDim]
  __shared__ float warp_peak[kWarps][kRows], warp_total[kWarps][kRows];
  // Grid (query head, group of kRows query blocks, batch): one division for the key head.
  const int bh = blockIdx.z * p.q_heads + blockIdx.x, first_row = blockIdx.y * kRows;
  const int kv_bh = blockIdx.z * p.kv_heads + blockIdx.x / (p.q_heads / p.kv_heads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const CandidateBlocks candidates(p.n_k, p.block_m, p.block_n, p.q_len, p.k_len, p.causal);
  const int rows = min(kRows, p.n_q - first_row);
  // Candidates are a prefix of the key blocks that grows with the query block: the last row has the most.
  const int active = candidates.last(first_row + rows - 1) + 1;
  const int passes = (active + kKeysPerPass - 1) / kKeysPerPass;

  // The query means, read from q straight into shared memory as A fragments; then the wait for the key
  // means kernel (sm90; elsewhere the stream has already ordered the two launches).
  query_block_means_to_fragments<T, kHeadDim>(p, bh, first_row, rows, a_fragments);
  wait_for_prerequisite_grids();
  // Lane l copies slot l % kSlots of keys l / kSlots, + kKeysPerCopy, ... of the warp's share of a pass,
  // keys past n_k as zeros (they only reach columns nobody reads).
  const int copy_key = lane / kSlots, copy_slot = lane % kSlots;
  const float* copy_source =
      p.k_means + (static_cast<int64_t>(kv_bh) * p.n_k + warp * kKeysPerWarp + copy_key) * kHeadDim + 4 * copy_slot;
  float* const warp_ring = key_ring + warp * kKeysPerWarp * kHeadDim;
  // Into ring stage pass % kStages; zeros where `enabled` is false, so the prologue's copies need no
  // branch.
  auto copy_keys = [&](int pass, bool enabled) {
    float* stage = warp_ring + (pass % kStages) * kKeysPerPass * kHeadDim;
    const int first_key = pass * kKeysPerPass + warp * kKeysPerWarp + copy_key;
    const float* source = copy_source + static_cast<int64_t>(pass) * kKeysPerPass * kHeadDim;
#pragma unroll
    for (int u = 0; u < kKeysPerWarp / kKeysPerCopy; ++u) {
      // A key past n_k copies no byte from its address (past the keys of its head, maybe past k_means).
      cp_async_16(&stage[mean_tile_offset<kHeadDim>(u * kKeysPerCopy + copy_key, copy_slot)],
                  source + u * kKeysPerCopy * kHeadDim, enabled && first_key + u * kKeysPerCopy < p.n_k);
    }
  };
#pragma unroll
  for (int pass = 0; pass < kStages; ++pass) {
    copy_keys(pass, pass < passes);  // a stage past the passes is never read, nor takes logits
    cp_async_commit();
  }
  // Rows g and g + 8 of this lane's C fragments: last candidate, -1 for rows past `rows`.
  const int last[2] = {g < rows ? candidates.last(first_row + g) : -1,
                       g + 8 < rows ? candidates.last(first_row + g + 8) : -1};
  float* scores = p.scores + (static_cast<int64_t>(bh) * p.n_q + first_row) * p.n_k;
  // Where the logits wait for the last pass: key j of row r at logits + (j / 16) region + r row + j % 16.
  // If the ring is never refilled (passes <= kStages: at head_dim 64 up to 192 key blocks), a warp's part
  // of a stage is its own once its MMAs have read it, and the logits of its 16 keys go there (16 rows of
  // 16 floats), so the last pass reads shared memory; else they go to scores itself and are read back
  // from L2.
  const bool logits_in_ring = passes <= kStages;
  float* const logits = logits_in_ring ? key_ring : scores;
  const int region = logits_in_ring ? kKeysPerWarp * kHeadDim : kKeysPerWarp;
  const int row_stride = logits_in_ring ? kKeysPerWarp : p.n_k;
  // This lane's logits of rows g and g + 8, advanced a pass at a time (a row past `rows`: its stores are
  // skipped).
  float* out[2] = {logits + warp * region + g * row_stride + 2 * t,
                   logits + warp * region + (g + 8) * row_stride + 2 * t};
  const bool row_real[2] = {g < rows, g + 8 < rows};
  // This lane's softmax state of rows g and g + 8 over the candidates it has seen (log2 domain).
  float peak[2] = {-INFINITY, -INFINITY}, total[2] = {0.f, 0.f};

  for (int pass = 0, stage = 0; pass < passes; ++pass, stage = stage + 1 == kStages ? 0 : stage + 1) {
    cp_async_wait<kStages - 1>();  // this thread's copies of the pass are in
    if (pass == 0) {
      __syncthreads();  // and the query means every thread stored
    } else {
      __syncwarp();     // the pass's keys are the warp's own
    }
    const float* keys = warp_ring + stage * kKeysPerPass * kHeadDim;
    float products[kTiles][3][4] = {};  // rows g, g + 8 x keys first_key + 2 t, + 1; lo*hi, hi*lo, hi*hi
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      Tf32Pair a[2][4];
#pragma unroll
      for (int step = 0; step < 2; ++step) {
        const float4 fragment = a_fragments[((2 * c + step) * 8 + g) * 4 + t];
        a[step][0] = split_tf32(fragment.x), a[step][1] = split_tf32(fragment.y);
        a[step][2] = split_tf32(fragment.z), a[step][3] = split_tf32(fragment.w);
      }
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
        const float4 b = *reinterpret_cast<const float4*>(&keys[mean_tile_offset<kHeadDim>(tile * 8 + g, 4 * c + t)]);
        mma_1688_3xtf32(products[tile], a[0], split_tf32(b.x), split_tf32(b.y));
        mma_1688_3xtf32(products[tile], a[1], split_tf32(b.z), split_tf32(b.w));
      }
    }
    __syncwarp();  // every lane's reads of the stage are done before it is refilled or takes logits
    if (pass + kStages < passes) copy_keys(pass + kStages, true);
    cp_async_commit();  // empty groups keep the count per pass uniform
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float logit[kTiles][2], pass_peak = -INFINITY;
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = pass * kKeysPerPass + warp * kKeysPerWarp + tile * 8 + 2 * t + e;
          const int i = 2 * h + e;
          const float value = ((products[tile][0][i] + products[tile][1][i]) + products[tile][2][i]) * p.scale_log2;
          logit[tile][e] = j <= last[h] ? value : -INFINITY;
          if (row_real[h] && j < p.n_k) out[h][tile * 8 + e] = logit[tile][e];
          pass_peak = max_nan(pass_peak, logit[tile][e]);
        }
      }
      const float next = max_nan(peak[h], pass_peak);
      const float base = next == -INFINITY ? 0.f : next;  // -inf - -inf would be NaN
      float sum = total[h] * exp2f(peak[h] - base);
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) sum += exp2f(logit[tile][0] - base) + exp2f(logit[tile][1] - base);
      total[h] = sum;
      peak[h] = next;
      out[h] += kWarps * region;
    }
  }
  cp_async_wait<0>();  // no copy outlives the kernel (the trailing groups are empty)

  // The rows' softmax over the CTA: peaks, then totals rescaled to them (quads, then across warps).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float m = quad_max(peak[h]);
    if (t == 0) warp_peak[warp][g + 8 * h] = m;
  }
  __syncthreads();
  // What a row's exp2 subtracts: its peak, or 0 for a row without candidates.
  auto row_base = [&](int r) {
    float m = warp_peak[0][r];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) m = max_nan(m, warp_peak[w][r]);
    return m == -INFINITY ? 0.f : m;
  };
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float sum = quad_sum(total[h] * exp2f(peak[h] - row_base(g + 8 * h)));  // no candidates: adds 0
    if (t == 0) warp_total[warp][g + 8 * h] = sum;
  }
  __syncthreads();  // also orders every thread's logit stores before the reads below

  // Warp w writes rows w, w + kWarps, ...: logits to probabilities, lanes along a row, all of a batch's
  // loads before its first store. A non-candidate's -inf gives 0 * inverse: 0, or NaN in a NaN row, as
  // the reference's softmax gives. Keys past the CTA's active ones have no logit: zeros.
  constexpr int kRowsPerWarp = kRows / kWarps, kPerBatch = 8;
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp + rr * kWarps;
    if (r >= rows) break;
    const float base = row_base(r);
    float sum = warp_total[0][r];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += warp_total[w][r];
    const float inverse = sum == 0.f ? 0.f : 1.f / sum;  // NaN stays NaN: the row runs dense
    float* row = scores + static_cast<int64_t>(r) * p.n_k;
    const int written = min(passes * kKeysPerPass, p.n_k);  // keys with a logit
    // The logits' place is a compile-time choice here, so ring reads are shared loads with constant
    // offsets rather than generic loads behind 64-bit address arithmetic.
    const auto rewrite = [&](auto in_ring) {
      constexpr bool kInRing = decltype(in_ring)::value;
      constexpr int kRegion = kKeysPerWarp * kHeadDim;
      // In the ring, key j = 32 u + lane of a batch lies in region j / 16 = 2 u + lane / 16, at j % 16.
      static_assert(kKeysPerWarp == 16, "two regions of logits a warp-wide row segment");
      const float* lane_ring = key_ring + r * kKeysPerWarp + (lane >> 4) * kRegion + (lane & 15);
      for (int batch = 0; batch < p.n_k; batch += 32 * kPerBatch) {
        float logit[kPerBatch];
#pragma unroll
        for (int u = 0; u < kPerBatch; ++u) {
          const int j = batch + 32 * u + lane;
          if constexpr (kInRing) {
            logit[u] = j < written ? lane_ring[(batch / 16 + 2 * u) * kRegion] : -INFINITY;
          } else {
            logit[u] = j < written ? row[j] : -INFINITY;
          }
        }
        // Without this the compiler interleaved loads and stores whose addresses it could tell apart, and
        // each load's wait held up the rest.
        asm volatile("" ::: "memory");
#pragma unroll
        for (int u = 0; u < kPerBatch; ++u) {
          const int j = batch + 32 * u + lane;
          if (j < p.n_k) row[j] = exp2f(logit[u] - base) * inverse;
        }
      }
    };
    if (logits_in_ring) {
      rewrite(std::true_type{});
    } else {
      rewrite(std::false_type{});
    }
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_estimate_pooled(const PooledParams& p, cudaStream_t stream) {
  using Means = PooledKeyMeansShape;
  if (p.k8 != nullptr) {
    const int64_t items = static_cast<int64_t>(p.batch) * p.kv_heads * p.n_k * (kHeadDim / 8);
    const dim3 grid(static_cast<unsigned>((items + Means::kLevel8Threads - 1) / Means::kLevel8Threads));
    pooled_key_means_from_level8_kernel<T, kHeadDim><<<grid, Means::kLevel8Threads, 0, stream>>>(p);
  } else {
    const int per_cta = Means::key_blocks_per_cta(kHeadDim, p.block_n);
    const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.kv_heads * ((p.n_k + per_cta - 1) / per_cta)));
    pooled_key_means_from_keys_kernel<T, kHeadDim><<<grid, Means::kThreads, 0, stream>>>(p);
  }
  const cudaError_t means_status = cudaGetLastError();
  if (means_status != cudaSuccess) return means_status;

  using Scores = PooledScoresShape;
  const auto scores_kernel = pooled_scores_kernel<T, kHeadDim>;
  const int smem = Scores::shared_bytes(kHeadDim);
  cudaError_t status = cudaFuncSetAttribute(scores_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (status != cudaSuccess) return status;
  cudaFuncAttributes attributes{};
  status = cudaFuncGetAttributes(&attributes, scores_kernel);
  if (status != cudaSuccess) return status;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(p.q_heads, (p.n_q + Scores::kRowsPerCta - 1) / Scores::kRowsPerCta, p.batch);
  config.blockDim = dim3(Scores::kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  // The key means kernel's programmatic dependent where the binary has griddepcontrol (sm90): its reads of
  // q may start before that kernel ends. Elsewhere an ordinary launch, ordered after it by the stream.
  cudaLaunchAttribute dependent{};
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  if (attributes.binaryVersion >= kFirstArchWithDependentLaunch) {
    config.attrs = &dependent;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, scores_kernel, p);
}

}  // namespace psa::kernels
