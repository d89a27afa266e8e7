// The online softmax (docs/spec.md section 3) of the two query rows one thread holds in an m16n8
// accumulator (rows g and g + 8 of a warp's 16-row slice, g = lane / 4; the four lanes of a quad share
// a row), in the exp2 domain, and the epilogue that normalises the output and writes it with the lse.
// Both attention kernels (sm80 mma.sync, sm90 wgmma) keep their accumulators in this layout: value
// (row r, column 8j + 2t + c) at index 4j + 2r + c of a flat array, t = lane % 4.
#pragma once

#include <cmath>
#include <cstdint>

#include "../device_utils.cuh"

namespace psa::kernels {

struct OnlineSoftmaxRows {
  float max[2] = {-INFINITY, -INFINITY};  // running row maxima (log2 domain), this quad's
  float sum[2] = {0.f, 0.f};              // running sums of exp2(logit - max), this thread's columns

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      max[r] = -INFINITY;
      sum[r] = 0.f;
    }
  }

  // A tile's maxima of this thread's columns (`tile_max`) join the row maxima. Returns what each row
  // subtracts before exp2 (`base`) and how much the old sum and output shrink (`scale_old`). A row that
  // has seen only -inf keeps max -inf and subtracts 0, so exp2 gives 0, not NaN.
  __device__ __forceinline__ void update_max(const float (&tile_max)[2], float (&base)[2], float (&scale_old)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(max[r], quad_max(tile_max[r]));
      base[r] = new_max == -INFINITY ? 0.f : new_max;
      scale_old[r] = exp2f(max[r] - base[r]);
      max[r] = new_max;
    }
  }

  __device__ __forceinline__ void add_sum(const float (&tile_sum)[2], const float (&scale_old)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) sum[r] = sum[r] * scale_old[r] + tile_sum[r];
  }

  // O / rowsum as T into `out` (the (batch, head)'s [q_len, kHeadDim] rows) and the natural-log lse into
  // `lse` ([q_len]). Rows past q_len are skipped; rows that saw no key write zeros and lse = -inf.
  template <typename T, int kHeadDim>
  __device__ __forceinline__ void write(const float (&o)[kHeadDim / 2], T* out, float* lse, const int (&rows)[2],
                                        int q_len, int t) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = quad_sum(sum[r]);
      if (rows[r] >= q_len) continue;
      const float inverse = total > 0.f ? 1.f / total : 0.f;
      T* out_row = out + static_cast<int64_t>(rows[r]) * kHeadDim;
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        *reinterpret_cast<uint32_t*>(out_row + 8 * j + 2 * t) =
            pack2<T>(o[4 * j + 2 * r] * inverse, o[4 * j + 2 * r + 1] * inverse);
      }
      if (t == 0) lse[rows[r]] = total > 0.f ? (max[r] + __log2f(total)) * 0.69314718055994531f : -INFINITY;
    }
  }
};

}  // namespace psa::kernels
