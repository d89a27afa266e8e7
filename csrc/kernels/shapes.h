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
  static constexpr int kTileN = 64;
  static constexpr int kStages = 2;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kQElements = kBlockM * kHeadDim;
  static constexpr int kTileElements = kTileN * kHeadDim;
  // Q, K and V stages, then per stage and column: bias (float) and last covered key (int), then ids.
  static constexpr size_t kFixedBytes =
      2 * (kQElements + 2 * kStages * kTileElements) + kStages * kTileN * (sizeof(float) + sizeof(int));
  static size_t smem_bytes(int n_k) { return kFixedBytes + sizeof(uint16_t) * static_cast<size_t>(n_k); }
};

template <int kHeadDim, int kWarps>
struct SampledShape {
  static constexpr int kRows = 16 * kWarps;  // sampled query rows per CTA
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTileN = 64;          // sampled keys per tile
  static constexpr int kStages = 2;
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr size_t kFixedBytes =
      2 * (kRows + kStages * kTileN) * kHeadDim + sizeof(float) * kRows;
  static size_t smem_bytes(int n_k) { return kFixedBytes + sizeof(float) * kRows * static_cast<size_t>(n_k); }
};

// Largest n_k (key blocks per row) level assignment handles: threads x items of its biggest variant.
constexpr int kAssignMaxBlocks = 4096;

}  // namespace psa::kernels
