// KV pyramid kernel: one pass over K and V writes all pooled levels.
//
// A thread owns one feature d of one aligned group of 8 tokens: it reads the 8 values once, forms the
// pair sums, then the sums of 4 and of 8 in fp32, and writes every level's means. Consecutive threads
// take consecutive features, so each warp reads and writes contiguous rows. The last group may be
// partial: sums cover real tokens only and are divided by how many there are.
#pragma once

#include <cstdint>

#include "device_utils.cuh"
#include "params.h"
#include "pyramid_group.cuh"

namespace psa::kernels {

constexpr int kPyramidThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kPyramidThreads) kv_pyramid_kernel(PyramidParams p) {
  const int64_t groups = (p.length + 7) / 8;
  const int64_t work = groups * p.head_dim;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kPyramidThreads + threadIdx.x;
  if (index >= work) return;
  const int bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int64_t group = index / p.head_dim;
  const int d = static_cast<int>(index % p.head_dim);
  const int64_t first = group * 8;
  const int real = p.length - first < 8 ? static_cast<int>(p.length - first) : 8;

#pragma unroll
  for (int tensor = 0; tensor < 2; ++tensor) {
    const T* src = static_cast<const T*>(tensor == 0 ? p.k : p.v);
    const int64_t* stride = tensor == 0 ? p.k_stride : p.v_stride;
    const T* row = src + b * stride[0] + h * stride[1] + first * stride[2] + d;
    float x[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) x[t] = t < real ? to_float(row[t * stride[2]]) : 0.f;
    const PyramidGroupSums sums = pyramid_group_sums(x);

    void* const* out = tensor == 0 ? p.k_out : p.v_out;
    const int64_t head_base = static_cast<int64_t>(bh);
    // Level l has ceil(L/l) tokens; this group holds tokens [first/l, first/l + 8/l) of it.
    const int64_t tokens2 = (p.length + 1) / 2, tokens4 = (p.length + 3) / 4, tokens8 = groups;
    T* out2 = static_cast<T*>(out[0]) + (head_base * tokens2 + first / 2) * p.head_dim + d;
    T* out4 = static_cast<T*>(out[1]) + (head_base * tokens4 + first / 4) * p.head_dim + d;
    T* out8 = static_cast<T*>(out[2]) + (head_base * tokens8 + group) * p.head_dim + d;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int count = min(2, real - 2 * t);
      if (count > 0) out2[t * p.head_dim] = from_float<T>(pooled_mean(sums.s2[t], count));
    }
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int count = min(4, real - 4 * t);
      if (count > 0) out4[t * p.head_dim] = from_float<T>(pooled_mean(sums.s4[t], count));
    }
    out8[0] = from_float<T>(pooled_mean(sums.s8, real));
  }
}

// The same pass with 16-byte accesses: a thread owns 8 consecutive features of one group of 8 tokens, so
// it reads 8 rows of 16 bytes (k's and v's, 16 loads issued before the first add) and writes each pooled
// token's 8 features as one 16-byte store. Each feature's sums and means are the scalar kernel's, bit for
// bit. For rows whose features are 16-byte aligned (launch_kv_pyramid checks): the scalar kernel moves 2
// bytes an access, and its instruction count, not DRAM, bounded it (H200: ~2.6 TB/s of reads and writes).
template <typename T>
__global__ void __launch_bounds__(kPyramidThreads) kv_pyramid_vector_kernel(PyramidParams p) {
  constexpr int kFeatures = 16 / sizeof(T);  // features a thread owns: one 16-byte access
  const int chunks = p.head_dim / kFeatures;
  const int64_t groups = (p.length + 7) / 8;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kPyramidThreads + threadIdx.x;
  if (index >= groups * chunks) return;
  const int bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int64_t group = index / chunks;
  const int d = static_cast<int>(index % chunks) * kFeatures;
  const int64_t first = group * 8;
  const int real = p.length - first < 8 ? static_cast<int>(p.length - first) : 8;

  uint4 raw[2][8];
#pragma unroll
  for (int tensor = 0; tensor < 2; ++tensor) {
    const T* src = static_cast<const T*>(tensor == 0 ? p.k : p.v);
    const int64_t* stride = tensor == 0 ? p.k_stride : p.v_stride;
    const T* row = src + b * stride[0] + h * stride[1] + first * stride[2] + d;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      raw[tensor][t] = t < real ? load_global_256b_prefetch(row + t * stride[2]) : make_uint4(0, 0, 0, 0);
    }
  }
  const int64_t tokens2 = (p.length + 1) / 2, tokens4 = (p.length + 3) / 4, tokens8 = groups;
#pragma unroll
  for (int tensor = 0; tensor < 2; ++tensor) {
    PyramidGroupSums sums[kFeatures];
#pragma unroll
    for (int e = 0; e < kFeatures; ++e) {
      float x[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) x[t] = to_float(reinterpret_cast<const T*>(&raw[tensor][t])[e]);
      sums[e] = pyramid_group_sums(x);
    }
    // One pooled token's kFeatures means, rounded to T, as one 16-byte store.
    const auto store = [&](void* level, int64_t tokens, int64_t token, auto sum_of, int count) {
      uint4 packed;
      T* values = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int e = 0; e < kFeatures; ++e) values[e] = from_float<T>(pooled_mean(sum_of(sums[e]), count));
      *reinterpret_cast<uint4*>(static_cast<T*>(level) + (static_cast<int64_t>(bh) * tokens + token) * p.head_dim + d) =
          packed;
    };
    void* const* out = tensor == 0 ? p.k_out : p.v_out;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int count = min(2, real - 2 * t);
      if (count > 0) store(out[0], tokens2, first / 2 + t, [t](const PyramidGroupSums& s) { return s.s2[t]; }, count);
    }
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int count = min(4, real - 4 * t);
      if (count > 0) store(out[1], tokens4, first / 4 + t, [t](const PyramidGroupSums& s) { return s.s4[t]; }, count);
    }
    store(out[2], tokens8, group, [](const PyramidGroupSums& s) { return s.s8; }, real);
  }
}

// Whether every row of k and v starts on 16 bytes and head_dim fills whole 16-byte accesses (the vector
// kernel's condition; the outputs are fresh contiguous tensors, aligned by the allocator).
template <typename T>
bool kv_pyramid_rows_16b_aligned(const PyramidParams& p) {
  constexpr int kFeatures = 16 / sizeof(T);
  bool aligned = p.head_dim % kFeatures == 0 && reinterpret_cast<uintptr_t>(p.k) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(p.v) % 16 == 0;
  for (int i = 0; i < 3; ++i) aligned = aligned && p.k_stride[i] % kFeatures == 0 && p.v_stride[i] % kFeatures == 0;
  return aligned;
}

template <typename T>
cudaError_t launch_kv_pyramid(const PyramidParams& p, cudaStream_t stream) {
  const int64_t groups = (p.length + 7) / 8;
  if (kv_pyramid_rows_16b_aligned<T>(p)) {
    const int64_t work = groups * (p.head_dim / (16 / static_cast<int>(sizeof(T))));
    const dim3 grid(static_cast<unsigned>((work + kPyramidThreads - 1) / kPyramidThreads),
                    static_cast<unsigned>(p.batch * p.heads));
    kv_pyramid_vector_kernel<T><<<grid, kPyramidThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const int64_t work = groups * static_cast<int64_t>(p.head_dim);
  const dim3 grid(static_cast<unsigned>((work + kPyramidThreads - 1) / kPyramidThreads),
                  static_cast<unsigned>(p.batch * p.heads));
  kv_pyramid_kernel<T><<<grid, kPyramidThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
