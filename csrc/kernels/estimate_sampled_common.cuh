// Pieces of the fused "sampled" estimator (docs/spec.md section 4) shared by its sm80 (mma.sync,
// estimate_sampled.cuh) and sm90 (wgmma, sm90/estimate_sampled_sm90.cuh) kernels: offsets, causal
// candidates, and the pass that turns a CTA's table of per-row block maxima into normalised scores.
#pragma once

#include <cfloat>
#include <cstdint>

#include "candidate_blocks.cuh"
#include "device_utils.cuh"
#include "params.h"

namespace psa::kernels {

// Offsets on the GPU are not range-checked by the host (that would need a sync); keep them in the block.
__device__ __forceinline__ int clamp_offset(int64_t offset, int block) {
  return static_cast<int>(offset < 0 ? 0 : (offset >= block ? block - 1 : offset));
}

__device__ __forceinline__ CandidateBlocks sampled_candidates(const SampledParams& p) {
  return CandidateBlocks(p.n_k, p.block_m, p.block_n, p.q_len, p.k_len, p.causal);
}

// After the last key tile: `table` ([n_k][kRows], this CTA's block maxima in the log2 domain) and
// `row_max` (shared, [kRows]) are final and visible to the `threads` threads that run this (`thread`
// is the caller's index among them; `sync` is a barrier over exactly those threads: __syncthreads for
// the sm80 kernel, a named barrier over the consumer warpgroups in the sm90 one). Writes the scores of
// the CTA's query blocks: P[i, j] = max over block i's rows of exp2(block max - row max), normalised
// per row. `table` and `row_max` must be 16-byte aligned at every block's first sampled row (kRows
// and q_samples are multiples of 4).
// kLoadsInFlight: float4 loads of table maxima issued together (the 32 maxima of a 32-sample block are
// 8 float4s); the sm80 kernel, short of registers at three CTAs per SM, takes 4 at a time.
template <int kRows, int kLoadsInFlight, typename Sync>
__device__ void write_sampled_scores(const SampledParams& p, float* table, const float* row_max, int bh,
                                     int first_block, int blocks_per_cta, const CandidateBlocks& candidates,
                                     int thread, int threads, Sync sync) {
  const int lane = thread & 31, warp = thread >> 5, warps = threads / 32;
  // P[i, j] into the table entry of block i's first sampled row (read and written by one thread). A
  // block's q_samples (8, 16 or 32) maxima are contiguous in the table: read them as float4s, all
  // issued before the first is used (one L2 round trip per entry instead of one per sample).
  for (int index = thread; index < blocks_per_cta * p.n_k; index += threads) {
    const int qb = index / p.n_k, j = index % p.n_k;
    if (first_block + qb >= p.n_q) continue;
    float peak = 0.f;
    if (j <= candidates.last(first_block + qb)) {
      const float4* maxima = reinterpret_cast<const float4*>(table + j * kRows + qb * p.q_samples);
      const float4* bases = reinterpret_cast<const float4*>(row_max + qb * p.q_samples);
      // A row that saw no candidate has row max -inf: subtract 0 so its -inf maxima give 0, not NaN.
      const auto term = [](float value, float row) { return exp2f(value - (row == -INFINITY ? 0.f : row)); };
#pragma unroll
      for (int round = 0; round < 8 / kLoadsInFlight; ++round) {
        float4 values[kLoadsInFlight];
#pragma unroll
        for (int c = 0; c < kLoadsInFlight; ++c) {
          const int chunk = kLoadsInFlight * round + c;
          values[c] = 4 * chunk < p.q_samples ? maxima[chunk] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int c = 0; c < kLoadsInFlight; ++c) {
          const int chunk = kLoadsInFlight * round + c;
          if (4 * chunk >= p.q_samples) break;
          const float4 base = bases[chunk];
          peak = max_nan(peak, max_nan(max_nan(term(values[c].x, base.x), term(values[c].y, base.y)),
                                       max_nan(term(values[c].z, base.z), term(values[c].w, base.w))));
        }
      }
    }
    table[j * kRows + qb * p.q_samples] = peak;
  }
  sync();

  for (int qb = warp; qb < blocks_per_cta; qb += warps) {
    const int block = first_block + qb;
    if (block >= p.n_q) break;
    const float* peaks = table + qb * p.q_samples;  // peaks[j * kRows]
    float total = 0.f;
#pragma unroll 4
    for (int j = lane; j < p.n_k; j += 32) total += peaks[j * kRows];
    total = warp_sum(total);
    const float inverse = total == 0.f ? 0.f : 1.f / total;  // NaN stays NaN: the row runs dense
    float* out = p.scores + (static_cast<int64_t>(bh) * p.n_q + block) * p.n_k;
    for (int j = lane; j < p.n_k; j += 32) out[j] = peaks[j * kRows] * inverse;
  }
}

}  // namespace psa::kernels
