// The "sampled" block-importance estimator (docs/spec.md section 4) on Hopper (sm_90a): a TMA + wgmma GEMM of
// the sampled query rows against the sampled keys whose epilogue keeps only per-row block maxima.
// Same results as the portable kernel (../estimate_sampled.cuh); see there for the algorithm.
//
// Why it is shaped this way: the work is a GEMM with a short inner dimension (head_dim), so what
// bounds it is the work around the MMAs (feeding the tensor cores, the epilogue), not the math. Every tile of sampled rows is one TMA box, so the
// mainloop computes no gather addresses: with the default offsets (every 4th token) a box of a strided map
// reads them from Q and K in place, and only what that cannot express (the last, partial block, whose
// offsets clamp to its last token; any other offsets) is first copied into compact tensors
// (gather_sampled_rows.cuh; see SampledParams for the row numbering). A CTA keeps kRows = 256 sampled query
// rows resident (8 query blocks of 32 samples) and streams the sampled keys through a kStages ring, so
// each 128-key tile (32 KiB at head_dim 128) feeds 8.4 MFLOP of wgmma: about 2.5 TB/s of L2 traffic at
// the GEMM peak, well inside what L2 delivers.
//   - Warpgroup 0 is the producer: one thread issues the TMA loads (Q once, then K tiles).
//   - Warpgroups 1 and 2 each own 128 rows as two m64 tiles, held in registers once Q has landed (RS
//     wgmma: the MMAs read only K from shared memory; 1% faster at head_dim 128, the same at 64). Per
//     key tile a consumer issues the MMAs of m tile 0, then of m tile 1, and reduces m tile 0 while m
//     tile 1 runs; the other warpgroup's MMAs cover the epilogue of m tile 1. (Also issuing the next key
//     tile's m tile 0 before reducing m tile 1 makes ptxas serialize every wgmma, warning C7514; two
//     key tiles per iteration, all groups waited for within it, compile clean but ran 8% slower at
//     head_dim 128: NOTES.md.)
//   - Epilogue: per row and key block, the max over the block's kKeySamples columns, and the scale is
//     applied after the max (multiplication by a positive constant commutes with max exactly). Maxima
//     go to a global [n_k][kRows] table, as in the sm80 kernel, and write_sampled_scores turns that into
//     scores, its peaks kept in the operand tiles' shared memory. At head_dim 64 the epilogue's maxima,
//     not the MMAs, bound the mainloop (ncu, cogvideox: the consumer warps spend a sixth of it waiting
//     on wgmma and the rest issuing or waiting on their own FMNMX chains; taking 16 of its 271
//     instructions per tile away took 3.7% off the kernel), so its instruction count is what to cut:
//     - At 32 samples per key block (block_n 128) the key tiles are loaded with their rows transposed
//       (encode_row_transposed_map): accumulator column 8 j + 2 t + e then holds tile row
//       32 t + 16 e + j, so all 32 columns a thread holds of a row are samples of key block t, and a
//       row's block maximum is 31 FMNMX in one thread, no shuffles. (Which sample lands in which column
//       does not matter to a max.)
//     - At 16 or 8 samples (whose transposed box would need a sixth dimension) a quad of threads holds a
//       row's 128 columns; a butterfly reduce-scatter (two shuffle rounds) leaves each thread the maxima
//       of different key blocks.
//   - The table is the CTA's for its lifetime only: a CTA takes one of the host's per-SM table slots
//     (../table_slots.cuh), so one launch covers every head (no head chunks sized to a memory cap, each
//     ending in a partial wave) and the scratch is SMs x kRows x n_k floats whatever the batch.
#pragma once

#include <cfloat>
#include <type_traits>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cute/arch/copy_sm90_tma.hpp>

#include "../device_utils.cuh"
#include "../estimate_sampled_common.cuh"
#include "../params.h"
#include "../table_slots.cuh"
#include "shapes_sm90.h"
#include "tensor_map.h"
#include "wgmma.cuh"

namespace psa::kernels::sm90 {

// SampledParams plus the TMA descriptors of the sampled rows: read in place (compact rows before
// p.q_rows_begin / p.k_rows_begin) and copied (p.q_rows, p.k_rows). A map with no rows to read is left unset.
// At 32 samples per key block both key maps are row-transposed (encode_row_transposed_map).
struct SampledSm90Params {
  SampledParams base;
  CUtensorMap q_in_place_map;  // q from token default_step / 2, every default_step-th token; box kRows x 64
  CUtensorMap k_in_place_map;  // the same over k; box kTileN x 64
  CUtensorMap q_copy_map;      // [B, Hq, n_q * q_samples - q_rows_begin, D], box kRows x 64
  CUtensorMap k_copy_map;      // [B, Hkv, n_k * k_samples - k_rows_begin, D], box kTileN x 64
};

// Whether the key tiles come row-transposed (see the header comment): the kernel's loads and the host's maps.
constexpr bool transposed_key_tiles(int key_samples) { return key_samples == 32; }

template <typename T, int kHeadDim>
struct SampledSm90Operands {
  using Shape = SampledSm90Shape<kHeadDim>;
  alignas(kSwizzleAtomBytes) T q[Shape::kPanels][Shape::kRows][kPanelColumns];
  alignas(kSwizzleAtomBytes) T k[Shape::kStages][Shape::kPanels][Shape::kTileN][kPanelColumns];
};

template <typename T, int kHeadDim>
struct SampledSm90Storage {
  using Shape = SampledSm90Shape<kHeadDim>;
  // After the mainloop the operand tiles' bytes hold the peaks of write_sampled_scores ([blocks][n_k]) where
  // they fit: 49152 floats at head_dim 128, 40960 at 64 (n_k up to 6144 / 5120 at 8 query blocks a CTA).
  static constexpr int kPeakCapacity = sizeof(SampledSm90Operands<T, kHeadDim>) / sizeof(float);
  union {
    SampledSm90Operands<T, kHeadDim> operands;
    float peaks[kPeakCapacity];
  };
  float row_base[Shape::kRows];  // sampled_row_base of each row's max
  int table_slot;  // this CTA's scratch table (table_slots.cuh)
  uint64_t q_full;
  uint64_t full[Shape::kStages];
  uint64_t empty[Shape::kStages];
};

template <typename T, int kHeadDim, int kKeySamples>
__global__ void __launch_bounds__(SampledSm90Shape<kHeadDim>::kThreads, 1)
    estimate_sampled_sm90_kernel(const __grid_constant__ SampledSm90Params params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = SampledSm90Shape<kHeadDim>;
  using Storage = SampledSm90Storage<T, kHeadDim>;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kRows = Shape::kRows, kTileN = Shape::kTileN, kStages = Shape::kStages, kPanels = Shape::kPanels;
  constexpr int kMTiles = Shape::kMTiles;
  constexpr int kGroups = kTileN / kKeySamples;  // key blocks per tile
  constexpr int kGroupChunks = kKeySamples / 8;  // n8 accumulator chunks per key block
  const SampledParams& p = params.base;

  extern __shared__ unsigned char smem_unaligned[];
  Storage& smem = aligned_shared<Storage, kSwizzleAtomBytes>(smem_unaligned);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int bh = p.bh_begin + blockIdx.y, b = bh / p.q_heads, h = bh % p.q_heads;
  const int kv_head = h / (p.q_heads / p.kv_heads);
  const int blocks_per_cta = kRows / p.q_samples;
  const int first_block = blockIdx.x * blocks_per_cta;

  const CandidateBlocks candidates = sampled_candidates(p);
  int active_blocks = 0;  // key blocks any of this CTA's query blocks may see
  for (int qb = 0; qb < blocks_per_cta && first_block + qb < p.n_q; ++qb) {
    active_blocks = max(active_blocks, candidates.last(first_block + qb) + 1);
  }
  const int n_tiles = (active_blocks * kKeySamples + kTileN - 1) / kTileN;

  if (tid == 0) {
    smem.table_slot = acquire_table_slot(p.table_slot_busy, p.table_slots);
    Barrier::init(&smem.q_full, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&smem.full[s], 1);                       // the producer's arrive (+ TMA bytes)
      Barrier::init(&smem.empty[s], Shape::kConsumers * 4);  // one arrive per consumer warp
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  float* table = p.table + static_cast<int64_t>(smem.table_slot) * kRows * p.n_k;

  if (warp < 4) {
    // ================= Producer warpgroup =================
    cutlass::arch::warpgroup_reg_dealloc<Shape::kProducerRegisters>();
    if (tid != 0 || n_tiles == 0) return;
    // A box of compact rows from `row` on: in place before `copied_from`, else from the copy.
    const auto load_rows = [](const CUtensorMap& in_place, const CUtensorMap& copy, int copied_from, int row,
                              uint64_t* barrier, T* destination, int column, int head, int batch) {
      const bool copied = row >= copied_from;
      cute::SM90_TMA_LOAD_4D::copy(copied ? &copy : &in_place, barrier, 0, destination, column,
                                   copied ? row - copied_from : row, head, batch);
    };
    TxBarrier::expect_transaction(&smem.q_full, static_cast<uint32_t>(sizeof(smem.operands.q)));
#pragma unroll
    for (int panel = 0; panel < kPanels; ++panel) {
      load_rows(params.q_in_place_map, params.q_copy_map, p.q_rows_begin, blockIdx.x * kRows, &smem.q_full,
                &smem.operands.q[panel][0][0], panel * kPanelColumns, h, b);
    }
    Barrier::arrive(&smem.q_full);
    for (int tile = 0; tile < n_tiles; ++tile) {
      const int stage = tile % kStages;
      Barrier::wait(&smem.empty[stage], ((tile / kStages) & 1) ^ 1);
      TxBarrier::expect_transaction(&smem.full[stage], static_cast<uint32_t>(sizeof(smem.operands.k[0])));
#pragma unroll
      for (int panel = 0; panel < kPanels; ++panel) {
        T* destination = &smem.operands.k[stage][panel][0][0];
        if constexpr (transposed_key_tiles(kKeySamples)) {
          static_assert(kTileN == 128, "a transposed box is 8 x 16 rows");
          const bool copied = tile * kTileN >= p.k_rows_begin;
          const int first_row = copied ? tile * kTileN - p.k_rows_begin : tile * kTileN;
          cute::SM90_TMA_LOAD_5D::copy(copied ? &params.k_copy_map : &params.k_in_place_map, &smem.full[stage], 0,
                                       destination, panel * kPanelColumns, first_row / 16, 0, kv_head, b);
        } else {
          load_rows(params.k_in_place_map, params.k_copy_map, p.k_rows_begin, tile * kTileN, &smem.full[stage],
                    destination, panel * kPanelColumns, kv_head, b);
        }
      }
      Barrier::arrive(&smem.full[stage]);
    }
    return;
  }

  // ================= Consumer warpgroups =================
  cutlass::arch::warpgroup_reg_alloc<Shape::kConsumerRegisters>();
  // Broadcast from lane 0: the compiler then knows the warpgroup index is warp-uniform and keeps the
  // MMA descriptors derived from it in uniform registers.
  const int consumer = __shfl_sync(0xffffffffu, warp / 4 - 1, 0), warp_in_group = warp % 4;
  const int g = lane >> 2, t = lane & 3;
  // A thread holds rows g and g + 8 of its warp's 16 rows in each m64 tile: slot 2 * mt + r.
  int local_rows[2 * kMTiles], row_last[2 * kMTiles];
  float row_max[2 * kMTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = consumer * 64 * kMTiles + mt * 64 + warp_in_group * 16 + g + 8 * r;
      local_rows[2 * mt + r] = row;
      row_last[2 * mt + r] = candidates.last(first_block + row / p.q_samples);
      row_max[2 * mt + r] = -INFINITY;
    }
  }

  using Accumulator = float[kTileN / 2];  // m64n128: column of element 4j + e is 8j + 2t + (e & 1)
  Accumulator acc[kMTiles];
  // K's descriptor built once; per MMA only the start address moves (SmemDescriptor::at).
  const auto k_desc = SmemDescriptor::of(&smem.operands.k[0][0][0][0], 16, kSwizzleAtomBytes);
  constexpr uint32_t kStageBytes = sizeof(smem.operands.k[0]);
  // The warp's 16 rows of each m tile in registers, as the m64k16 A fragments of RS wgmma: the MMAs then
  // read only K from shared memory. ldmatrix lane l reads row l % 16, 16-byte chunk l / 16 of a k16 step,
  // where the 128-byte swizzle put it (chunk ^ row % 8).
  uint32_t q_fragments[kMTiles][kHeadDim / 16][4];
  const auto load_q = [&] {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      const int row = consumer * 64 * kMTiles + mt * 64 + warp_in_group * 16 + (lane & 15);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const int chunk = (kk % 4) * 2 + (lane >> 4);
        ldmatrix_x4(q_fragments[mt][kk],
                    &smem.operands.q[kk / 4][row][((chunk ^ (row & 7)) * 16) / static_cast<int>(sizeof(T))]);
      }
    }
  };
  // Issues S[m tile mt] = Q K^T for the key tile in `stage` (asynchronous; one commit group).
  auto issue = [&](int mt, int stage) {
    fence_registers(acc[mt]);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const uint32_t k_offset = stage * kStageBytes + k_major_step_offset(kk, kTileN);
      mma_rs_k_major<T, kTileN>(q_fragments[mt][kk], k_desc.at(k_offset), acc[mt], kk > 0);
    }
    cute::warpgroup_commit_batch();
  };
  // Block maxima of m tile mt of key tile `tile` into the table and the row maxima.
  auto reduce = [&](int mt, int tile) {
    fence_registers(acc[mt]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float owned[kGroups / 4];  // the maxima of key blocks 4 m + t of the tile, unscaled
      if constexpr (transposed_key_tiles(kKeySamples)) {
        // All 32 of the row's columns here are key block t's: a pairwise tree, 5 deep.
        float level[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) level[j] = max_nan(acc[mt][4 * j + 2 * r], acc[mt][4 * j + 2 * r + 1]);
#pragma unroll
        for (int j = 0; j < 8; ++j) level[j] = max_nan(level[j], level[j + 8]);
#pragma unroll
        for (int j = 0; j < 4; ++j) level[j] = max_nan(level[j], level[j + 4]);
        owned[0] = max_nan(max_nan(level[0], level[2]), max_nan(level[1], level[3]));
      } else {
        float groups[kGroups];
#pragma unroll
        for (int group = 0; group < kGroups; ++group) {
          float m = max_nan(acc[mt][4 * group * kGroupChunks + 2 * r],
                            acc[mt][4 * group * kGroupChunks + 2 * r + 1]);
#pragma unroll
          for (int c = 1; c < kGroupChunks; ++c) {
            const int j = group * kGroupChunks + c;
            m = max_nan(m, max_nan(acc[mt][4 * j + 2 * r], acc[mt][4 * j + 2 * r + 1]));
          }
          groups[group] = m;
        }
        quad_reduce_scatter(groups, owned, t, [](float a, float b) { return max_nan(a, b); });
      }
      const int slot = 2 * mt + r;
#pragma unroll
      for (int m = 0; m < kGroups / 4; ++m) {
        const int key_block = tile * kGroups + 4 * m + t;
        const float value = key_block > row_last[slot] ? -INFINITY : owned[m] * p.scale_log2;
        row_max[slot] = max_nan(row_max[slot], value);
        if (key_block < active_blocks) table[key_block * kRows + local_rows[slot]] = value;
      }
    }
  };
  static_assert(kMTiles == 2, "the mainloop overlaps one m tile's epilogue with the other's MMAs");

  if (n_tiles > 0) {
    Barrier::wait(&smem.q_full, 0);
    load_q();
  }
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile % kStages;
    Barrier::wait(&smem.full[stage], (tile / kStages) & 1);
    issue(0, stage);
    issue(1, stage);
    cute::warpgroup_wait<1>();  // m tile 0 is done; m tile 1 runs under its epilogue
    reduce(0, tile);
    cute::warpgroup_wait<0>();
    if (lane == 0) Barrier::arrive(&smem.empty[stage]);  // this warp no longer reads the stage
    reduce(1, tile);
  }

  // Row maxima: each thread of a quad saw different key blocks.
#pragma unroll
  for (int slot = 0; slot < 2 * kMTiles; ++slot) {
    const float m = quad_max(row_max[slot]);
    if (t == 0) smem.row_base[local_rows[slot]] = sampled_row_base(m);
  }
  // A barrier over the consumer warpgroups only (the producer has exited); it also orders the table's
  // global writes before other threads read them.
  const auto consumers_sync = [] {
    cutlass::arch::NamedBarrier::sync(Shape::kConsumers * 128, 0);
  };
  consumers_sync();  // every consumer's MMAs are done: the operand tiles' bytes may take the peaks
  const bool peaks_in_shared = blocks_per_cta * p.n_k <= Storage::kPeakCapacity;
  const SampledPeaks peaks = peaks_in_shared ? SampledPeaks{smem.peaks, p.n_k, 1} : table_peaks<kRows>(p, table);
  write_sampled_scores<kRows, 8, 5>(p, table, smem.row_base, peaks, bh, first_block, blocks_per_cta, candidates,
                                    tid - 128, Shape::kConsumers * 128, consumers_sync);
  consumers_sync();  // the table's last reads (the peaks' too, where they are in the table) are done
  if (tid == 128) release_table_slot(p.table_slot_busy, smem.table_slot);
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <typename T, int kHeadDim>
cudaError_t launch_estimate_sampled_sm90(const SampledParams& p, cudaStream_t stream) {
  using Shape = SampledSm90Shape<kHeadDim>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  SampledSm90Params params{};
  params.base = p;
  // The maps of one side's sampled rows: compact rows [0, in_place_rows) of the input itself (its rows
  // every default_step tokens from token default_step / 2), the rest from the copy.
  const auto encode_maps = [&](CUtensorMap* in_place, CUtensorMap* copy, const void* input,
                               const int64_t (&stride)[3], int heads, int in_place_rows, int64_t rows,
                               const void* copied, int box_rows, bool transposed = false) {
    // Row counts are multiples of 16 here: in-place rows of the box height, copied rows of whole blocks.
    const auto encode = [&](CUtensorMap* map, const void* data, int64_t map_rows, const int64_t (&strides)[3]) {
      return transposed ? encode_row_transposed_map(map, data, kBf16, p.batch, heads, map_rows, kHeadDim, strides)
                        : encode_bhld_map(map, data, kBf16, p.batch, heads, map_rows, kHeadDim, strides, box_rows);
    };
    cudaError_t status = cudaSuccess;
    if (in_place_rows > 0) {
      const int64_t row_stride[3] = {stride[0], stride[1], stride[2] * p.default_step};
      status = encode(in_place, static_cast<const T*>(input) + p.default_step / 2 * stride[2], in_place_rows,
                      row_stride);
    }
    const int64_t copied_rows = rows - in_place_rows;
    if (status == cudaSuccess && copied_rows > 0) {
      const int64_t copy_stride[3] = {heads * copied_rows * kHeadDim, copied_rows * kHeadDim, kHeadDim};
      status = encode(copy, copied, copied_rows, copy_stride);
    }
    return status;
  };
  cudaError_t status = encode_maps(&params.q_in_place_map, &params.q_copy_map, p.q, p.q_stride, p.q_heads,
                                   p.q_rows_begin, static_cast<int64_t>(p.n_q) * p.q_samples, p.q_rows, Shape::kRows);
  if (status == cudaSuccess) {
    status = encode_maps(&params.k_in_place_map, &params.k_copy_map, p.k, p.k_stride, p.kv_heads, p.k_rows_begin,
                         static_cast<int64_t>(p.n_k) * p.k_samples, p.k_rows, Shape::kTileN,
                         transposed_key_tiles(p.k_samples));
  }
  if (status != cudaSuccess) return status;
  // The host gives the kernel one table slot per SM (table_slots.cuh): sound only while a CTA's shared
  // memory keeps a second CTA off its SM.
  static_assert(Shape::kCtasPerSm == 1 && 2 * sizeof(SampledSm90Storage<T, kHeadDim>) > kSharedMemoryPerSm,
                "more than one estimator CTA fits an SM: give the host's table slots a second per SM");
  const auto launch = [&](auto kernel) {
    constexpr size_t smem = sizeof(SampledSm90Storage<T, kHeadDim>) + kSwizzleAtomBytes;  // + alignment slack
    cudaError_t result = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem));
    if (result != cudaSuccess) return result;
    const dim3 grid(static_cast<unsigned>(Shape::ctas_per_head(p.n_q, p.q_samples)),
                    static_cast<unsigned>(p.bh_count));
    kernel<<<grid, Shape::kThreads, smem, stream>>>(params);
    return cudaGetLastError();
  };
  switch (p.k_samples) {
    case 8: return launch(estimate_sampled_sm90_kernel<T, kHeadDim, 8>);
    case 16: return launch(estimate_sampled_sm90_kernel<T, kHeadDim, 16>);
    case 32: return launch(estimate_sampled_sm90_kernel<T, kHeadDim, 32>);
    default: return cudaErrorInvalidValue;  // the host sends only 8, 16 or 32
  }
}

}  // namespace psa::kernels::sm90
