// Fused antidiagonal block-importance estimator (docs/spec.md section 4, XAttention-style) for sm80+
// with mma.sync.
//
// Anti-row i (query rows S i .. S i + S - 1) and anti-column j (keys S j .. S j + S - 1) have the
// anti-logit x[i, j] = scale / S * sum_t q[S i + S-1-t] . k[S j + t]: the sum of the antidiagonal of
// tile (i, j) of Q K^T, i.e. a sum over t of S products between strided row subsets of Q (reversed) and
// of K, each D long. The estimate is the block sums of softmax_j(x[i, :]) over the block_m / S anti-rows
// and block_n / S anti-columns of each block pair, each row of blocks normalised (reference:
// psa.reference.estimate_antidiagonal).
//
// A CTA holds kRows anti-rows (whole query blocks) and walks the anti-columns kTileN at a time; a tile
// is S steps, each a cp.async gather of the step's kRows Q rows and kTileN K rows into a two-stage ring
// and one [kRows x D] x [D x kTileN] mma.sync product accumulated in registers. After a tile's last step
// the tile is reduced in registers: each anti-row's running max and sum of exp2 (an online softmax), and
// for each group of 8 anti-columns (inside one key block: block_n / S is a multiple of 8) the sum of exp2
// relative to the running max after this tile, stored in the CTA's scratch table with that max. Nothing
// of the [Lq/S, Lk/S] anti-logits reaches memory. A last pass rescales the group sums to each row's
// final max, divides by the row's sum, adds the anti-rows of each query block and the groups of each key
// block, and normalises each row of blocks.
#pragma once

#include <cfloat>

#include "device_utils.cuh"
#include "params.h"
#include "shapes.h"

namespace psa::kernels {

// What one CTA of the antidiagonal kernels works on, shared by both: kRows anti-rows from row_cta * kRows
// (whole query blocks) of head slot head_slot (bh_begin + head_slot), the anti-columns any of them sees
// in tiles of kTileN, and its slice of the scratch table (group sums [tiles_total * kGroups][kRows], then
// tile maxima [tiles_total][kRows]). The sm80 kernel takes it from its CTA's position in the grid, the
// persistent Hopper kernel from its work item.
template <int kRows, int kTileN, int kGroups>
struct AntidiagonalCta {
  const AntidiagonalParams& p;
  int first_row, first_block;  // this CTA's first anti-row and first query block
  int columns, n_tiles;        // anti-columns any of its rows sees, and the tiles covering them
  float* group_sums;
  float* tile_maxima;

  __device__ explicit AntidiagonalCta(const AntidiagonalParams& params)
      : AntidiagonalCta(params, blockIdx.x, blockIdx.y, gridDim.x) {}
  __device__ AntidiagonalCta(const AntidiagonalParams& params, int row_cta, int head_slot, int ctas_per_head)
      : p(params) {
    first_row = row_cta * kRows;
    first_block = first_row / (p.block_m / p.stride);
    const int last_row = min(first_row + kRows, p.q_tiles) - 1;  // its last real anti-row
    const int limit = last_row >= first_row ? last_key_of_row(last_row) : -1;
    columns = limit < 0 ? 0 : min(p.k_tiles, limit / p.stride + 1);
    n_tiles = (columns + kTileN - 1) / kTileN;
    const int tiles_total = (p.k_tiles + kTileN - 1) / kTileN;
    group_sums = p.table + (static_cast<int64_t>(head_slot) * ctas_per_head + row_cta) * static_cast<int64_t>(kRows) *
                               tiles_total * (kGroups + 1);
    tile_maxima = group_sums + static_cast<int64_t>(tiles_total) * kGroups * kRows;
  }
  // The last key position anti-row i sees: its last query's, shifted to the keys' end (causal), or all;
  // -1 for the padded anti-rows past the sequence.
  __device__ int last_key_of_row(int i) const {
    if (i >= p.q_tiles) return -1;
    return p.causal ? min((i + 1) * p.stride, p.q_len) - 1 + (p.k_len - p.q_len) : p.k_len - 1;
  }
  // Anti-columns [0, visible_end(i)) are visible to anti-row i.
  __device__ int visible_end(int i) const {
    const int last_key = last_key_of_row(i);
    return last_key < 0 ? 0 : min(columns, last_key / p.stride + 1);
  }
};

// The last pass of the antidiagonal kernels (this one and sm90/estimate_antidiagonal_sm90.cuh), run by
// `n_threads` threads of the CTA (`sync` is their barrier): block sums of the softmax, then each row of
// blocks normalised. `group_sums` [n_groups][kRows] holds, per group of 8 anti-columns and anti-row, the
// sum of exp2 relative to the running max after the group's tile, `tile_maxima` [tiles][kRows] that max,
// `row_max` / `row_sum` each anti-row's final max and sum.
//   First each (tile, anti-row) max becomes, in place, the factor that turns that tile's group sums into
// softmax mass (exp2(tile max - row max) / row sum; 0 for rows that saw nothing), so the block sums are
// plain dot products: one warp per query block, lanes over key blocks, each reading its groups' sums
// and factors as float4 over the block's anti-rows (consecutive in both tables). Computing the factor
// inside that loop cost an exp2, a division and dependent scalar loads per (group, row): a quarter of
// the Hopper kernel's time (ncu, NOTES.md).
template <int kRows, int kGroups, typename Sync>
__device__ void write_antidiagonal_scores(const AntidiagonalParams& p, const float* group_sums, float* tile_maxima,
                                          const float* row_max, const float* row_sum, int bh, int first_block,
                                          int n_tiles, int thread, int n_threads, Sync sync) {
  const int rows_per_block = p.block_m / p.stride, groups_per_block = p.block_n / p.stride / 8;
  for (int i = thread; i < n_tiles * kRows; i += n_threads) {
    const int r = i % kRows;
    const float tile_max = tile_maxima[i];
    tile_maxima[i] = row_sum[r] > 0.f && tile_max > -INFINITY ? exp2f(tile_max - row_max[r]) / row_sum[r] : 0.f;
  }
  sync();  // also orders the factors' global writes before other warps read them
  const float* factors = tile_maxima;
  const int n_groups = n_tiles * kGroups;
  const int warp = thread / 32, lane = thread % 32;
  const int blocks_here = kRows / rows_per_block;
  const bool vector_rows = rows_per_block % 4 == 0;  // then every float4 below is 16-byte aligned
  for (int qb = warp; qb < blocks_here; qb += n_threads / 32) {
    const int block = first_block + qb, first = qb * rows_per_block;
    if (block >= p.n_q) break;
    float* out = p.scores + (static_cast<int64_t>(bh) * p.n_q + block) * p.n_k;
    // A NaN anti-row makes its whole block row NaN, as the reference's softmax does (docs/spec.md
    // section 5: such a row then runs dense).
    bool nan_row = false;
    for (int r = first; r < first + rows_per_block; ++r) nan_row |= isnan(row_max[r]);
    float total = 0.f;
    for (int j = lane; j < p.n_k; j += 32) {
      float mass = nan_row ? NAN : 0.f;
      const int group_end = min((j + 1) * groups_per_block, n_groups);
      for (int gi = j * groups_per_block; gi < group_end; ++gi) {
        const float* sums = group_sums + static_cast<int64_t>(gi) * kRows + first;
        const float* factor = factors + (gi / kGroups) * kRows + first;
        if (vector_rows) {
#pragma unroll 4
          for (int r = 0; r < rows_per_block; r += 4) {
            const float4 a = *reinterpret_cast<const float4*>(sums + r);
            const float4 f = *reinterpret_cast<const float4*>(factor + r);
            mass += a.x * f.x + a.y * f.y + a.z * f.z + a.w * f.w;
          }
        } else {
          for (int r = 0; r < rows_per_block; ++r) mass += sums[r] * factor[r];
        }
      }
      out[j] = mass;
      total += mass;
    }
    total = warp_sum(total);
    const float inverse = total == 0.f ? 0.f : 1.f / total;  // NaN stays NaN: the row runs dense
    __syncwarp();
    for (int j = lane; j < p.n_k; j += 32) out[j] *= inverse;
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(AntidiagonalShape<kHeadDim>::kThreads, AntidiagonalShape<kHeadDim>::kMinBlocks)
    estimate_antidiagonal_kernel(const AntidiagonalParams p) {
  using Shape = AntidiagonalShape<kHeadDim>;
  using Rows = SwizzledRows<kHeadDim>;
  constexpr int kRows = Shape::kRows, kTileN = Shape::kTileN, kGroups = Shape::kGroups;

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);                                    // [kStages][kRows x D]
  T* s_k = s_q + Shape::kStages * kRows * kHeadDim;                        // [kStages][kTileN x D]
  float* s_row_max = reinterpret_cast<float*>(s_k + Shape::kStages * kTileN * kHeadDim);  // [kRows]
  float* s_row_sum = s_row_max + kRows;                                                    // [kRows]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int bh = p.bh_begin + blockIdx.y, b = bh / p.q_heads, h = bh % p.q_heads;
  const int kv_head = h / (p.q_heads / p.kv_heads);
  const int S = p.stride;
  const AntidiagonalCta<kRows, kTileN, kGroups> cta(p);
  const int first_row = cta.first_row, columns = cta.columns, n_tiles = cta.n_tiles;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + kv_head * p.k_stride[1];
  // Step u = tile * S + s loads Q rows S i + S-1-s of the CTA's anti-rows and K rows S j + s of the
  // tile's anti-columns; rows past the sequence (the last, partial group of S) load zeros.
  const auto load_step = [&](int step, int stage) {
    const int tile = step / S, s = step % S;
    T* q_dst = s_q + stage * kRows * kHeadDim;
    for (int c = tid; c < kRows * Shape::kChunks; c += Shape::kThreads) {
      const int row = c / Shape::kChunks, chunk = c % Shape::kChunks;
      const int64_t position = static_cast<int64_t>(first_row + row) * S + (S - 1 - s);
      const bool valid = first_row + row < p.q_tiles && position < p.q_len;
      cp_async_16(q_dst + Rows::offset(row, chunk), q + (valid ? position * p.q_stride[2] + chunk * 8 : 0), valid);
    }
    T* k_dst = s_k + stage * kTileN * kHeadDim;
    for (int c = tid; c < kTileN * Shape::kChunks; c += Shape::kThreads) {
      const int row = c / Shape::kChunks, chunk = c % Shape::kChunks;
      const int column = tile * kTileN + row;
      const int64_t position = static_cast<int64_t>(column) * S + s;
      const bool valid = column < columns && position < p.k_len;
      cp_async_16(k_dst + Rows::offset(row, chunk), k + (valid ? position * p.k_stride[2] + chunk * 8 : 0), valid);
    }
  };

  // A thread holds rows g and g + 8 of its warp's 16 anti-rows: local rows r0, r0 + 8.
  const int local_row[2] = {warp * 16 + g, warp * 16 + g + 8};
  int visible_end[2];  // anti-columns [0, visible_end) are visible to the row
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    visible_end[r] = cta.visible_end(first_row + local_row[r]);
  }
  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.f, 0.f};

  const int steps = n_tiles * S;
  if (steps > 0) load_step(0, 0);
  cp_async_commit();
  float s_acc[kTileN / 8][4];
  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1, tile = step / S;
    if (step + 1 < steps) {
      load_step(step + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (step % S == 0) {
#pragma unroll
      for (int nt = 0; nt < kTileN / 8; ++nt) s_acc[nt][0] = s_acc[nt][1] = s_acc[nt][2] = s_acc[nt][3] = 0.f;
    }
    const T* q_tile = s_q + stage * kRows * kHeadDim;
    const T* k_tile = s_k + stage * kTileN * kHeadDim;
#pragma unroll
    for (int kc = 0; kc < kHeadDim / 16; ++kc) {
      uint32_t a[4];
      ldmatrix_x4(a, q_tile + Rows::offset(warp * 16 + (lane & 15), 2 * kc + (lane >> 4)));
#pragma unroll
      for (int np = 0; np < kTileN / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + Rows::offset(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * kc + ((lane >> 3) & 1)));
        mma_16816<T>(s_acc[2 * np], a, kb[0], kb[1]);
        mma_16816<T>(s_acc[2 * np + 1], a, kb[2], kb[3]);
      }
    }
    __syncthreads();  // the next step's load overwrites this stage

    if (step % S == S - 1) {
      // ---- The tile's anti-logits are complete: mask, online softmax, group sums.
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < kTileN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int column = tile * kTileN + nt * 8 + 2 * t + (e & 1), r = e >> 1;
          const bool visible = column < visible_end[r];
          const float x = visible ? s_acc[nt][e] * p.scale_log2 : -INFINITY;
          s_acc[nt][e] = x;
          tile_max[r] = max_nan(tile_max[r], x);
        }
      }
      float base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float new_max = max_nan(run_max[r], quad_max(tile_max[r]));  // a NaN logit poisons its row
        base[r] = new_max == -INFINITY ? 0.f : new_max;
        run_sum[r] *= exp2f(run_max[r] - base[r]);
        run_max[r] = new_max;
      }
#pragma unroll
      for (int nt = 0; nt < kTileN / 8; ++nt) {
        float group[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float pair = exp2f(s_acc[nt][2 * r] - base[r]) + exp2f(s_acc[nt][2 * r + 1] - base[r]);
          run_sum[r] += pair;
          group[r] = quad_sum(pair);
        }
        if (t == 0) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            cta.group_sums[static_cast<int64_t>(tile * kGroups + nt) * kRows + local_row[r]] = group[r];
          }
        }
      }
      if (t == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) cta.tile_maxima[tile * kRows + local_row[r]] = run_max[r];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float row_sum = quad_sum(run_sum[r]);  // outside the branch: every lane joins the shuffles
    if (t == 0) {
      s_row_max[local_row[r]] = run_max[r];
      s_row_sum[local_row[r]] = row_sum;
    }
  }
  __syncthreads();  // also makes the table's global writes visible to the whole CTA

  write_antidiagonal_scores<kRows, kGroups>(p, cta.group_sums, cta.tile_maxima, s_row_max, s_row_sum, bh,
                                            cta.first_block, n_tiles, tid, Shape::kThreads, [] { __syncthreads(); });
}

template <typename T, int kHeadDim>
cudaError_t launch_estimate_antidiagonal(const AntidiagonalParams& p, cudaStream_t stream) {
  using Shape = AntidiagonalShape<kHeadDim>;
  auto kernel = estimate_antidiagonal_kernel<T, kHeadDim>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(Shape::kSmemBytes));
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(Shape::ctas_per_head(p.n_q, p.block_m / p.stride)),
                  static_cast<unsigned>(p.bh_count));
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
