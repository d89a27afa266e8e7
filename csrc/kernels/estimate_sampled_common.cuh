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

// The s-th sampled offset into a block: from `offsets` or, where the host passes none (the default offsets,
// docs/spec.md section 4), every default_step-th token from default_step / 2, computed here rather than read
// from a tensor the host would have to fill first.
__device__ __forceinline__ int sample_offset(const int64_t* offsets, int s, int block, int default_step) {
  return offsets == nullptr ? s * default_step + default_step / 2 : clamp_offset(offsets[s], block);
}

__device__ __forceinline__ CandidateBlocks sampled_candidates(const SampledParams& p) {
  return CandidateBlocks(p.n_k, p.block_m, p.block_n, p.q_len, p.k_len, p.causal);
}

// Where write_sampled_scores keeps the peak P[i, j] (before normalisation) of the CTA's query block i and
// key block j: data[i * block_stride + j * key_stride]. The Hopper kernel uses the shared memory its
// operand tiles no longer need ([blocks_per_cta][n_k]: the normalising pass then reads shared memory, not
// L2); otherwise the table entry of block i's first sampled row (table_peaks).
struct SampledPeaks {
  float* data;
  int block_stride, key_stride;
};
template <int kRows>
__device__ __forceinline__ SampledPeaks table_peaks(const SampledParams& p, float* table) {
  return {table, p.q_samples, kRows};
}

// What write_sampled_scores subtracts from a row's block maxima: its row max, or 0 for a row that saw no
// candidate (row max -inf), whose maxima are all -inf: -inf - 0 gives exp2 = 0 where -inf - -inf is NaN.
__device__ __forceinline__ float sampled_row_base(float row_max) { return row_max == -INFINITY ? 0.f : row_max; }

// After the last key tile: `table` ([n_k][kRows], this CTA's block maxima in the log2 domain) and
// `row_base` (shared, [kRows], sampled_row_base of each row's max) are final and visible to the `threads`
// threads that run this (`thread` is the caller's index among them; `sync` is a barrier over exactly
// those threads: __syncthreads for the sm80 kernel, a named barrier over the consumer warpgroups in the
// sm90 one). Writes the scores of the CTA's query blocks: P[i, j] = max over block i's rows of
// exp2(block max - row max), normalised per row; exp2 is monotonic, so that is exp2 of the largest
// difference, one exp2 per (i, j). `table` and `row_base` must be 16-byte aligned at every block's first
// sampled row (kRows and q_samples are multiples of 4). On return the table has been read for the last time.
// The first pass is bound by the latency of its table reads (the table outgrows L2 on long inputs), so
// a thread issues the loads of kEntries (i, j) entries, kLoadsInFlight float4s each (a 32-sample block's
// maxima are 8 float4s), before it uses any: the sm80 kernel, short of registers at three CTAs per SM,
// takes 1 x 4; the Hopper kernel's consumers, whose accumulators are dead by now, 5 x 8 (one round for
// the 8 x 139 entries of a CTA at 17776 tokens, block 128).
template <int kRows, int kLoadsInFlight, int kEntries, typename Sync>
__device__ void write_sampled_scores(const SampledParams& p, const float* table, const float* row_base,
                                     SampledPeaks peaks, int bh, int first_block, int blocks_per_cta,
                                     const CandidateBlocks& candidates, int thread, int threads, Sync sync) {
  static_assert(8 % kLoadsInFlight == 0, "a 32-sample block's maxima are 8 float4s");
  const int lane = thread & 31, warp = thread >> 5, warps = threads / 32;
  const int entries = blocks_per_cta * p.n_k;
  for (int first = thread; first < entries; first += threads * kEntries) {
    int qb[kEntries], j[kEntries];
    bool stored[kEntries], candidate[kEntries];
    float largest[kEntries];  // the largest difference block max - row base over the block's rows
#pragma unroll
    for (int e = 0; e < kEntries; ++e) {
      const int index = first + e * threads;
      qb[e] = index / p.n_k;
      j[e] = index % p.n_k;
      stored[e] = index < entries && first_block + qb[e] < p.n_q;
      candidate[e] = stored[e] && j[e] <= candidates.last(first_block + qb[e]);
      largest[e] = -INFINITY;
    }
#pragma unroll
    for (int round = 0; round < 8 / kLoadsInFlight; ++round) {
      float4 values[kEntries][kLoadsInFlight];
#pragma unroll
      for (int e = 0; e < kEntries; ++e) {
        const float4* maxima = reinterpret_cast<const float4*>(table + j[e] * kRows + qb[e] * p.q_samples);
#pragma unroll
        for (int c = 0; c < kLoadsInFlight; ++c) {
          const int chunk = kLoadsInFlight * round + c;
          values[e][c] = candidate[e] && 4 * chunk < p.q_samples
                             ? maxima[chunk] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
        }
      }
#pragma unroll
      for (int e = 0; e < kEntries; ++e) {
        const float4* bases = reinterpret_cast<const float4*>(row_base + qb[e] * p.q_samples);
#pragma unroll
        for (int c = 0; c < kLoadsInFlight; ++c) {
          const int chunk = kLoadsInFlight * round + c;
          if (!candidate[e] || 4 * chunk >= p.q_samples) continue;  // qb[e] may be past the CTA's blocks
          const float4 base = bases[chunk];
          const float4 v = values[e][c];
          largest[e] = max_nan(largest[e], max_nan(max_nan(v.x - base.x, v.y - base.y),
                                                   max_nan(v.z - base.z, v.w - base.w)));
        }
      }
    }
    // Into the table, this writes over entry (i, j)'s first maximum, which only this thread reads.
#pragma unroll
    for (int e = 0; e < kEntries; ++e) {
      if (stored[e]) {
        peaks.data[qb[e] * peaks.block_stride + j[e] * peaks.key_stride] = candidate[e] ? exp2f(largest[e]) : 0.f;
      }
    }
  }
  sync();

  for (int qb = warp; qb < blocks_per_cta; qb += warps) {
    const int block = first_block + qb;
    if (block >= p.n_q) break;
    const float* block_peaks = peaks.data + qb * peaks.block_stride;  // block_peaks[j * key_stride]
    float total = 0.f;
#pragma unroll 4
    for (int j = lane; j < p.n_k; j += 32) total += block_peaks[j * peaks.key_stride];
    total = warp_sum(total);
    const float inverse = total == 0.f ? 0.f : 1.f / total;  // NaN stays NaN: the row runs dense
    float* out = p.scores + (static_cast<int64_t>(bh) * p.n_q + block) * p.n_k;
    for (int j = lane; j < p.n_k; j += 32) out[j] = block_peaks[j * peaks.key_stride] * inverse;
  }
}

}  // namespace psa::kernels
