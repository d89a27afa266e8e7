// One aligned group of 8 tokens of the KV pyramid (docs/spec.md section 2), for one feature: its sums at
// levels 2, 4 and 8, pairwise in fp32, and a pooled token's mean. kv_pyramid's kernel and the pooled
// estimator's key means (estimate_pooled.cuh) both take them from here, so every level-8 key the
// estimator derives from k is the value kv_pyramid stores, bit for bit, whether it reads k8 or pools k
// itself. (The CPU backend adds in the same pairs, aten/pyramid.cpp, but divides a partial group's sum
// exactly where --use_fast_math divides approximately: they may differ in the last fp32 bit there.)
#pragma once

namespace psa::kernels {

struct PyramidGroupSums {
  float s2[4], s4[2], s8;
};

// x: the group's 8 values, zeros past the sequence's end.
__device__ __forceinline__ PyramidGroupSums pyramid_group_sums(const float (&x)[8]) {
  PyramidGroupSums sums;
#pragma unroll
  for (int t = 0; t < 4; ++t) sums.s2[t] = x[2 * t] + x[2 * t + 1];
  sums.s4[0] = sums.s2[0] + sums.s2[1];
  sums.s4[1] = sums.s2[2] + sums.s2[3];
  sums.s8 = sums.s4[0] + sums.s4[1];
  return sums;
}

// A pooled token's value before rounding: its sum over the `count` real tokens it covers, divided by them.
__device__ __forceinline__ float pooled_mean(float sum, int count) { return sum / static_cast<float>(count); }

}  // namespace psa::kernels
