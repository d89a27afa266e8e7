// Fused "sampled" block-importance estimator (docs/spec.md section 4) for sm80+ with mma.sync: the portable
// kernel. On sm_90a, sm90/estimate_sampled_sm90.cuh runs the same algorithm as a TMA + wgmma GEMM.
//
// scores[i, j] = P[i, j] / sum_j P[i, j] with
//   P[i, j] = max over sampled rows r of block i of exp(max_{c in block j} x_rc - max_{all c} x_rc).
// The [L/4, L/4] logits never reach global memory: a CTA takes kRows = 128 sampled query rows (whole
// query blocks; 4 warps of 32 rows, so each K fragment loaded from shared memory feeds four MMAs),
// streams the sampled keys through shared memory 64 at a time, and reduces each MMA tile to per-row
// block maxima in registers. Only those maxima leave the SM, into the CTA's slice of a scratch table
// ([n_k][kRows] floats, block-major so a warp's rows write contiguous runs); the row maxima stay in
// registers. After the last key tile the row maxima are final and one pass over the CTA's own
// (L2-resident) table gives P and the normalised scores. Keeping the table out of shared memory keeps
// the CTA small (Q tile + two K stages), so three CTAs share an SM at any n_k; the host bounds the
// scratch by launching head chunks.
#pragma once

#include <cfloat>

#include "device_utils.cuh"
#include "estimate_sampled_common.cuh"
#include "params.h"
#include "shapes.h"

namespace psa::kernels {

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(SampledShape<kHeadDim>::kThreads, SampledShape<kHeadDim>::kMinBlocks)
    estimate_sampled_kernel(const SampledParams p) {
  using Shape = SampledShape<kHeadDim>;
  using Rows = SwizzledRows<kHeadDim>;
  constexpr int kRows = Shape::kRows, kTileN = Shape::kTileN;

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);                                   // [kRows x D]
  T* s_k = s_q + kRows * kHeadDim;                                       // [kStages][kTileN x D]
  float* s_row_base = reinterpret_cast<float*>(s_k + Shape::kStages * kTileN * kHeadDim);  // [kRows]
  float* table = p.table + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kRows * p.n_k;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int bh = p.bh_begin + blockIdx.y, b = bh / p.q_heads, h = bh % p.q_heads;
  const int kv_head = h / (p.q_heads / p.kv_heads);
  const int blocks_per_cta = kRows / p.q_samples;
  const int first_block = blockIdx.x * blocks_per_cta;

  const CandidateBlocks candidates = sampled_candidates(p);
  int active_blocks = 0;  // key blocks any of this CTA's query blocks may see
  for (int qb = 0; qb < blocks_per_cta && first_block + qb < p.n_q; ++qb) {
    active_blocks = max(active_blocks, candidates.last(first_block + qb) + 1);
  }

  // ---- Sampled query rows (rows of query blocks past n_q are zero).
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    for (int c = tid; c < kRows * Shape::kChunks; c += Shape::kThreads) {
      const int row = c / Shape::kChunks, chunk = c % Shape::kChunks;
      const int block = first_block + row / p.q_samples;
      const bool valid = block < p.n_q;
      const int offset = sample_offset(p.q_offsets, row % p.q_samples, p.block_m, p.default_step);
      const int64_t position = min(block * p.block_m + offset, p.q_len - 1);
      cp_async_16(s_q + Rows::offset(row, chunk),
                  q + (valid ? position * p.q_stride[2] + chunk * 8 : 0), valid);
    }
    cp_async_commit();
  }

  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[1];
  const int columns = active_blocks * p.k_samples;
  const int n_tiles = (columns + kTileN - 1) / kTileN;
  auto load_tile = [&](int tile, int stage) {
    T* dst = s_k + stage * kTileN * kHeadDim;
    for (int c = tid; c < kTileN * Shape::kChunks; c += Shape::kThreads) {
      const int row = c / Shape::kChunks, chunk = c % Shape::kChunks;
      const int column = tile * kTileN + row;
      const bool valid = column < columns;
      const int block = column / p.k_samples;
      const int offset = sample_offset(p.k_offsets, column % p.k_samples, p.block_n, p.default_step);
      const int64_t position = min(block * p.block_n + offset, p.k_len - 1);
      cp_async_16(dst + Rows::offset(row, chunk),
                  k + (valid ? position * p.k_stride[2] + chunk * 8 : 0), valid);
    }
  };

  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  // A warp owns kMTiles m16 row tiles, so every K fragment it loads feeds 2 * kMTiles MMAs; a thread
  // holds rows g and g + 8 of each m tile: local row index 2 * mt + r.
  constexpr int kMTiles = Shape::kMTiles, kWarpRows = 16 * kMTiles;
  uint32_t q_frag[kMTiles][kHeadDim / 16][4];
  int local_rows[2 * kMTiles], row_last_candidate[2 * kMTiles];
  float row_max[2 * kMTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int kc = 0; kc < kHeadDim / 16; ++kc) {
      ldmatrix_x4(q_frag[mt][kc], s_q + Rows::offset(warp * kWarpRows + mt * 16 + (lane & 15), 2 * kc + (lane >> 4)));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      local_rows[2 * mt + r] = warp * kWarpRows + mt * 16 + g + 8 * r;
      row_last_candidate[2 * mt + r] = candidates.last(first_block + local_rows[2 * mt + r] / p.q_samples);
      row_max[2 * mt + r] = -INFINITY;
    }
  }
  const int tiles_per_block = p.k_samples / 8;  // n8 MMA tiles per key block

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < n_tiles) {
      load_tile(tile + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const T* k_tile = s_k + stage * kTileN * kHeadDim;
    float s[kMTiles][kTileN / 8][4];  // per m tile: 4 m16n8 accumulators per n16
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kTileN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
    }
#pragma unroll
    for (int kc = 0; kc < kHeadDim / 16; ++kc) {
#pragma unroll
      for (int np = 0; np < kTileN / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + Rows::offset(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * kc + ((lane >> 3) & 1)));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(s[mt][2 * np], q_frag[mt][kc], kb[0], kb[1]);
          mma_16816<T>(s[mt][2 * np + 1], q_frag[mt][kc], kb[2], kb[3]);
        }
      }
    }
    // Per row and key block of the tile: the max logit (log2 domain), -inf for non-candidates. The
    // n8 tiles are walked in a fully unrolled loop (register arrays need constant indices) and each
    // key block's maximum is flushed after its last n8 tile.
    float block_max[2 * kMTiles];
#pragma unroll
    for (int i = 0; i < 2 * kMTiles; ++i) block_max[i] = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kTileN / 8; ++nt) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        block_max[2 * mt] = max_nan(block_max[2 * mt], max_nan(s[mt][nt][0], s[mt][nt][1]) * p.scale_log2);
        block_max[2 * mt + 1] = max_nan(block_max[2 * mt + 1], max_nan(s[mt][nt][2], s[mt][nt][3]) * p.scale_log2);
      }
      if ((nt + 1) % tiles_per_block == 0) {
        const int key_block = (tile * kTileN + nt * 8) / p.k_samples;
#pragma unroll
        for (int i = 0; i < 2 * kMTiles; ++i) {
          float value = quad_max(block_max[i]);
          if (key_block > row_last_candidate[i]) value = -INFINITY;
          row_max[i] = max_nan(row_max[i], value);
          if (t == 0 && key_block < active_blocks) table[key_block * kRows + local_rows[i]] = value;
          block_max[i] = -INFINITY;
        }
      }
    }
    __syncthreads();  // the next iteration's load overwrites this stage
  }
  if (t == 0) {
#pragma unroll
    for (int i = 0; i < 2 * kMTiles; ++i) s_row_base[local_rows[i]] = sampled_row_base(row_max[i]);
  }
  __syncthreads();  // also makes the table's global writes visible to the whole CTA
  write_sampled_scores<kRows, 4, 1>(p, table, s_row_base, table_peaks<kRows>(p, table), bh, first_block, blocks_per_cta,
                                    candidates, tid, Shape::kThreads, [] { __syncthreads(); });
}

template <typename T, int kHeadDim>
cudaError_t launch_estimate_sampled(const SampledParams& p, cudaStream_t stream) {
  using Shape = SampledShape<kHeadDim>;
  auto kernel = estimate_sampled_kernel<T, kHeadDim>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(Shape::kSmemBytes));
  if (status != cudaSuccess) return status;
  const int blocks_per_cta = Shape::kRows / p.q_samples;
  const dim3 grid(static_cast<unsigned>((p.n_q + blocks_per_cta - 1) / blocks_per_cta),
                  static_cast<unsigned>(p.bh_count));
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
