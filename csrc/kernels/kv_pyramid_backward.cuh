// The backward of kv_pyramid (docs/spec.md, "Backward"): token t of k gets, from every pooled level l,
// the gradient of pooled token t / l divided by the number of real tokens that pooled token averages.
//
// The mirror of kv_pyramid_kernel: a thread owns one feature d of one aligned group of 8 tokens, reads
// the group's 4 + 2 + 1 pooled gradients once, sums in fp32 and writes its 8 tokens. Consecutive threads
// take consecutive features, so each warp reads and writes contiguous rows. The level-1 gradient is not
// an input: autograd adds attention_over_pyramid's dk to this op's.
#pragma once

#include "device_utils.cuh"
#include "params.h"

namespace psa::kernels {

constexpr int kPyramidBackwardThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kPyramidBackwardThreads) kv_pyramid_backward_kernel(PyramidBackwardParams p) {
  const int64_t groups = (p.length + 7) / 8;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kPyramidBackwardThreads + threadIdx.x;
  if (index >= groups * p.head_dim) return;
  const int64_t bh = blockIdx.y;
  const int64_t group = index / p.head_dim;
  const int d = static_cast<int>(index % p.head_dim);
  const int64_t first = group * 8;
  const int real = p.length - first < 8 ? static_cast<int>(p.length - first) : 8;
  const int64_t tokens2 = (p.length + 1) / 2, tokens4 = (p.length + 3) / 4;
  const void* const* grads = blockIdx.z == 0 ? p.d_keys : p.d_values;
  const T* g2 = static_cast<const T*>(grads[0]) + (bh * tokens2 + first / 2) * p.head_dim + d;
  const T* g4 = static_cast<const T*>(grads[1]) + (bh * tokens4 + first / 4) * p.head_dim + d;
  const T* g8 = static_cast<const T*>(grads[2]) + (bh * groups + group) * p.head_dim + d;

  // Per pooled token: its gradient over its count (the last group of a level may be partial).
  float per_token2[4], per_token4[2];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int count = min(2, real - 2 * t);
    per_token2[t] = count > 0 ? to_float(g2[t * p.head_dim]) / count : 0.f;
  }
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    const int count = min(4, real - 4 * t);
    per_token4[t] = count > 0 ? to_float(g4[t * p.head_dim]) / count : 0.f;
  }
  const float per_token8 = to_float(g8[0]) / real;

  T* out = static_cast<T*>(blockIdx.z == 0 ? p.dk : p.dv) + (bh * p.length + first) * p.head_dim + d;
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    if (t < real) out[t * p.head_dim] = from_float<T>(per_token2[t / 2] + per_token4[t / 4] + per_token8);
  }
}

template <typename T>
cudaError_t launch_kv_pyramid_backward(const PyramidBackwardParams& p, cudaStream_t stream) {
  const int64_t work = (p.length + 7) / 8 * static_cast<int64_t>(p.head_dim);
  // z: 0 writes dk, 1 writes dv.
  const dim3 grid(static_cast<unsigned>((work + kPyramidBackwardThreads - 1) / kPyramidBackwardThreads),
                  static_cast<unsigned>(p.batch * p.heads), 2);
  kv_pyramid_backward_kernel<T><<<grid, kPyramidBackwardThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
