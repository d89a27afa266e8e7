// Fused "sampled" block-importance estimator (spec section 4) for sm80+ with mma.sync.
//
// scores[i, j] = P[i, j] / sum_j P[i, j] with
//   P[i, j] = max over sampled rows r of block i of exp(max_{c in block j} x_rc - max_{all c} x_rc).
// The [L/4, L/4] logits never reach global memory: a CTA takes kRows sampled query rows (whole query
// blocks), streams the sampled keys through shared memory 64 at a time, reduces each 16 x 64 MMA
// tile to per-row block maxima in registers and keeps only those ([kRows, n_k] floats) in shared
// memory. After the last key tile the row maxima are final and one pass over that table gives P and
// the normalised scores. The host picks kWarps so the table fits, and uses the ATen path otherwise.
#pragma once

#include <cfloat>

#include "device_utils.cuh"
#include "params.h"
#include "shapes.h"

namespace psa::kernels {

// Offsets on the GPU are not range-checked by the host (that would need a sync); keep them in the block.
__device__ __forceinline__ int clamp_offset(int64_t offset, int block) {
  return static_cast<int>(offset < 0 ? 0 : (offset >= block ? block - 1 : offset));
}

template <typename T, int kHeadDim, int kWarps>
__global__ void __launch_bounds__(SampledShape<kHeadDim, kWarps>::kThreads)
    estimate_sampled_kernel(const SampledParams p) {
  using Shape = SampledShape<kHeadDim, kWarps>;
  using Rows = SwizzledRows<kHeadDim>;
  constexpr int kRows = Shape::kRows, kTileN = Shape::kTileN;

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);                                   // [kRows x D]
  T* s_k = s_q + kRows * kHeadDim;                                       // [kStages][kTileN x D]
  float* s_row_max = reinterpret_cast<float*>(s_k + Shape::kStages * kTileN * kHeadDim);  // [kRows]
  float* s_block_max = s_row_max + kRows;                                // [kRows][n_k]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int bh = blockIdx.y, b = bh / p.q_heads, h = bh % p.q_heads;
  const int kv_head = h / (p.q_heads / p.kv_heads);
  const int blocks_per_cta = kRows / p.q_samples;
  const int first_block = blockIdx.x * blocks_per_cta;
  const int causal_offset = p.k_len - p.q_len;

  // Last candidate key block of query block i (-1: none). Causal: the first key of block j must be
  // visible to the last query of block i.
  auto last_candidate = [&](int i) {
    if (!p.causal) return p.n_k - 1;
    const int horizon = min((i + 1) * p.block_m, p.q_len) - 1 + causal_offset;
    return horizon < 0 ? -1 : min(p.n_k - 1, horizon / p.block_n);
  };
  int active_blocks = 0;  // key blocks any of this CTA's query blocks may see
  for (int qb = 0; qb < blocks_per_cta && first_block + qb < p.n_q; ++qb) {
    active_blocks = max(active_blocks, last_candidate(first_block + qb) + 1);
  }

  // ---- Sampled query rows (rows of query blocks past n_q are zero).
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    for (int c = tid; c < kRows * Shape::kChunks; c += Shape::kThreads) {
      const int row = c / Shape::kChunks, chunk = c % Shape::kChunks;
      const int block = first_block + row / p.q_samples;
      const bool valid = block < p.n_q;
      const int offset = clamp_offset(p.q_offsets[row % p.q_samples], p.block_m);
      const int64_t position = min(block * p.block_m + offset, p.q_len - 1);
      cp_async_16(s_q + Rows::offset(row, chunk), q + (valid ? position * p.q_stride[2] + chunk * 8 : 0), valid);
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
      const int offset = clamp_offset(p.k_offsets[column % p.k_samples], p.block_n);
      const int64_t position = min(block * p.block_n + offset, p.k_len - 1);
      cp_async_16(dst + Rows::offset(row, chunk), k + (valid ? position * p.k_stride[2] + chunk * 8 : 0), valid);
    }
  };

  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  uint32_t q_frag[kHeadDim / 16][4];
#pragma unroll
  for (int kc = 0; kc < kHeadDim / 16; ++kc) {
    ldmatrix_x4(q_frag[kc], s_q + Rows::offset(warp * 16 + (lane & 15), 2 * kc + (lane >> 4)));
  }
  const int local_rows[2] = {warp * 16 + g, warp * 16 + g + 8};
  int row_last_candidate[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) row_last_candidate[r] = last_candidate(first_block + local_rows[r] / p.q_samples);
  float row_max[2] = {-INFINITY, -INFINITY};
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
    float s[kTileN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kTileN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < kHeadDim / 16; ++kc) {
#pragma unroll
      for (int np = 0; np < kTileN / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + Rows::offset(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * kc + ((lane >> 3) & 1)));
        mma_16816<T>(s[2 * np], q_frag[kc], kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], q_frag[kc], kb[2], kb[3]);
      }
    }
    // Per row and key block of the tile: the max logit (log2 domain), -inf for non-candidates. The
    // n8 tiles are walked in a fully unrolled loop (register arrays need constant indices) and each
    // key block's maximum is flushed after its last n8 tile.
    float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kTileN / 8; ++nt) {
      block_max[0] = fmaxf(block_max[0], fmaxf(s[nt][0] * p.scale_log2, s[nt][1] * p.scale_log2));
      block_max[1] = fmaxf(block_max[1], fmaxf(s[nt][2] * p.scale_log2, s[nt][3] * p.scale_log2));
      if ((nt + 1) % tiles_per_block == 0) {
        const int key_block = (tile * kTileN + nt * 8) / p.k_samples;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float value = quad_max(block_max[r]);
          if (key_block > row_last_candidate[r]) value = -INFINITY;
          row_max[r] = fmaxf(row_max[r], value);
          if (t == 0 && key_block < active_blocks) s_block_max[local_rows[r] * p.n_k + key_block] = value;
          block_max[r] = -INFINITY;
        }
      }
    }
    __syncthreads();  // the next iteration's load overwrites this stage
  }
  if (t == 0) {
    s_row_max[local_rows[0]] = row_max[0];
    s_row_max[local_rows[1]] = row_max[1];
  }
  __syncthreads();

  // P[i, j] into the first sampled row of block i (each (i, j) is read and written by one thread).
  for (int index = tid; index < blocks_per_cta * p.n_k; index += Shape::kThreads) {
    const int qb = index / p.n_k, j = index % p.n_k;
    if (first_block + qb >= p.n_q) continue;
    float peak = 0.f;
    if (j <= last_candidate(first_block + qb)) {
      for (int sample = 0; sample < p.q_samples; ++sample) {
        const int row = qb * p.q_samples + sample;
        const float base = s_row_max[row] == -INFINITY ? 0.f : s_row_max[row];
        peak = fmaxf(peak, exp2f(s_block_max[row * p.n_k + j] - base));
      }
    }
    s_block_max[qb * p.q_samples * p.n_k + j] = peak;
  }
  __syncthreads();

  for (int qb = warp; qb < blocks_per_cta; qb += kWarps) {
    const int block = first_block + qb;
    if (block >= p.n_q) break;
    const float* peaks = s_block_max + qb * p.q_samples * p.n_k;
    float total = 0.f;
    for (int j = lane; j < p.n_k; j += 32) total += peaks[j];
#pragma unroll
    for (int delta = 16; delta > 0; delta >>= 1) total += __shfl_xor_sync(0xffffffffu, total, delta);
    const float inverse = total > 0.f ? 1.f / total : 0.f;
    float* out = p.scores + (static_cast<int64_t>(bh) * p.n_q + block) * p.n_k;
    for (int j = lane; j < p.n_k; j += 32) out[j] = peaks[j] * inverse;
  }
}

template <typename T, int kHeadDim, int kWarps>
cudaError_t launch_estimate_sampled(const SampledParams& p, cudaStream_t stream) {
  using Shape = SampledShape<kHeadDim, kWarps>;
  const size_t smem = Shape::smem_bytes(p.n_k);
  auto kernel = estimate_sampled_kernel<T, kHeadDim, kWarps>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem));
  if (status != cudaSuccess) return status;
  const int blocks_per_cta = Shape::kRows / p.q_samples;
  const dim3 grid(static_cast<unsigned>((p.n_q + blocks_per_cta - 1) / blocks_per_cta),
                  static_cast<unsigned>(p.batch * p.q_heads));
  kernel<<<grid, Shape::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
