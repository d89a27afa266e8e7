// Tile shapes and shared-memory footprints of the Hopper kernels, visible to host code (no device code
// here) so that dispatch can check limits before choosing them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../params.h"

namespace psa::kernels::sm90 {

constexpr int kPanelColumns = 64;        // 16-bit elements per 128-byte swizzled row
constexpr int kPanelRowBytes = 128;
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows x 128 bytes: the swizzle pattern's period
constexpr size_t kSharedMemoryPerSm = 228 * 1024;  // an sm_90 SM's shared memory (227 KB of it per CTA)

// kDq: the backward's dq pass (the same producer; per tile S = Q K^T and dP = dO V^T, then
// dq += dS K), which holds dO beside Q and keeps S, dP and dq in registers at once.
template <int kHeadDim, int kBlockM, bool kDq = false>
struct AttentionSm90Shape {
  static constexpr size_t kElementBytes = 2;                   // bf16 / fp16
  static constexpr int kConsumers = kBlockM / 64;              // consumer warpgroups, 64 rows each
  static constexpr int kThreads = 128 * (kConsumers + 1);       // + the producer warpgroup
  // Keys per tile (the S tile's N). The dq pass's S, dP (kTileN / 2 floats each), dq (kHeadDim / 2)
  // and dS fragments fit the consumers' registers at 64.
  static constexpr int kTileN = kBlockM == 128 && !kDq ? 128 : 64;
  static constexpr int kRowOperands = kDq ? 2 : 1;              // Q (and dO) rows per item
  // K/V ring depth: at head_dim 64 a stage is half the bytes and a tile half the MMA time, so the
  // producer needs more tiles in flight to stay ahead; at 128 two stages fill the forward's shared
  // memory, and the dq pass's half-size tiles take three.
  static constexpr int kStages = kHeadDim == 64 ? 4 : kDq ? 3 : 2;
  static constexpr int kPanels = kHeadDim / kPanelColumns;
  static constexpr int kMinBlocks = kBlockM == 128 || kDq ? 1 : 2;  // CTAs per SM
  // setmaxnreg budgets: the producer gives registers back, the consumers take them. A CTA starts with
  // kThreads x the launch-bounds cap (65536 / (kThreads * kMinBlocks), rounded down to 8) and
  // setmaxnreg.inc waits until the CTA's pool has the registers, so the budgets must fit that pool
  // exactly, not the SM's 64K: 40 + 2 x 232 = 3 x 168. (A producer at 24 spills its tile walk; the
  // overlapped consumer, with S, P and O live at once, fits in 232.)
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = kBlockM == 128 ? 232 : 216;
  static constexpr int kEntryRegisters = (65536 / (kThreads * kMinBlocks)) / 8 * 8;
  static_assert(kProducerRegisters + kConsumers * kConsumerRegisters <= (kConsumers + 1) * kEntryRegisters,
                "setmaxnreg budgets exceed the CTA's register pool");
  static constexpr size_t kTileBytes = kElementBytes * kTileN * kHeadDim;  // one K or V stage
  static size_t smem_bytes(int n_k);
};

// Shared memory of the Hopper attention kernel. Tiles are 16-bit elements in 64-column panels with the
// 128-byte swizzle (wgmma.cuh); the kernel views them as its element type. K and V have separate
// full/empty barriers, so a K stage is refilled as soon as its S = Q K^T is done while V of the same
// tile is still in use. Q has its own pair: the next item's Q loads while the consumers write the
// previous item's output. The level schedules of two items (ids of n_k key blocks each) follow the
// struct, with their counts and starts in `level_count` / `level_start` [slot]; a slot is handed
// between the schedule builder warp and its readers by sched_full / sched_empty.
template <int kHeadDim, int kBlockM, bool kDq = false>
struct AttentionSm90Storage {
  using Shape = AttentionSm90Shape<kHeadDim, kBlockM, kDq>;
  static constexpr int kStages = Shape::kStages, kTileN = Shape::kTileN, kPanels = Shape::kPanels;
  // rows[0]: Q; rows[1]: dO (dq pass). One q_full / q_empty pair covers both.
  alignas(kSwizzleAtomBytes) uint16_t rows[Shape::kRowOperands][kPanels][kBlockM][kPanelColumns];
  alignas(kSwizzleAtomBytes) uint16_t k[kStages][kPanels][kTileN][kPanelColumns];
  alignas(kSwizzleAtomBytes) uint16_t v[kStages][kPanels][kTileN][kPanelColumns];
  uint64_t q_full, q_empty;
  uint64_t k_full[kStages], k_empty[kStages];
  uint64_t v_full[kStages], v_empty[kStages];
  uint64_t sched_full[2], sched_empty[2];
  int level_count[2][kNumLevels], level_start[2][kNumLevels];
};

template <int kHeadDim, int kBlockM, bool kDq>
size_t AttentionSm90Shape<kHeadDim, kBlockM, kDq>::smem_bytes(int n_k) {
  // + two schedules' ids, + slack to align the start (dynamic shared memory is only 16-byte aligned)
  return sizeof(AttentionSm90Storage<kHeadDim, kBlockM, kDq>) + 2 * sizeof(uint16_t) * static_cast<size_t>(n_k) +
         kSwizzleAtomBytes;
}

// The backward's key-major dK / dV pass (attention_backward_dkdv_sm90.cuh): kKeyRows pooled keys of
// one level resident per CTA, against a ring of kQTile-row (Q, dO) tiles of the query blocks that see
// them. kKeyRows 128: each consumer warpgroup owns 64 of the keys and sees every tile. kKeyRows 64 (one
// key block of 64 rows, or several shorter ones packed): both own the same keys and take alternate
// tiles, and their sums meet in shared memory at the end.
template <int kHeadDim, int kKeyRows>
struct KeyBackwardSm90Shape {
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = 128 * (kConsumers + 1);  // + the producer warpgroup
  static constexpr int kQTile = 64;                         // query rows per tile: the S^T tile's N
  static constexpr bool kSplitTiles = kKeyRows == 64;
  static constexpr int kConsumersPerTile = kSplitTiles ? 1 : 2;
  // A (Q, dO) stage is 32 KiB at head_dim 128: three fill the shared memory beside K, V and the split
  // variant's partial sums; at 64 a stage is half the bytes and a tile half the MMA time.
  static constexpr int kStages = kHeadDim == 64 ? 4 : 3;
  static constexpr int kPanels = kHeadDim / kPanelColumns;
  // 24 + 2 x 240 = 3 x 168: the consumers hold dK and dV (kHeadDim / 2 floats each), S^T and dP^T
  // (kQTile / 2 each) and the P^T / dS^T fragments of the tile whose MMAs are in flight.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  static constexpr int kEntryRegisters = (65536 / kThreads) / 8 * 8;
  static_assert(kProducerRegisters + kConsumers * kConsumerRegisters <= (kConsumers + 1) * kEntryRegisters,
                "setmaxnreg budgets exceed the CTA's register pool");
  static_assert(kKeyRows == 64 || kKeyRows == 128, "64 keys per consumer warpgroup");
};

// The split variant's second warpgroup's dK and dV, in accumulator order (thread-major per register,
// so the 128 threads' stores and the first warpgroup's loads are conflict-free).
template <int kHeadDim, bool kSplitTiles>
struct KeyBackwardPartials {
  float dk[kHeadDim / 2][128];
  float dv[kHeadDim / 2][128];
};
template <int kHeadDim>
struct KeyBackwardPartials<kHeadDim, false> {};

template <int kHeadDim, int kKeyRows>
struct KeyBackwardSm90Storage {
  using Shape = KeyBackwardSm90Shape<kHeadDim, kKeyRows>;
  static constexpr int kStages = Shape::kStages, kPanels = Shape::kPanels, kQTile = Shape::kQTile;
  alignas(kSwizzleAtomBytes) uint16_t k[kPanels][kKeyRows][kPanelColumns];
  alignas(kSwizzleAtomBytes) uint16_t v[kPanels][kKeyRows][kPanelColumns];
  alignas(kSwizzleAtomBytes) uint16_t q[kStages][kPanels][kQTile][kPanelColumns];
  alignas(kSwizzleAtomBytes) uint16_t d_out[kStages][kPanels][kQTile][kPanelColumns];
  KeyBackwardPartials<kHeadDim, Shape::kSplitTiles> partials;
  // Read as float2 by the consumers: 16-byte aligned whatever precedes them (the empty partials take a byte).
  alignas(16) float lse[kStages][kQTile];    // the tile's rows' lse in the exp2 domain; +inf: past the block or saw nothing
  alignas(16) float delta[kStages][kQTile];
  int q_begin[kStages];          // the tile's first query row; -1: the walk is over
  uint32_t blocks[kStages];      // bit jj: the CTA's key block jj chose the tile's query block
  uint64_t kv_full;
  uint64_t full[kStages], empty[kStages];
  static constexpr size_t smem_bytes() { return sizeof(KeyBackwardSm90Storage) + kSwizzleAtomBytes; }
};

// The sampled estimator's GEMM (estimate_sampled_sm90.cuh): kRows sampled query rows resident per CTA,
// sampled keys streamed kTileN at a time.
template <int kHeadDim>
struct SampledSm90Shape {
  static constexpr int kConsumers = 2;                     // warpgroups
  static constexpr int kMTiles = 2;                        // m64 tiles per consumer
  static constexpr int kRows = 64 * kMTiles * kConsumers;  // 256: 8 query blocks of 32 samples
  static constexpr int kThreads = 128 * (kConsumers + 1);  // + the producer warpgroup
  static constexpr int kTileN = 128;                       // sampled keys per tile
  static constexpr int kPanels = kHeadDim / kPanelColumns;
  // Q (64 KiB at head_dim 128) plus the K ring fill the shared memory of one CTA per SM.
  static constexpr int kStages = kHeadDim == 128 ? 4 : 8;
  static constexpr int kCtasPerSm = 1;  // the shared memory's bound; the host's table slots count on it
  // 24 + 2 x 240 = 3 x 168 (the producer is one thread issuing TMA).
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  static constexpr int kEntryRegisters = (65536 / kThreads) / 8 * 8;
  static_assert(kProducerRegisters + kConsumers * kConsumerRegisters <= (kConsumers + 1) * kEntryRegisters,
                "setmaxnreg budgets exceed the CTA's register pool");
  static int64_t ctas_per_head(int n_q, int q_samples) {
    return (static_cast<int64_t>(n_q) * q_samples + kRows - 1) / kRows;
  }
  // Scratch floats of one CTA's [n_k][kRows] table of block maxima (one per table slot).
  static int64_t table_floats_per_cta(int n_k) { return static_cast<int64_t>(kRows) * n_k; }
};

// The antidiagonal estimator's GEMM (estimate_antidiagonal_sm90.cuh): kRows anti-rows per CTA (64 per
// consumer warpgroup) against kTileN anti-columns per tile; the inner dimension, S * head_dim, streams
// through a ring of kStages (Q box, K box) pairs of 64 head_dim columns each.
template <int kHeadDim>
struct AntidiagonalSm90Shape {
  static constexpr int kConsumers = 2;                     // warpgroups, one m64 tile each
  static constexpr int kRows = 64 * kConsumers;            // 128 anti-rows
  static constexpr int kThreads = 128 * (kConsumers + 1);  // + the producer warpgroup
  static constexpr int kTileN = 256;                       // anti-columns per tile: m64n256 MMAs
  static constexpr int kGroups = kTileN / 8;               // groups of 8 anti-columns: the table's unit
  static constexpr int kPanels = kHeadDim / kPanelColumns;
  static constexpr int kMaxStride = 8;                     // one TMA descriptor per member of Q's and K's groups
  // A stage is 16 KiB of Q and 32 KiB of K: four fill 192 KiB.
  static constexpr int kStages = 4;
  // The producer warpgroup: one thread issuing TMA and three finisher warps running each item's last
  // pass (write_antidiagonal_scores) under the next item's mainloop.
  static constexpr int kFinisherThreads = 96;
  // 120 + 2 x 192 = 3 x 168: the finishers' last pass (its unrolled float4 loads) spills below about
  // 100; a consumer, its 128 accumulators included, compiles within 168 without spills.
  static constexpr int kProducerRegisters = 120;
  static constexpr int kConsumerRegisters = 192;
  static constexpr int kEntryRegisters = (65536 / kThreads) / 8 * 8;
  static_assert(kProducerRegisters + kConsumers * kConsumerRegisters <= (kConsumers + 1) * kEntryRegisters,
                "setmaxnreg budgets exceed the CTA's register pool");
  static int64_t ctas_per_head(int n_q, int rows_per_block) {
    return (static_cast<int64_t>(n_q) * rows_per_block + kRows - 1) / kRows;
  }
  // Scratch floats of one (batch, head), laid out as the sm80 kernel's (AntidiagonalShape).
  static int64_t table_floats_per_head(int n_q, int rows_per_block, int k_tiles) {
    const int64_t tiles = (k_tiles + kTileN - 1) / kTileN;
    return ctas_per_head(n_q, rows_per_block) * kRows * tiles * (kGroups + 1);
  }
};

}  // namespace psa::kernels::sm90
