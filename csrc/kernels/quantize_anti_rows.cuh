// FP8 scoring's quantization (docs/spec.md section 4) for the Hopper antidiagonal kernel: a group of S
// tokens, its scale fp32(max |x| / 448) and its S * D values x / scale rounded to e4m3, written as one
// row of bytes. Queries' groups are written with their tokens reversed, so that row i holds
// q[S i + S-1-t] at t * D: the anti-logits are then one plain GEMM of anti-rows by anti-columns (keys'
// rows hold k[S j + t] at t * D, their natural order), with K-major operands as FP8 wgmma needs, and no
// per-member TMA descriptors. A memory-bound pass: one warp per group, its loads issued before the
// first conversion.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

#include "device_utils.cuh"
#include "params.h"

namespace psa::kernels {

constexpr float kE4m3Max = 448.f;
constexpr int kMaxQuantizeChunksPerLane = 4;  // a group is at most 8 tokens of 128: 128 chunks of 8 values

template <typename T>
__global__ void __launch_bounds__(256) quantize_anti_rows_kernel(const QuantizeAntiRowsParams p) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (warp >= static_cast<int64_t>(p.batch) * p.heads * p.scale_stride) return;
  const int group = static_cast<int>(warp % p.scale_stride), bh = static_cast<int>(warp / p.scale_stride);
  const int groups = (p.length + p.stride - 1) / p.stride;
  if (group >= groups) {  // padding of the scale rows: the kernel multiplies masked columns by it
    if (lane == 0) p.scales[static_cast<int64_t>(bh) * p.scale_stride + group] = 1.f;
    return;
  }
  const int b = bh / p.heads, h = bh % p.heads;
  const int chunks_per_token = p.head_dim / 8, chunks = p.stride * chunks_per_token;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride[0] + h * p.x_stride[1];
  uint4 raw[kMaxQuantizeChunksPerLane];
  float peak = 0.f;
#pragma unroll
  for (int u = 0; u < kMaxQuantizeChunksPerLane; ++u) {
    const int chunk = lane + 32 * u;
    const int token = group * p.stride + chunk / chunks_per_token;
    raw[u] = chunk < chunks && token < p.length
                 ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(token) * p.x_stride[2] +
                                                        (chunk % chunks_per_token) * 8))
                 : make_uint4(0, 0, 0, 0);  // the partial last group's padding: zeros
  }
#pragma unroll
  for (int u = 0; u < kMaxQuantizeChunksPerLane; ++u) {
#pragma unroll
    for (int e = 0; e < 8; ++e) peak = max_nan(peak, fabsf(to_float(reinterpret_cast<const T*>(&raw[u])[e])));
  }
  peak = warp_max(peak);  // NaN, or inf, makes the scale non-finite: the group's values become NaN or 0
  // IEEE quotients (fast math would approximate them): the reference divides exactly.
  const float scale = peak == 0.f ? 1.f : __fdiv_rn(peak, kE4m3Max);
  uint8_t* out = p.out + (static_cast<int64_t>(bh) * groups + group) * chunks * 8;
#pragma unroll
  for (int u = 0; u < kMaxQuantizeChunksPerLane; ++u) {
    const int chunk = lane + 32 * u;
    if (chunk >= chunks) break;
    const int member = chunk / chunks_per_token;
    const int slot = p.reverse_tokens ? p.stride - 1 - member : member;
    uint32_t packed[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const T* values = reinterpret_cast<const T*>(&raw[u]) + 4 * half;
      const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(
          make_float2(__fdiv_rn(to_float(values[0]), scale), __fdiv_rn(to_float(values[1]), scale)), __NV_SATFINITE,
          __NV_E4M3);
      const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
          make_float2(__fdiv_rn(to_float(values[2]), scale), __fdiv_rn(to_float(values[3]), scale)), __NV_SATFINITE,
          __NV_E4M3);
      packed[half] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    *reinterpret_cast<uint2*>(out + slot * p.head_dim + (chunk % chunks_per_token) * 8) =
        make_uint2(packed[0], packed[1]);
  }
  if (lane == 0) p.scales[static_cast<int64_t>(bh) * p.scale_stride + group] = scale;
}

template <typename T>
cudaError_t launch_quantize_anti_rows(const QuantizeAntiRowsParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  // A warp holds one group in registers: at most 32 x kMaxQuantizeChunksPerLane chunks of 8 values.
  if (p.stride * p.head_dim > 32 * kMaxQuantizeChunksPerLane * 8 || p.head_dim % 8 != 0) return cudaErrorInvalidValue;
  const int64_t warps = static_cast<int64_t>(p.batch) * p.heads * p.scale_stride;
  const dim3 grid(static_cast<unsigned>((warps * 32 + kThreads - 1) / kThreads));
  quantize_anti_rows_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace psa::kernels
