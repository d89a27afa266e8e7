// Block-tile attention over a level map (docs/spec.md section 3), for sm80+ with mma.sync.
//
// One CTA owns one query block of kBlockM rows (one warp per 16 rows) and runs one online softmax
// over every key tile its level-map row selects:
//
//   1. Schedule. Warp 0 reads the row of the level map and compacts the key block ids into shared
//      memory grouped by level (ballot + popc, two passes), with per-level counts: a fixed-size
//      schedule built on the device, so nothing returns to the host.
//   2. Tiles. Level L's blocks (block_n >> L pooled tokens each) are concatenated and cut into
//      tiles of kTileN tokens (64 at head_dim 128, 128 at 64): at kTileN = 64 four level-8
//      blocks of a 128-key block fill one tile and one level-1 block fills two. Every tile is a
//      full-width MMA tile; only the level's last tile can be partly empty, and its empty rows are
//      zero-filled and masked.
//   3. Per tile: QK^T (Q fragments re-read from shared memory, so that two CTAs fit an SM's
//      registers), + log2(count) bias per column (-inf masks empty slots and tokens past Lk),
//      causal mask only on tiles that reach past the block's first row, online softmax in the exp2
//      domain, PV with P reused from registers.
//
// K/V tiles stream through a two-stage cp.async ring. Rows are gathered token by token from the
// level's tensor, so level 1 reads the caller's K/V in place (any strides, GQA by head index).
#pragma once

#include <cfloat>
#include <climits>

#include "common/level_tile_gather.cuh"
#include "common/online_softmax.cuh"
#include "common/tile_geometry.cuh"
#include "device_utils.cuh"
#include "level_schedule.cuh"
#include "params.h"
#include "shapes.h"

namespace psa::kernels {

template <typename T, int kHeadDim, int kBlockM>
__global__ void __launch_bounds__(AttentionShape<kHeadDim, kBlockM>::kThreads,
                                  AttentionShape<kHeadDim, kBlockM>::kMinBlocks)
    attention_with_levels_kernel(const AttentionParams p) {
  using Shape = AttentionShape<kHeadDim, kBlockM>;
  using Rows = SwizzledRows<kHeadDim>;
  constexpr int kTileN = Shape::kTileN;

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_k = s_q + Shape::kQElements;                       // [kStages][kTileN x kHeadDim]
  T* s_v = s_k + Shape::kStages * Shape::kTileElements;   // [kStages][kTileN x kHeadDim]
  float* s_bias = reinterpret_cast<float*>(s_v + Shape::kStages * Shape::kTileElements);  // [kStages][kTileN]
  int* s_last = reinterpret_cast<int*>(s_bias + Shape::kStages * kTileN);                  // [kStages][kTileN]
  uint16_t* s_ids = reinterpret_cast<uint16_t*>(s_last + Shape::kStages * kTileN);         // [n_k]
  __shared__ int s_count[kNumLevels], s_start[kNumLevels];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int block = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.q_heads, h = bh % p.q_heads;
  const int kv_head = h / (p.q_heads / p.kv_heads);
  const int row_begin = block * kBlockM;
  const int causal_offset = p.k_len - p.q_len;

  // ---- Q tile: rows past Lq are zero-filled.
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    for (int c = tid; c < kBlockM * Shape::kChunks; c += Shape::kThreads) {
      const int row = c / Shape::kChunks, chunk = c % Shape::kChunks;
      const bool valid = row_begin + row < p.q_len;
      const T* src = q + (valid ? static_cast<int64_t>(row_begin + row) * p.q_stride[2] + chunk * 8 : 0);
      cp_async_16(s_q + Rows::offset(row, chunk), src, valid);
    }
    cp_async_commit();
  }

  // ---- Schedule: key block ids grouped by level (unknown level values count as skip).
  if (warp == 0) {
    build_level_schedule(p.levels + (static_cast<int64_t>(bh) * p.n_q + block) * p.n_k, p.n_k, lane, s_ids,
                         s_count, s_start);
  }
  __syncthreads();

  using Geometry = TileGeometry<kTileN>;
  const int n_tiles = Geometry::row_tiles(s_count, p.block_n);
  auto locate = [&](int index) { return Geometry::locate(index, s_count, s_start, p.block_n, p.k_len, s_ids); };

  // Gathers tile `index` of the schedule into `stage`: K and V rows by cp.async, and per column the
  // logit bias log2(count) (-inf for an empty slot) and the last original key the token covers.
  auto load_tile = [&](int index, int stage) {
    gather_level_tile<T, kHeadDim, kTileN, Shape::kThreads>(
        p, locate(index), s_ids, b, kv_head, s_k + stage * Shape::kTileElements, s_v + stage * Shape::kTileElements,
        s_bias + stage * kTileN, s_last + stage * kTileN, tid);
  };

  // Whether any token of the tile may be hidden from some row of this block by the causal mask.
  auto tile_needs_causal_mask = [&](int index) {
    return p.causal && locate(index).tile_last_key(s_ids) > row_begin + causal_offset;
  };

  float o[kHeadDim / 8][4];
#pragma unroll
  for (int nd = 0; nd < kHeadDim / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  OnlineSoftmaxRows softmax_rows;
  const int g = lane >> 2, t = lane & 3;
  const int warp_row = warp * 16;
  const int rows[2] = {row_begin + warp_row + g, row_begin + warp_row + g + 8};

  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();
  cp_async_wait<1>();  // the Q group
  __syncthreads();

  for (int index = 0; index < n_tiles; ++index) {
    const int stage = index & 1;
    if (index + 1 < n_tiles) {
      load_tile(index + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const T* k_tile = s_k + stage * Shape::kTileElements;
    const T* v_tile = s_v + stage * Shape::kTileElements;
    float s[kTileN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kTileN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < kHeadDim / 16; ++kc) {
      // Q fragments are re-read from shared memory per tile rather than held in registers: 32 fewer
      // registers per thread let two 8-warp CTAs share an SM.
      uint32_t q_frag[4];
      ldmatrix_x4(q_frag, s_q + Rows::offset(warp_row + (lane & 15), 2 * kc + (lane >> 4)));
#pragma unroll
      for (int np = 0; np < kTileN / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + Rows::offset(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * kc + ((lane >> 3) & 1)));
        mma_16816<T>(s[2 * np], q_frag, kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], q_frag, kb[2], kb[3]);
      }
    }

    const float* bias = s_bias + stage * kTileN;
    const int* last = s_last + stage * kTileN;
    const bool masked = tile_needs_causal_mask(index);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kTileN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1), r = e >> 1;
        float x = fmaf(s[nt][e], p.scale_log2, bias[col]);
        if (masked && last[col] > rows[r] + causal_offset) x = -INFINITY;
        s[nt][e] = x;
        tile_max[r] = fmaxf(tile_max[r], x);
      }
    }
    float base[2], scale_old[2];
    softmax_rows.update_max(tile_max, base, scale_old);
    float tile_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < kTileN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);
        tile_sum[e >> 1] += s[nt][e];
      }
    }
    softmax_rows.add_sum(tile_sum, scale_old);
#pragma unroll
    for (int nd = 0; nd < kHeadDim / 8; ++nd) {
      o[nd][0] *= scale_old[0];
      o[nd][1] *= scale_old[0];
      o[nd][2] *= scale_old[1];
      o[nd][3] *= scale_old[1];
    }

#pragma unroll
    for (int kk = 0; kk < kTileN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int nd = 0; nd < kHeadDim / 8; nd += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_tile + Rows::offset(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), nd + (lane >> 4)));
        mma_16816<T>(o[nd], a, vb[0], vb[1]);
        mma_16816<T>(o[nd + 1], a, vb[2], vb[3]);
      }
    }
    __syncthreads();  // the next iteration's load overwrites this stage
  }

  // ---- Epilogue: rows that saw no key write zeros and lse = -inf.
  softmax_rows.write<T, kHeadDim>(reinterpret_cast<const float(&)[kHeadDim / 2]>(o),
                                  static_cast<T*>(p.out) + static_cast<int64_t>(bh) * p.q_len * kHeadDim,
                                  p.lse + static_cast<int64_t>(bh) * p.q_len, rows, p.q_len, t);
}

template <typename T, int kHeadDim, int kBlockM>
cudaError_t launch_attention_with_levels(const AttentionParams& p, cudaStream_t stream) {
  using Shape = AttentionShape<kHeadDim, kBlockM>;
  const size_t smem = Shape::smem_bytes(p.n_k);
  auto kernel = attention_with_levels_kernel<T, kHeadDim, kBlockM>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem));
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(p.n_q), static_cast<unsigned>(p.batch * p.q_heads));
  kernel<<<grid, Shape::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
