// delta = rowsum(dO * O) - dlse per query row, in fp32: the term dS = P (dP - delta) subtracts in both
// backward kernels (attention_backward.cuh). One pass over dO and O in place of the ATen chain of
// float copies, a product, a sum and a subtraction (five launches and two fp32 copies of [B, H, L, D]).
//
// head_dim / 8 consecutive lanes own a row: each loads 16 bytes of dO and of O, and the group reduces
// with shuffles, so a warp reads 2 (head_dim 128) or 4 (64) whole rows per instruction.
#pragma once

#include "device_utils.cuh"
#include "params.h"

namespace psa::kernels {

constexpr int kDeltaThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDeltaThreads) attention_backward_delta_kernel(AttentionBackwardDeltaParams p) {
  const int lanes_per_row = p.head_dim / 8;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kDeltaThreads + threadIdx.x;
  const int64_t row = thread / lanes_per_row;
  const int lane_in_row = static_cast<int>(thread % lanes_per_row);
  // Rows past the end still take part in the shuffles below (whole groups share a warp).
  const bool valid = row < p.rows;
  float sum = 0.f;
  if (valid && p.grad_out != nullptr) {
    const int64_t offset = row * p.head_dim + lane_in_row * 8;
    const uint4 grad_bits = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.grad_out) + offset);
    const uint4 out_bits = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + offset);
    const T* grad = reinterpret_cast<const T*>(&grad_bits);
    const T* out = reinterpret_cast<const T*>(&out_bits);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum = fmaf(to_float(grad[i]), to_float(out[i]), sum);
  }
  for (int offset = lanes_per_row / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (valid && lane_in_row == 0) p.delta[row] = sum - (p.grad_lse != nullptr ? p.grad_lse[row] : 0.f);
}

template <typename T>
cudaError_t launch_attention_backward_delta(const AttentionBackwardDeltaParams& p, cudaStream_t stream) {
  const int64_t threads = p.rows * (p.head_dim / 8);
  const int64_t blocks = (threads + kDeltaThreads - 1) / kDeltaThreads;
  attention_backward_delta_kernel<T><<<static_cast<unsigned>(blocks), kDeltaThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
