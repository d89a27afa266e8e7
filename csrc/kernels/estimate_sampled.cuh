// Fused "sampled" block-importance estimator (spec section 4): sm80+ with mma.sync, and on sm_90a the
// same kernel with Q K^T on wgmma (kHopper: Q and K tiles in wgmma's swizzled panel layout, one
// warpgroup issuing two m64n64 MMAs per k16 step).
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
#include "sm90/shapes_sm90.h"
#if defined(PSA_WITH_SM90)
#include "sm90/wgmma.cuh"
#endif

namespace psa::kernels {

// Where element chunk `chunk` (8 elements) of row `row` of a [rows x kHeadDim] tile lives in shared
// memory: sm80, the XOR-swizzled rows ldmatrix reads; sm90 (kHopper), 64-column panels with the
// 128-byte swizzle that wgmma's descriptors describe (see sm90/wgmma.cuh).
template <int kHeadDim, int kTileRows, bool kHopper>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  if constexpr (kHopper) {
    using sm90::kPanelColumns;
    return (chunk / 8) * kTileRows * kPanelColumns + row * kPanelColumns + (((chunk % 8) ^ (row % 8)) * 8);
  } else {
    return SwizzledRows<kHeadDim>::offset(row, chunk);
  }
}

// kHopper: the same kernel with its Q K^T on wgmma (sm_90a; both operands from shared memory); it
// compiles to nothing for other targets and is launched only on sm_90.
template <typename T, int kHeadDim, bool kHopper>
__global__ void __launch_bounds__(SampledShape<kHeadDim>::kThreads, SampledShape<kHeadDim>::kMinBlocks)
    estimate_sampled_kernel(const SampledParams p) {
#if defined(PSA_WITH_SM90)
  if constexpr (kHopper) {
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
    return;
#endif
  }
#endif
  using Shape = SampledShape<kHeadDim>;
  using Rows = SwizzledRows<kHeadDim>;
  constexpr int kRows = Shape::kRows, kTileN = Shape::kTileN;

  extern __shared__ __align__(128) unsigned char smem_unaligned[];
  // wgmma's 128-byte swizzle repeats every kSwizzleAtomBytes: its tiles start aligned to that.
  constexpr uintptr_t kAlign = sm90::kSwizzleAtomBytes;
  unsigned char* smem = kHopper ? reinterpret_cast<unsigned char*>(
                                      (reinterpret_cast<uintptr_t>(smem_unaligned) + kAlign - 1) & ~(kAlign - 1))
                                : smem_unaligned;
  T* s_q = reinterpret_cast<T*>(smem);                                   // [kRows x D]
  T* s_k = s_q + kRows * kHeadDim;                                       // [kStages][kTileN x D]
  float* s_row_max = reinterpret_cast<float*>(s_k + Shape::kStages * kTileN * kHeadDim);  // [kRows]
  float* table = p.table + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kRows * p.n_k;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int bh = p.bh_begin + blockIdx.y, b = bh / p.q_heads, h = bh % p.q_heads;
  const int kv_head = h / (p.q_heads / p.kv_heads);
  const int blocks_per_cta = kRows / p.q_samples;
  const int first_block = blockIdx.x * blocks_per_cta;

  const SampledCandidates candidates(p);
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
      const int offset = clamp_offset(p.q_offsets[row % p.q_samples], p.block_m);
      const int64_t position = min(block * p.block_m + offset, p.q_len - 1);
      cp_async_16(s_q + tile_offset<kHeadDim, kRows, kHopper>(row, chunk),
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
      const int offset = clamp_offset(p.k_offsets[column % p.k_samples], p.block_n);
      const int64_t position = min(block * p.block_n + offset, p.k_len - 1);
      cp_async_16(dst + tile_offset<kHeadDim, kTileN, kHopper>(row, chunk),
                  k + (valid ? position * p.k_stride[2] + chunk * 8 : 0), valid);
    }
  };

  if (n_tiles > 0) load_tile(0, 0);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  // sm80: a warp owns kMTiles m16 row tiles, so every K fragment it loads feeds 2 * kMTiles MMAs.
  // sm90: the warpgroup runs kMTiles m64 MMAs, warp w holding rows 16w..16w+15 of each. Either way
  // a thread holds rows g and g + 8 of each m tile: local row index 2 * mt + r.
  constexpr int kMTiles = Shape::kMTiles, kWarpRows = 16 * kMTiles;
  static_assert(!kHopper || kRows == 64 * kMTiles, "the wgmma path takes the CTA's rows as m64 tiles");
  uint32_t q_frag[kHopper ? 1 : kMTiles][kHopper ? 1 : kHeadDim / 16][4];
  int local_rows[2 * kMTiles], row_last_candidate[2 * kMTiles];
  float row_max[2 * kMTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    if constexpr (!kHopper) {
#pragma unroll
      for (int kc = 0; kc < kHeadDim / 16; ++kc) {
        ldmatrix_x4(q_frag[mt][kc], s_q + Rows::offset(warp * kWarpRows + mt * 16 + (lane & 15), 2 * kc + (lane >> 4)));
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      local_rows[2 * mt + r] = kHopper ? mt * 64 + warp * 16 + g + 8 * r : warp * kWarpRows + mt * 16 + g + 8 * r;
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
    // cp.async writes through the generic proxy; wgmma reads through the async proxy.
    if constexpr (kHopper) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();

    const T* k_tile = s_k + stage * kTileN * kHeadDim;
    float s[kMTiles][kTileN / 8][4];  // per m tile: the accumulator of an m64n64 (sm90) or 4 m16n8 tiles per n16 (sm80)
#if defined(PSA_WITH_SM90)
    if constexpr (kHopper) {
      using AccumulatorRow = float[kTileN / 2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) sm90::fence_registers(reinterpret_cast<AccumulatorRow&>(s[mt]));
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const int panel = kk / 4, within = (kk % 4) * 16;
        const uint64_t b = sm90::smem_descriptor(k_tile + panel * kTileN * sm90::kPanelColumns + within, 16,
                                                 sm90::kSwizzleAtomBytes);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          const T* q_tile = s_q + (panel * kRows + mt * 64) * sm90::kPanelColumns;
          const uint64_t a = sm90::smem_descriptor(q_tile + within, 16, sm90::kSwizzleAtomBytes);
          sm90::mma_ss<T, kTileN>(a, b, reinterpret_cast<AccumulatorRow&>(s[mt]), kk > 0);
        }
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) sm90::fence_registers(reinterpret_cast<AccumulatorRow&>(s[mt]));
    }
#endif
#pragma unroll
    for (int mt = 0; mt < kMTiles && !kHopper; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kTileN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
    }
#pragma unroll
    for (int kc = 0; kc < kHeadDim / 16 && !kHopper; ++kc) {
#pragma unroll
      for (int np = 0; np < kTileN / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + Rows::offset(np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * kc + ((lane >> 3) & 1)));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          if constexpr (!kHopper) {
            mma_16816<T>(s[mt][2 * np], q_frag[mt][kc], kb[0], kb[1]);
            mma_16816<T>(s[mt][2 * np + 1], q_frag[mt][kc], kb[2], kb[3]);
          }
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
        block_max[2 * mt] = fmaxf(block_max[2 * mt], fmaxf(s[mt][nt][0], s[mt][nt][1]) * p.scale_log2);
        block_max[2 * mt + 1] = fmaxf(block_max[2 * mt + 1], fmaxf(s[mt][nt][2], s[mt][nt][3]) * p.scale_log2);
      }
      if ((nt + 1) % tiles_per_block == 0) {
        const int key_block = (tile * kTileN + nt * 8) / p.k_samples;
#pragma unroll
        for (int i = 0; i < 2 * kMTiles; ++i) {
          float value = quad_max(block_max[i]);
          if (key_block > row_last_candidate[i]) value = -INFINITY;
          row_max[i] = fmaxf(row_max[i], value);
          if (t == 0 && key_block < active_blocks) table[key_block * kRows + local_rows[i]] = value;
          block_max[i] = -INFINITY;
        }
      }
    }
    __syncthreads();  // the next iteration's load overwrites this stage
  }
  if (t == 0) {
#pragma unroll
    for (int i = 0; i < 2 * kMTiles; ++i) s_row_max[local_rows[i]] = row_max[i];
  }
  __syncthreads();  // also makes the table's global writes visible to the whole CTA
  write_sampled_scores<kRows>(p, table, s_row_max, bh, first_block, blocks_per_cta, candidates);
}

template <typename T, int kHeadDim>
cudaError_t launch_estimate_sampled(const SampledParams& p, cudaStream_t stream) {
  using Shape = SampledShape<kHeadDim>;
#if defined(PSA_WITH_SM90)
  // + room to align the wgmma tiles
  const size_t smem = Shape::kSmemBytes + (p.use_wgmma ? sm90::kSwizzleAtomBytes : 0);
  auto kernel = p.use_wgmma ? estimate_sampled_kernel<T, kHeadDim, true> : estimate_sampled_kernel<T, kHeadDim, false>;
#else
  const size_t smem = Shape::kSmemBytes;
  auto kernel = estimate_sampled_kernel<T, kHeadDim, false>;
#endif
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem));
  if (status != cudaSuccess) return status;
  const int blocks_per_cta = Shape::kRows / p.q_samples;
  const dim3 grid(static_cast<unsigned>((p.n_q + blocks_per_cta - 1) / blocks_per_cta),
                  static_cast<unsigned>(p.bh_count));
  kernel<<<grid, Shape::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
