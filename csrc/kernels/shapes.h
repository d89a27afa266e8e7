// Tile shapes and shared-memory footprints of the tensor-core kernels, visible to host code so that
// the launchers' callers can check limits before launching (no device code here).
#pragma once

#include <cstddef>
#include <cstdint>

namespace psa::kernels {

template <int kHeadDim, int kBlockM>
struct AttentionShape {
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  // Keys per tile: as wide as the registers allow at two CTAs per SM (S and O accumulators).
  static constexpr int kTileN = kHeadDim == 64 ? 128 : 64;
  static constexpr int kStages = 2;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  // CTAs per SM the register budget is sized for (__launch_bounds__): two, so one CTA's barrier
  // waits and cp.async latency overlap the other's MMAs.
  static constexpr int kMinBlocks = 2;
  static constexpr int kQElements = kBlockM * kHeadDim;
  static constexpr int kTileElements = kTileN * kHeadDim;
  // Q, K and V stages, then per stage and column: bias (float) and last covered key (int), then ids.
  static constexpr size_t kFixedBytes =
      2 * (kQElements + 2 * kStages * kTileElements) + kStages * kTileN * (sizeof(float) + sizeof(int));
  static size_t smem_bytes(int n_k) { return kFixedBytes + sizeof(uint16_t) * static_cast<size_t>(n_k); }
};

// The backward (attention_backward.cuh). Query-major dq: as the forward, one warp per 16 query rows,
// K/V tiles of 64 tokens at both head dims (dq, S and dP accumulators live at once), Q and dO resident.
template <int kHeadDim, int kBlockM>
struct AttentionBackwardShape {
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTileN = 64;
  static constexpr int kStages = 2;
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kRowElements = kBlockM * kHeadDim;
  static constexpr int kTileElements = kTileN * kHeadDim;
  // Q, dO, then K and V stages, then per stage and column: bias (float) and last covered key (int), then ids.
  static constexpr size_t kFixedBytes =
      2 * (2 * kRowElements + 2 * kStages * kTileElements) + kStages * kTileN * (sizeof(float) + sizeof(int));
  static size_t smem_bytes(int n_k) { return kFixedBytes + sizeof(uint16_t) * static_cast<size_t>(n_k); }
};

// Key-major dK / dV: one CTA per (batch, key head, key block) at one level, kRows pooled rows (the key
// block's block_n >> L tokens, at least 16: one warp per 16 rows) resident with their K and V, query
// rows streamed kQTile at a time.
template <int kHeadDim, int kRows>
struct KeyBackwardShape {
  static constexpr int kWarps = kRows / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kQTile = kHeadDim == 128 ? 32 : 64;  // dK, dV, S and dP accumulators live at once
  static constexpr int kChunks = kHeadDim / 8;
  // K and V rows, then the query tile's Q and dO, then per query column lse (log2) and delta, then per
  // key row bias and last covered key.
  static constexpr size_t kSmemBytes = 2 * (2 * kRows * kHeadDim + 2 * kQTile * kHeadDim) +
                                       2 * kQTile * sizeof(float) + kRows * (sizeof(float) + sizeof(int));
};

// The fused antidiagonal estimator: kRows anti-rows per CTA (whole query blocks: block_m / S must divide
// it), anti-columns streamed kTileN at a time, each tile the sum of S gathered [rows x D] x [D x kTileN]
// products through a two-stage ring.
template <int kHeadDim>
struct AntidiagonalShape {
  static constexpr int kWarps = 4;
  static constexpr int kRows = 16 * kWarps;  // anti-rows per CTA, 16 per warp
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTileN = 64;          // anti-columns per tile
  static constexpr int kGroups = kTileN / 8; // n8 column groups per tile: the table's unit
  static constexpr int kStages = 2;
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kMinBlocks = 3;  // 3 x 66 KiB of shared memory at head_dim 128
  static constexpr size_t kSmemBytes = 2 * kStages * (kRows + kTileN) * kHeadDim + 2 * sizeof(float) * kRows;
  static int ctas_per_head(int n_q, int rows_per_block) {
    return (n_q * rows_per_block + kRows - 1) / kRows;
  }
  // Scratch floats of one (batch, head): per CTA, a sum per (column group, anti-row) and a max per (tile,
  // anti-row).
  static int64_t table_floats_per_head(int n_q, int rows_per_block, int k_tiles) {
    const int64_t tiles = (k_tiles + kTileN - 1) / kTileN;
    return static_cast<int64_t>(ctas_per_head(n_q, rows_per_block)) * kRows * tiles * (kGroups + 1);
  }
};

template <int kHeadDim>
struct SampledShape {
  static constexpr int kWarps = 4;
  static constexpr int kMTiles = 2;                    // m16 row tiles per warp
  static constexpr int kRows = 16 * kMTiles * kWarps;  // sampled query rows per CTA (whole query blocks)
  static constexpr int kMinBlocks = 3;                 // CTAs per SM the registers are sized for
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTileN = 64;          // sampled keys per tile
  static constexpr int kStages = 2;
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr size_t kSmemBytes = 2 * (kRows + kStages * kTileN) * kHeadDim + sizeof(float) * kRows;
  // Scratch floats of one (batch, head): every CTA's [n_k][kRows] table of block maxima.
  static int64_t table_floats_per_head(int n_q, int q_samples, int n_k) {
    const int blocks_per_cta = kRows / q_samples;
    return static_cast<int64_t>((n_q + blocks_per_cta - 1) / blocks_per_cta) * kRows * n_k;
  }
};

// Largest n_k (key blocks per row) level assignment handles: threads x items of its biggest variant.
constexpr int kAssignMaxBlocks = 4096;

// The pooled estimator's key means (estimate_pooled.cuh). From k8: one (head, block, 8-column chunk) per
// thread. Pooled from k: one (block, group of 8 keys, chunk) per thread.
struct PooledKeyMeansShape {
  static constexpr int kLevel8Threads = 128;
  static constexpr int kLevel8MinCtasPerSm = 8;  // caps registers at 64
  static constexpr int kThreads = 256;
  // A memory-bound pass: enough CTAs resident to cover DRAM latency.
  static constexpr int kMinCtasPerSm = 4;
  static constexpr int key_blocks_per_cta(int head_dim, int block_n) {
    return block_n / 8 * (head_dim / 8) >= kThreads ? 1 : kThreads / (block_n / 8 * (head_dim / 8));
  }
};

// The pooled estimator's query means and logits (estimate_pooled.cuh): one m16 tile of query blocks per CTA
// against n8 tiles of key blocks, mma.sync in 3xTF32, the key means streamed through a ring of shared
// memory.
struct PooledScoresShape {
  static constexpr int kThreads = 128;
  static constexpr int kRowsPerCta = 16;   // query blocks: one m16 tile
  // 16-byte loads of q a lane issues before its first add: 8 or 16 KiB a warp in flight (64 or 128
  // registers, while the logits' registers are not yet live), so that one wave of CTAs (cogvideox's 432 at
  // four an SM, wan1.3b's 192) keeps DRAM busy.
  static constexpr int query_loads_in_flight(int head_dim) { return head_dim == 64 ? 16 : 32; }
  // n8 tiles of key blocks a warp takes per pass (64 keys a CTA). At head_dim 64 four tiles took more
  // registers and were slower on the H200 (the fifteenth session's kernel: 22.7 us against 16.5 on
  // cogvideox).
  static constexpr int kTilesPerWarp = 2;
  static constexpr int kKeysPerPass = kThreads / 32 * kTilesPerWarp * 8;
  // Passes of key means in flight. Three at head_dim 64 cover cogvideox's whole rows (139 key blocks) with
  // one wait, at 52 KiB a CTA: four CTAs an SM, so its 432 CTAs are one wave on an H100 / H200. Two at
  // 128 (72 KiB, under the 99 KiB an sm86 / sm89 block may take).
  static constexpr int stages(int head_dim) { return head_dim == 64 ? 3 : 2; }
  static constexpr int min_ctas_per_sm(int head_dim) { return head_dim == 64 ? 4 : 3; }
  // The query means' tile and the ring, fp32.
  static constexpr int shared_bytes(int head_dim) {
    return (kRowsPerCta + stages(head_dim) * kKeysPerPass) * head_dim * static_cast<int>(sizeof(float));
  }
};

}  // namespace psa::kernels
