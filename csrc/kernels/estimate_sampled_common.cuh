// Pieces of the fused "sampled" estimator (spec section 4) shared by its sm80 (mma.sync) and sm90
// (wgmma) kernels: offsets, causal candidates, and the pass that turns the CTA's table of per-row
// block maxima into normalised scores. See estimate_sampled.cuh for the algorithm.
#pragma once

#include <cfloat>
#include <cstdint>

#include "params.h"

namespace psa::kernels {

// Offsets on the GPU are not range-checked by the host (that would need a sync); keep them in the block.
__device__ __forceinline__ int clamp_offset(int64_t offset, int block) {
  return static_cast<int>(offset < 0 ? 0 : (offset >= block ? block - 1 : offset));
}

// Last candidate key block of query block i (-1: none). Causal: the first key of block j must be
// visible to the last query of block i.
struct SampledCandidates {
  int n_k, block_m, block_n, q_len, causal_offset;
  bool causal;
  __device__ explicit SampledCandidates(const SampledParams& p)
      : n_k(p.n_k), block_m(p.block_m), block_n(p.block_n), q_len(p.q_len), causal_offset(p.k_len - p.q_len),
        causal(p.causal) {}
  __device__ int last(int i) const {
    if (!causal) return n_k - 1;
    const int horizon = min((i + 1) * block_m, q_len) - 1 + causal_offset;
    return horizon < 0 ? -1 : min(n_k - 1, horizon / block_n);
  }
};

// After the last key tile: `table` ([n_k][kRows], this CTA's block maxima in the log2 domain) and
// `row_max` (shared, [kRows]) are final and visible to the whole CTA. Writes the scores of the CTA's
// query blocks: P[i, j] = max over block i's rows of exp2(block max - row max), normalised per row.
template <int kRows>
__device__ void write_sampled_scores(const SampledParams& p, float* table, const float* row_max, int bh,
                                     int first_block, int blocks_per_cta, const SampledCandidates& candidates) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x / 32;
  // P[i, j] into the table entry of block i's first sampled row (read and written by one thread).
  for (int index = tid; index < blocks_per_cta * p.n_k; index += blockDim.x) {
    const int qb = index / p.n_k, j = index % p.n_k;
    if (first_block + qb >= p.n_q) continue;
    float peak = 0.f;
    if (j <= candidates.last(first_block + qb)) {
      for (int sample = 0; sample < p.q_samples; ++sample) {
        const int row = qb * p.q_samples + sample;
        const float base = row_max[row] == -INFINITY ? 0.f : row_max[row];
        peak = fmaxf(peak, exp2f(table[j * kRows + row] - base));
      }
    }
    table[j * kRows + qb * p.q_samples] = peak;
  }
  __syncthreads();

  for (int qb = warp; qb < blocks_per_cta; qb += warps) {
    const int block = first_block + qb;
    if (block >= p.n_q) break;
    const float* peaks = table + qb * p.q_samples;  // peaks[j * kRows]
    float total = 0.f;
    for (int j = lane; j < p.n_k; j += 32) total += peaks[j * kRows];
#pragma unroll
    for (int delta = 16; delta > 0; delta >>= 1) total += __shfl_xor_sync(0xffffffffu, total, delta);
    const float inverse = total > 0.f ? 1.f / total : 0.f;
    float* out = p.scores + (static_cast<int64_t>(bh) * p.n_q + block) * p.n_k;
    for (int j = lane; j < p.n_k; j += 32) out[j] = peaks[j * kRows] * inverse;
  }
}

}  // namespace psa::kernels
