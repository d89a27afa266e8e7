// Tile shapes and shared-memory footprint of the Hopper attention kernel, visible to host code (no
// device code here) so that dispatch can check limits before choosing it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace psa::kernels::sm90 {

constexpr int kPanelColumns = 64;        // 16-bit elements per 128-byte swizzled row
constexpr int kPanelRowBytes = 128;
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows x 128 bytes: the swizzle pattern's period

template <int kHeadDim, int kBlockM>
struct AttentionSm90Shape {
  static constexpr size_t kElementBytes = 2;                   // bf16 / fp16
  static constexpr int kConsumers = kBlockM / 64;              // consumer warpgroups, 64 rows each
  static constexpr int kThreads = 128 * (kConsumers + 1);       // + the producer warpgroup
  static constexpr int kTileN = kBlockM == 128 ? 128 : 64;      // keys per tile (the S tile's N)
  static constexpr int kStages = 2;
  static constexpr int kPanels = kHeadDim / kPanelColumns;
  static constexpr int kMinBlocks = kBlockM == 128 ? 1 : 2;     // CTAs per SM
  // setmaxnreg budgets: the producer gives registers back, the consumers take them. A CTA starts with
  // kThreads x the launch-bounds cap (65536 / (kThreads * kMinBlocks), rounded down to 8) and
  // setmaxnreg.inc waits until the CTA's pool has the registers, so the budgets must fit that pool
  // exactly, not the SM's 64K: 24 + 2 x 240 = 3 x 168 (a producer at 32 deadlocks the consumers).
  static constexpr int kProducerRegisters = kBlockM == 128 ? 24 : 40;
  static constexpr int kConsumerRegisters = kBlockM == 128 ? 240 : 216;
  static constexpr int kEntryRegisters = (65536 / (kThreads * kMinBlocks)) / 8 * 8;
  static_assert(kProducerRegisters + kConsumers * kConsumerRegisters <= (kConsumers + 1) * kEntryRegisters,
                "setmaxnreg budgets exceed the CTA's register pool");
  static constexpr size_t kQBytes = kElementBytes * kBlockM * kHeadDim;
  static constexpr size_t kTileBytes = kElementBytes * kTileN * kHeadDim;  // one K or V stage
  // Q, K stages, V stages (each 1024-byte aligned for the swizzle), then per stage and column: bias
  // and last covered key; per stage the tile's last key; mbarriers; then the schedule ids.
  static constexpr size_t kBiasOffset = kQBytes + 2 * kStages * kTileBytes;
  static constexpr size_t kBarrierOffset = kBiasOffset + kStages * kTileN * (sizeof(float) + sizeof(int)) + kStages * sizeof(int);
  static constexpr size_t kIdsOffset = kBarrierOffset + (1 + 2 * kStages) * sizeof(uint64_t);
  static constexpr size_t kAlignSlack = 1024;  // dynamic shared memory is only 16-byte aligned
  static size_t smem_bytes(int n_k) { return kIdsOffset + sizeof(uint16_t) * static_cast<size_t>(n_k) + kAlignSlack; }
};

}  // namespace psa::kernels::sm90
