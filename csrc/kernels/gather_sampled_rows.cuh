// Copies sampled rows of the "sampled" estimator (docs/spec.md section 4) into compact tensors: row
// `row` of the output is compact row `first + row`, and compact row `block * samples + s` is input row
// `min(block * block_size + offsets[s], length - 1)`, so the last, partial block repeats its last real
// row as the reference does. The Hopper estimator loads every tile as one TMA box, from this copy or,
// for the compact rows before `first` (default offsets), from the input in place (params.h). Memory-bound.
#pragma once

#include <cstdint>

#include "device_utils.cuh"
#include "estimate_sampled_common.cuh"
#include "params.h"

namespace psa::kernels {

// One thread per 16-byte chunk of an output row; blockIdx.x is the (batch, head) pair (grid.x has
// room for any batch x heads, grid.y for 16M rows).
template <typename T, int kHeadDim>
__global__ void gather_sampled_rows_kernel(const T* __restrict__ src, int64_t batch_stride, int64_t head_stride,
                                           int64_t token_stride, int heads, int length, int block_size,
                                           const int64_t* __restrict__ offsets, int default_step, int samples,
                                           int first, int rows, T* __restrict__ dst) {
  constexpr int chunks = kHeadDim / 8;
  const int index = blockIdx.y * blockDim.x + threadIdx.x;
  if (index >= rows * chunks) return;
  const int row = index / chunks, chunk = index % chunks, compact_row = first + row;
  const int bh = blockIdx.x, b = bh / heads, h = bh % heads;
  const int64_t position = min(static_cast<int64_t>(compact_row / samples) * block_size +
                                   sample_offset(offsets, compact_row % samples, block_size, default_step),
                               static_cast<int64_t>(length) - 1);
  const uint4* from = reinterpret_cast<const uint4*>(src + b * batch_stride + h * head_stride +
                                                     position * token_stride) + chunk;
  uint4* to = reinterpret_cast<uint4*>(dst + (static_cast<int64_t>(bh) * rows + row) * kHeadDim) + chunk;
  *to = __ldg(from);
}

// Fills p.q_rows and p.k_rows, the compact rows from p.q_rows_begin / p.k_rows_begin on (all heads,
// independent of the launch's head chunk); a side with nothing to copy launches nothing.
template <typename T, int kHeadDim>
cudaError_t launch_gather_sampled_rows(const SampledParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const auto gather = [&](const void* src, const int64_t (&stride)[3], int heads, int length, int block_size,
                          const int64_t* offsets, int samples, int blocks, int first, void* dst) {
    const int rows = blocks * samples - first;
    if (rows <= 0) return cudaSuccess;
    const dim3 grid(static_cast<unsigned>(p.batch * heads),
                    static_cast<unsigned>((static_cast<int64_t>(rows) * (kHeadDim / 8) + kThreads - 1) / kThreads));
    gather_sampled_rows_kernel<T, kHeadDim><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(src), stride[0], stride[1], stride[2], heads, length, block_size, offsets,
        p.default_step, samples, first, rows, static_cast<T*>(dst));
    return cudaGetLastError();
  };
  cudaError_t status = gather(p.q, p.q_stride, p.q_heads, p.q_len, p.block_m, p.q_offsets, p.q_samples, p.n_q,
                              p.q_rows_begin, p.q_rows);
  if (status != cudaSuccess) return status;
  return gather(p.k, p.k_stride, p.kv_heads, p.k_len, p.block_n, p.k_offsets, p.k_samples, p.n_k, p.k_rows_begin,
                p.k_rows);
}

}  // namespace psa::kernels
