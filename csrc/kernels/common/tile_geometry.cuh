// The geometry of one tile of a level-map row (docs/spec.md section 3): which level it belongs to and, for
// each of its kTileN columns, which pooled token of which key block it holds, that token's logit bias
// log2(count) and the last original key it covers (for the causal mask).
//
// A row's schedule (level_schedule.cuh) lists the key blocks of each level in ascending order, and
// each level's blocks, pooled, are concatenated and cut into tiles of kTileN tokens (the level's
// "run" of columns). Tokens grow along the run, and only the sequence's last key block can be
// partial, so along a level's run:
//   - columns [0, full_columns) hold tokens covering exactly 1 << L keys: bias L (log2 of 1 << L);
//   - at most one column follows whose token covers fewer keys (the sequence's last token, when
//     k_len is not a multiple of 1 << L): bias log2(count);
//   - every column from valid_columns on is empty (past the run or past the sequence): bias -inf.
//   A tile is full when all its columns lie below full_columns. These three numbers come from one
//   read of the schedule per level, so a column's bias is two compares, not a schedule lookup;
//   - the tile's last covered key is its last column's.
// Producer (TMA rows) and consumers (bias, mask) compute these from the schedule, which is written
// before the kernel's first barrier: no per-tile shared-memory hand-off.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

namespace psa::kernels {

template <int kTileN>
struct TileGeometry {
  int level;                  // L: pooling factor 1 << L
  int tile;                   // tile index within the level's run
  int per_block, shift;       // pooled tokens per key block at this level, log2 of it
  int count, start;           // the level's key blocks: ids[start .. start + count)
  int tokens;                 // pooled tokens of the whole key sequence at this level
  int k_len;
  int tiles_in_level;         // level_tiles of this level
  int full_columns;           // run columns [0, full_columns) cover 1 << L keys each
  int valid_columns;          // run columns [0, valid_columns) hold a token of the sequence
  float partial_bias;         // bias of column full_columns when it is valid (a partial token)
  bool full;                  // every column of this tile below full_columns

  // Tiles of each level (scalars: a run-time indexed local array would go to local memory).
  __device__ static int level_tiles(const int* level_count, int block_n, int L) {
    return (level_count[L] * (block_n >> L) + kTileN - 1) / kTileN;
  }

  // Tiles of the whole row: every level's, in schedule order.
  __device__ static int row_tiles(const int* level_count, int block_n) {
    return level_tiles(level_count, block_n, 0) + level_tiles(level_count, block_n, 1) +
           level_tiles(level_count, block_n, 2) + level_tiles(level_count, block_n, 3);
  }

  // The tile `index` of the row (0 <= index < the sum of level_tiles over the levels); `ids` is the
  // schedule (one read of it decides whether the tile is full).
  __device__ static TileGeometry locate(int index, const int* level_count, const int* level_start, int block_n,
                                        int k_len, const uint16_t* ids) {
    const int tiles0 = level_tiles(level_count, block_n, 0), tiles1 = level_tiles(level_count, block_n, 1);
    const int tiles2 = level_tiles(level_count, block_n, 2);
    int L = 0, tile = index;
    if (tile >= tiles0) { tile -= tiles0; L = 1;
      if (tile >= tiles1) { tile -= tiles1; L = 2;
        if (tile >= tiles2) { tile -= tiles2; L = 3; } } }
    TileGeometry g;
    g.enter_level(L, level_count, level_start, block_n, k_len, ids);
    g.tile = tile;
    g.update_full();
    return g;
  }

  // The next tile in schedule order, for a caller walking the row's tiles one by one: the level's
  // fields change only at a level boundary, so a step costs a compare instead of locate's per-level
  // tile counts. Call only while a next tile exists.
  __device__ void advance(const int* level_count, const int* level_start, int block_n, const uint16_t* ids) {
    if (++tile == tiles_in_level) {
      int L = level;
      do { ++L; } while (level_tiles(level_count, block_n, L) == 0);
      enter_level(L, level_count, level_start, block_n, k_len, ids);
      tile = 0;
    }
    update_full();
  }

  __device__ void enter_level(int L, const int* level_count, const int* level_start, int block_n, int keys,
                              const uint16_t* ids) {
    level = L;
    per_block = block_n >> L;
    shift = __ffs(per_block) - 1;
    count = level_count[L];
    start = level_start[L];
    tokens = (keys + (1 << L) - 1) >> L;
    k_len = keys;
    tiles_in_level = (count * per_block + kTileN - 1) / kTileN;
    // The run's last block is the only one that can reach the end of the sequence.
    const int run_columns = count * per_block;
    const int last_first_token = count > 0 ? ids[start + count - 1] * per_block : 0;
    const int covered_tokens = keys >> L;  // tokens covering 1 << L keys
    valid_columns = run_columns - per_block + min(per_block, tokens - last_first_token);
    full_columns = run_columns - per_block + min(per_block, covered_tokens - last_first_token);
    partial_bias = __log2f(static_cast<float>(keys - (covered_tokens << L)));
  }
  __device__ void update_full() { full = (tile + 1) * kTileN <= full_columns; }

  // Pooled token at column `col` (0 <= col < kTileN), or a value >= tokens for an empty slot.
  __device__ int token(int col, const uint16_t* ids) const {
    const int slot_token = tile * kTileN + col;
    const int slot = slot_token >> shift;
    return slot < count ? ids[start + slot] * per_block + (slot_token & (per_block - 1)) : tokens;
  }
  // Logit bias (log2 domain) of column `col`: log2 of the keys its token covers, -inf for none.
  __device__ float bias(int col) const {
    const int column = tile * kTileN + col;
    return column < full_columns ? static_cast<float>(level) : column < valid_columns ? partial_bias : -INFINITY;
  }
  // Last original key covered by column `col` (INT_MAX for an empty slot: never visible).
  __device__ int last_key(int col, const uint16_t* ids) const {
    const int t = token(col, ids);
    return t < tokens ? min((t + 1) << level, k_len) - 1 : INT_MAX;
  }
  // Last original key any column of the tile covers.
  __device__ int tile_last_key(const uint16_t* ids) const {
    const int last_column = min(kTileN, count * per_block - tile * kTileN) - 1;
    const int t = min(token(last_column, ids), tokens - 1);
    return min((t + 1) << level, k_len) - 1;
  }
};

}  // namespace psa::kernels
