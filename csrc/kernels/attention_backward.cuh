// The backward of block-tile attention over a level map (docs/spec.md section 7) for sm80+ (mma.sync),
// from the forward's lse. Two kernels, each writing every gradient it owns exactly once: no atomics, so
// the result does not depend on how CTAs are scheduled.
//
//   - dq, query-major (attention_backward_dq_kernel): one CTA per (batch, head, query block), walking the
//     block's schedule as the forward does. Per tile of kTileN pyramid tokens:
//       S = Q K^T,  P = exp2(S scale_log2 + bias - lse log2(e)),  dP = dO V^T,  dS = P (dP - delta),
//       dq += dS K;  dq is scaled by the softmax scale once at the end.
//   - dK_L / dV_L, key-major (attention_backward_dkdv_kernel, one launch per level L): one CTA per
//     (batch, key head, key block j) holding that block's pooled rows of level L. It visits the (query
//     head of the key head's group, query block) pairs whose level-map entry is 1 << L, in ascending
//     order, and per kQTile query rows computes
//       S^T = K Q^T,  P^T,  dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - delta),  dK += dS^T Q.
//     The sum over a GQA group's query heads falls out of the pair walk. Pairs are found 32 at a time
//     (one warp reads 32 level-map entries of column j and ballots), so no pair list is built.
//
// delta = rowsum(dO * O) - dlse comes from the host (one ATen reduction): dS = P (dP - delta) is then the
// gradient of both out and lse. A row the forward saw no token for (lse = -inf) gets P = 0 (its lse is
// taken as +inf) and contributes nothing; as in the forward, bias -inf marks an empty column and the
// causal mask hides a pooled token whose last covered key lies past the row's horizon.
//
// This first version is synchronous per tile (cp.async, then wait): the schedule of loads against the
// MMAs is the next step, once it is proven correct.
#pragma once

#include <cfloat>
#include <climits>

#include "common/level_gradient_rows.cuh"
#include "common/level_tile_gather.cuh"
#include "common/tile_geometry.cuh"
#include "device_utils.cuh"
#include "level_schedule.cuh"
#include "params.h"
#include "shapes.h"

namespace psa::kernels {

namespace backward_detail {

constexpr float kLog2e = 1.4426950408889634f;

// The forward's lse of one row as the exponent base of exp2: +inf (so P = 0) for a row that saw nothing.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// c[16 x kCols] += A[16 x kHeadDim] B[kCols x kHeadDim]^T for one warp: A rows `a_row0..+16` of a swizzled
// tile (re-read per k step, as the forward reads Q), B rows 0..kCols of another (the forward's Q K^T).
template <typename T, int kHeadDim, int kCols>
__device__ __forceinline__ void mma_rows_by_rows(float (&c)[kCols / 8][4], const T* a_tile, int a_row0,
                                                 const T* b_tile, int lane) {
  using Rows = SwizzledRows<kHeadDim>;
#pragma unroll
  for (int kc = 0; kc < kHeadDim / 16; ++kc) {
    uint32_t a[4];
    ldmatrix_x4(a, a_tile + Rows::offset(a_row0 + (lane & 15), 2 * kc + (lane >> 4)));
#pragma unroll
    for (int np = 0; np < kCols / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + Rows::offset(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * kc + ((lane >> 3) & 1)));
      mma_16816<T>(c[2 * np], a, b[0], b[1]);
      mma_16816<T>(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x kHeadDim] += X[16 x kCols] B[kCols x kHeadDim] for one warp, X an accumulator-layout array
// (rounded to T as the A operand, as the forward's P) and B the rows of a swizzled tile (the forward's P V).
template <typename T, int kHeadDim, int kCols>
__device__ __forceinline__ void mma_acc_by_rows(float (&acc)[kHeadDim / 8][4], const float (&x)[kCols / 8][4],
                                                const T* b_tile, int lane) {
  using Rows = SwizzledRows<kHeadDim>;
#pragma unroll
  for (int kk = 0; kk < kCols / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(x[2 * kk][0], x[2 * kk][1]), pack2<T>(x[2 * kk][2], x[2 * kk][3]),
                           pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                           pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int nd = 0; nd < kHeadDim / 8; nd += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_tile + Rows::offset(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), nd + (lane >> 4)));
      mma_16816<T>(acc[nd], a, b[0], b[1]);
      mma_16816<T>(acc[nd + 1], a, b[2], b[3]);
    }
  }
}

// Row r (0: g, 1: g + 8) of a warp's [16 x kHeadDim] accumulator times `factor`, as T, into `row_out`.
template <typename T, int kHeadDim>
__device__ __forceinline__ void store_row(const float (&acc)[kHeadDim / 8][4], int r, float factor, T* row_out,
                                          int t) {
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) {
    *reinterpret_cast<uint32_t*>(row_out + 8 * j + 2 * t) =
        pack2<T>(acc[j][2 * r] * factor, acc[j][2 * r + 1] * factor);
  }
}

}  // namespace backward_detail

template <typename T, int kHeadDim, int kBlockM>
__global__ void __launch_bounds__(AttentionBackwardShape<kHeadDim, kBlockM>::kThreads, 1)
    attention_backward_dq_kernel(const AttentionBackwardParams bp) {
  using namespace backward_detail;
  using Shape = AttentionBackwardShape<kHeadDim, kBlockM>;
  using Rows = SwizzledRows<kHeadDim>;
  constexpr int kTileN = Shape::kTileN;
  const AttentionParams& p = bp.base;

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_do = s_q + Shape::kRowElements;
  T* s_k = s_do + Shape::kRowElements;                    // [kStages][kTileN x kHeadDim]
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
  const int64_t row_base = static_cast<int64_t>(bh) * p.q_len;  // this head's rows in lse, delta, dO, dq

  // ---- Q and dO rows (zero past Lq).
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    const T* d_out = static_cast<const T*>(bp.grad_out) + row_base * kHeadDim;
    for (int c = tid; c < kBlockM * Shape::kChunks; c += Shape::kThreads) {
      const int row = c / Shape::kChunks, chunk = c % Shape::kChunks;
      const bool valid = row_begin + row < p.q_len;
      cp_async_16(s_q + Rows::offset(row, chunk),
                  q + (valid ? static_cast<int64_t>(row_begin + row) * p.q_stride[2] + chunk * 8 : 0), valid);
      cp_async_16(s_do + Rows::offset(row, chunk),
                  d_out + (valid ? static_cast<int64_t>(row_begin + row) * kHeadDim + chunk * 8 : 0), valid);
    }
    cp_async_commit();
  }

  if (warp == 0) {
    build_level_schedule(p.levels + (static_cast<int64_t>(bh) * p.n_q + block) * p.n_k, p.n_k, lane, s_ids,
                         s_count, s_start);
  }
  __syncthreads();

  using Geometry = TileGeometry<kTileN>;
  const int n_tiles = Geometry::row_tiles(s_count, p.block_n);
  auto locate = [&](int index) { return Geometry::locate(index, s_count, s_start, p.block_n, p.k_len, s_ids); };

  // The forward's tile gather: K and V rows of tile `index` into `stage`, and per column the bias and the
  // last covered key.
  auto load_tile = [&](int index, int stage) {
    gather_level_tile<T, kHeadDim, kTileN, Shape::kThreads>(
        p, locate(index), s_ids, b, kv_head, s_k + stage * Shape::kTileElements, s_v + stage * Shape::kTileElements,
        s_bias + stage * kTileN, s_last + stage * kTileN, tid);
  };
  auto tile_needs_causal_mask = [&](int index) {
    return p.causal && locate(index).tile_last_key(s_ids) > row_begin + causal_offset;
  };

  const int g = lane >> 2, t = lane & 3;
  const int warp_row = warp * 16;
  const int rows[2] = {row_begin + warp_row + g, row_begin + warp_row + g + 8};
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool valid = rows[r] < p.q_len;
    row_lse[r] = valid ? lse_log2(bp.lse[row_base + rows[r]]) : INFINITY;
    row_delta[r] = valid ? bp.delta[row_base + rows[r]] : 0.f;
  }

  float dq[kHeadDim / 8][4];
#pragma unroll
  for (int nd = 0; nd < kHeadDim / 8; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;

  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();
  cp_async_wait<1>();  // the Q and dO group
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
    float s[kTileN / 8][4], dp[kTileN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kTileN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    }
    mma_rows_by_rows<T, kHeadDim, kTileN>(s, s_q, warp_row, k_tile, lane);    // S = Q K^T
    mma_rows_by_rows<T, kHeadDim, kTileN>(dp, s_do, warp_row, v_tile, lane);  // dP = dO V^T

    const float* bias = s_bias + stage * kTileN;
    const int* last = s_last + stage * kTileN;
    const bool masked = tile_needs_causal_mask(index);
#pragma unroll
    for (int nt = 0; nt < kTileN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1), r = e >> 1;
        float x = fmaf(s[nt][e], p.scale_log2, bias[col]) - row_lse[r];
        if (masked && last[col] > rows[r] + causal_offset) x = -INFINITY;
        s[nt][e] = exp2f(x) * (dp[nt][e] - row_delta[r]);  // dS
      }
    }
    mma_acc_by_rows<T, kHeadDim, kTileN>(dq, s, k_tile, lane);  // dq += dS K
    __syncthreads();  // the next iteration's load overwrites this stage
  }

  T* dq_out = static_cast<T*>(bp.dq) + row_base * kHeadDim;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] < p.q_len) store_row<T, kHeadDim>(dq, r, bp.scale, dq_out + static_cast<int64_t>(rows[r]) * kHeadDim, t);
  }
}

template <typename T, int kHeadDim, int kRows>
__global__ void __launch_bounds__(KeyBackwardShape<kHeadDim, kRows>::kThreads, 1)
    attention_backward_dkdv_kernel(const AttentionBackwardParams bp) {
  using namespace backward_detail;
  using Shape = KeyBackwardShape<kHeadDim, kRows>;
  using Rows = SwizzledRows<kHeadDim>;
  constexpr int kQTile = Shape::kQTile;
  const AttentionParams& p = bp.base;
  const int L = bp.level;

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem);      // [kRows x kHeadDim]: the key block's pooled keys
  T* s_v = s_k + kRows * kHeadDim;          // and values
  T* s_q = s_v + kRows * kHeadDim;          // [kQTile x kHeadDim]: the current query rows
  T* s_do = s_q + kQTile * kHeadDim;        // and their output gradients
  float* s_lse = reinterpret_cast<float*>(s_do + kQTile * kHeadDim);  // [kQTile], lse_log2; +inf: no part
  float* s_delta = s_lse + kQTile;                                     // [kQTile]
  float* s_bias = s_delta + kQTile;                                    // [kRows]
  int* s_last = reinterpret_cast<int*>(s_bias + kRows);                // [kRows]
  __shared__ unsigned s_hits;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int j = blockIdx.x, bkv = blockIdx.y;
  const int b = bkv / p.kv_heads, kv_head = bkv % p.kv_heads;
  const int group = p.q_heads / p.kv_heads;
  const int per_block = p.block_n >> L;
  const int tokens = (p.k_len + (1 << L) - 1) >> L;
  const int first_token = j * per_block;
  const int causal_offset = p.k_len - p.q_len;

  // ---- The block's pooled keys and values (zero past the block or the sequence), per row its bias
  // log2(keys covered) (-inf for a padding row) and last covered key.
  // (The gradients' pointers are selected at the end, so that nothing 64-bit stays live through the pair
  // loop, where dK, dV, S and dP take the registers.)
  const LevelRows<T> src = level_rows<T>(p, L, b, kv_head);
  for (int c = tid; c < kRows * Shape::kChunks; c += Shape::kThreads) {
    const int row = c / Shape::kChunks, chunk = c % Shape::kChunks;
    const int64_t token = first_token + row;
    const bool valid = row < per_block && token < tokens;
    cp_async_16(s_k + Rows::offset(row, chunk), src.k + (valid ? token * src.k_token_stride + chunk * 8 : 0), valid);
    cp_async_16(s_v + Rows::offset(row, chunk), src.v + (valid ? token * src.v_token_stride + chunk * 8 : 0), valid);
  }
  cp_async_commit();
  for (int row = tid; row < kRows; row += Shape::kThreads) {
    const int token = first_token + row;
    const bool valid = row < per_block && token < tokens;
    const int covered = valid ? min((token + 1) << L, p.k_len) - (token << L) : 0;
    s_bias[row] = !valid ? -INFINITY : covered == (1 << L) ? static_cast<float>(L) : __log2f(static_cast<float>(covered));
    s_last[row] = valid ? min((token + 1) << L, p.k_len) - 1 : INT_MAX;
  }
  cp_async_wait<0>();
  __syncthreads();

  const int g = lane >> 2, t = lane & 3;
  const int warp_row = warp * 16;
  float dk[kHeadDim / 8][4], dv[kHeadDim / 8][4];
#pragma unroll
  for (int nd = 0; nd < kHeadDim / 8; ++nd) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;
  }

  const int8_t wanted = static_cast<int8_t>(1 << L);
  const int candidates = group * p.n_q;  // (query head of the group, query block), query blocks fastest
  for (int base = 0; base < candidates; base += 32) {
    if (warp == 0) {
      const int c = base + lane;
      bool hit = false;
      if (c < candidates) {
        const int h = kv_head * group + c / p.n_q, i = c % p.n_q;
        hit = p.levels[((static_cast<int64_t>(b) * p.q_heads + h) * p.n_q + i) * p.n_k + j] == wanted;
      }
      const unsigned hits = __ballot_sync(0xffffffffu, hit);
      if (lane == 0) s_hits = hits;
    }
    __syncthreads();
    unsigned hits = s_hits;
    __syncthreads();  // every thread has read s_hits before warp 0 writes the next round's
    while (hits != 0) {
      const int c = base + __ffs(hits) - 1;
      hits &= hits - 1;
      const int h = kv_head * group + c / p.n_q, i = c % p.n_q;
      const int64_t row_base = (static_cast<int64_t>(b) * p.q_heads + h) * p.q_len;
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
      const T* d_out = static_cast<const T*>(bp.grad_out) + row_base * kHeadDim;
      const int block_begin = i * bp.block_m, block_end = min(block_begin + bp.block_m, p.q_len);
      for (int q0 = block_begin; q0 < block_end; q0 += kQTile) {
        for (int c2 = tid; c2 < kQTile * Shape::kChunks; c2 += Shape::kThreads) {
          const int row = c2 / Shape::kChunks, chunk = c2 % Shape::kChunks;
          const int query = q0 + row;
          const bool valid = query < block_end;
          cp_async_16(s_q + Rows::offset(row, chunk),
                      q + (valid ? static_cast<int64_t>(query) * p.q_stride[2] + chunk * 8 : 0), valid);
          cp_async_16(s_do + Rows::offset(row, chunk),
                      d_out + (valid ? static_cast<int64_t>(query) * kHeadDim + chunk * 8 : 0), valid);
        }
        cp_async_commit();
        for (int col = tid; col < kQTile; col += Shape::kThreads) {
          const int query = q0 + col;
          const bool valid = query < block_end;
          s_lse[col] = valid ? lse_log2(bp.lse[row_base + query]) : INFINITY;
          s_delta[col] = valid ? bp.delta[row_base + query] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();

        float s[kQTile / 8][4], dp[kQTile / 8][4];
#pragma unroll
        for (int nt = 0; nt < kQTile / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
        }
        mma_rows_by_rows<T, kHeadDim, kQTile>(s, s_k, warp_row, s_q, lane);    // S^T = K Q^T
        mma_rows_by_rows<T, kHeadDim, kQTile>(dp, s_v, warp_row, s_do, lane);  // dP^T = V dO^T
        // The key rows' bias and last key from shared memory, not held through the loop (registers).
        const float row_bias[2] = {s_bias[warp_row + g], s_bias[warp_row + g + 8]};
        const int row_last[2] = {s_last[warp_row + g], s_last[warp_row + g + 8]};
#pragma unroll
        for (int nt = 0; nt < kQTile / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + 2 * t + (e & 1), r = e >> 1;
            float x = fmaf(s[nt][e], p.scale_log2, row_bias[r]) - s_lse[col];
            if (p.causal && row_last[r] > q0 + col + causal_offset) x = -INFINITY;
            const float prob = exp2f(x);
            s[nt][e] = prob;                                   // P^T
            dp[nt][e] = prob * (dp[nt][e] - s_delta[col]);     // dS^T
          }
        }
        mma_acc_by_rows<T, kHeadDim, kQTile>(dv, s, s_do, lane);  // dV += P^T dO
        mma_acc_by_rows<T, kHeadDim, kQTile>(dk, dp, s_q, lane);  // dK += dS^T Q
        __syncthreads();  // the next query tile overwrites Q, dO, lse and delta
      }
    }
  }

  // ---- The block's rows of dK_L (scaled) and dV_L: every pooled row of the level belongs to exactly one
  // key block, so each is written once (zeros where no pair saw it).
  const LevelGradientRows<T> out = level_gradient_rows<T, kHeadDim>(bp, L, bkv, tokens);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row + g + 8 * r, token = first_token + row;
    if (row < per_block && token < tokens) {
      store_row<T, kHeadDim>(dk, r, bp.scale, out.dk + static_cast<int64_t>(token) * kHeadDim, t);
      store_row<T, kHeadDim>(dv, r, 1.f, out.dv + static_cast<int64_t>(token) * kHeadDim, t);
    }
  }
}

template <typename T, int kHeadDim, int kBlockM>
cudaError_t launch_attention_backward_dq(const AttentionBackwardParams& p, cudaStream_t stream) {
  using Shape = AttentionBackwardShape<kHeadDim, kBlockM>;
  const size_t smem = Shape::smem_bytes(p.base.n_k);
  auto kernel = attention_backward_dq_kernel<T, kHeadDim, kBlockM>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem));
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(p.base.n_q), static_cast<unsigned>(p.base.batch * p.base.q_heads));
  kernel<<<grid, Shape::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kHeadDim, int kRows>
cudaError_t launch_attention_backward_dkdv(const AttentionBackwardParams& p, cudaStream_t stream) {
  using Shape = KeyBackwardShape<kHeadDim, kRows>;
  constexpr size_t smem = Shape::kSmemBytes;
  auto kernel = attention_backward_dkdv_kernel<T, kHeadDim, kRows>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem));
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(p.base.n_k), static_cast<unsigned>(p.base.batch * p.base.kv_heads));
  kernel<<<grid, Shape::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
