// The schedule of one level-map row, built on the device by one warp: the key block ids of each
// level, grouped by level in shared memory (level 1 first), with per-level counts and start offsets.
// Both attention kernels walk this schedule; nothing returns to the host.
#pragma once

#include <cstdint>

#include "params.h"

namespace psa::kernels {

// Called by all 32 lanes of one warp. A value outside {0, 1, 2, 4, 8} stops the kernel (`__trap`: the
// CUDA error "unspecified launch failure"): the host cannot check a device level map without a
// synchronisation, and skipping such values would return a plausible wrong answer. (An assert with a
// message costs a call the small-register producer warps would spill for.)
__device__ __forceinline__ void build_level_schedule(const int8_t* row_levels, int n_k, int lane, uint16_t* ids,
                                                     int* level_count, int* level_start) {
  int count[kNumLevels] = {0, 0, 0, 0};
  bool invalid = false;
  for (int base = 0; base < n_k; base += 32) {
    const int8_t level = base + lane < n_k ? row_levels[base + lane] : 0;
    invalid |= !(level == 0 || level == 1 || level == 2 || level == 4 || level == 8);
#pragma unroll
    for (int L = 0; L < kNumLevels; ++L) count[L] += __popc(__ballot_sync(0xffffffffu, level == (1 << L)));
  }
  if (invalid) __trap();
  int position[kNumLevels];
  position[0] = 0;
#pragma unroll
  for (int L = 1; L < kNumLevels; ++L) position[L] = position[L - 1] + count[L - 1];
  // Constant indices only: count[lane] would move the arrays to local memory.
#pragma unroll
  for (int L = 0; L < kNumLevels; ++L) {
    if (lane == L) {
      level_count[L] = count[L];
      level_start[L] = position[L];
    }
  }
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int base = 0; base < n_k; base += 32) {
    const int8_t level = base + lane < n_k ? row_levels[base + lane] : 0;
#pragma unroll
    for (int L = 0; L < kNumLevels; ++L) {
      const unsigned hits = __ballot_sync(0xffffffffu, level == (1 << L));
      if (level == (1 << L)) ids[position[L] + __popc(hits & lanes_below)] = static_cast<uint16_t>(base + lane);
      position[L] += __popc(hits);
    }
  }
}

}  // namespace psa::kernels
