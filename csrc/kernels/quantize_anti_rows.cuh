// FP8 scoring's quantization (docs/spec.md section 4) for the Hopper antidiagonal kernel: a group of S
// tokens, its scale fp32(max |x| / 448) and its S * D values x * fp32(448 / max |x|) rounded to e4m3,
// written as one row of bytes. Queries' groups are written with their tokens reversed, so that row i
// holds q[S i + S-1-t] at t * D: the anti-logits are then one plain GEMM of anti-rows by anti-columns
// (keys' rows hold k[S j + t] at t * D, their natural order), with K-major operands as FP8 wgmma needs,
// and no per-member TMA descriptors.
//
// A memory-bound pass over Q and K in one launch (blockIdx.y picks the operand). A team of lanes (a
// power of two, so that its max is a shuffle butterfly within the warp) holds one group in registers,
// at most eight 16-byte chunks a lane, all loaded before the first conversion: a group of 8 tokens of 64
// is a team of 8, of 128 a team of 16. Per value: one multiplication and half a conversion instruction.
// Eight chunks a lane rather than four (80 registers, 3 CTAs an SM: 96 KiB in flight, not 64) took it
// from 3.3 to 3.6 TB/s on the H200 (cogvideox 98 -> 91 us).
#pragma once

#include <cuda_fp8.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "device_utils.cuh"
#include "params.h"

namespace psa::kernels {

constexpr float kE4m3Max = 448.f;
constexpr int kQuantizeChunksPerLane = 8;  // 16-byte chunks: a team of 16 holds 8 tokens of 128 values
constexpr int kQuantizeThreads = 256;

// The team that holds a group of `chunks` 16-byte chunks: the smallest power of two of lanes holding at
// most kQuantizeChunksPerLane chunks each (0 if the group needs more than a warp).
__host__ __device__ constexpr int quantize_team_lanes(int chunks) {
  int lanes = 1;
  while (lanes * kQuantizeChunksPerLane < chunks) lanes *= 2;
  return lanes <= 32 ? lanes : 0;
}

template <typename T, int kTeam>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_anti_rows_kernel(const QuantizeAntiRowsParams p) {
  const QuantizeAntiRowsOperand& op = p.operands[blockIdx.y];
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kQuantizeThreads + threadIdx.x;
  const int64_t team = thread / kTeam, teams = static_cast<int64_t>(p.batch) * op.heads * op.scale_stride;
  const int member = threadIdx.x % kTeam;
  // Whole warps leave together: the shuffles below need every lane of a warp with a team to do.
  if ((thread & ~int64_t{31}) / kTeam >= teams) return;
  const bool active = team < teams;
  const int group = static_cast<int>(team % op.scale_stride), bh = static_cast<int>(team / op.scale_stride);
  const int groups = (op.length + p.stride - 1) / p.stride;
  // Chunks of a token: a power of two (the launcher checks), so a chunk's token and place in it are a
  // shift and a mask, not a division (ncu, H200: the divisions made IMAD a third of the instructions, and
  // the kernel was 73% issue-bound).
  const int chunks_per_token = p.head_dim / 8, chunks = p.stride * chunks_per_token;
  const int token_shift = __ffs(chunks_per_token) - 1, within_token = chunks_per_token - 1;
  const bool real = active && group < groups;  // else the padding of the scale rows, or past the last
  const int b = bh / op.heads, h = bh % op.heads;
  const T* x = static_cast<const T*>(op.x) + b * op.x_stride[0] + h * op.x_stride[1];
  uint4 raw[kQuantizeChunksPerLane];
#pragma unroll
  for (int u = 0; u < kQuantizeChunksPerLane; ++u) {
    const int chunk = member + kTeam * u;
    const int token = group * p.stride + (chunk >> token_shift);
    raw[u] = real && chunk < chunks && token < op.length
                 ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(token) * op.x_stride[2] +
                                                        (chunk & within_token) * 8))
                 : make_uint4(0, 0, 0, 0);  // the partial last group's padding: zeros
  }
  // max |x| on packed pairs (exact in the 16-bit type, NaN kept): only the products below unpack to fp32.
  using Pair = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
  Pair pair_peak = __habs2(reinterpret_cast<const Pair*>(&raw[0])[0]);
#pragma unroll
  for (int u = 0; u < kQuantizeChunksPerLane; ++u) {
#pragma unroll
    for (int e = 0; e < 4; ++e) pair_peak = __hmax2_nan(pair_peak, __habs2(reinterpret_cast<const Pair*>(&raw[u])[e]));
  }
  float peak = max_nan(to_float(pair_peak.x), to_float(pair_peak.y));
#pragma unroll
  for (int delta = kTeam / 2; delta > 0; delta >>= 1) peak = max_nan(peak, __shfl_xor_sync(0xffffffffu, peak, delta));
  if (!active) return;
  if (!real) {  // scale 1: the GEMM's epilogue multiplies masked columns by it
    if (member == 0) op.scales[static_cast<int64_t>(bh) * op.scale_stride + group] = 1.f;
    return;
  }
  // IEEE quotients (fast math would approximate them), as the reference's. A NaN max makes both NaN; an
  // infinite one makes the scale inf and the multiplier 0 (values 0, inf * 0 NaN): either way the
  // group's anti-logits are NaN.
  const float scale = peak == 0.f ? 1.f : __fdiv_rn(peak, kE4m3Max);
  float multiplier = peak == 0.f ? 1.f : __fdiv_rn(kE4m3Max, peak);
  if (multiplier > FLT_MAX) multiplier = FLT_MAX;  // a group below 448 / FLT_MAX: no inf * 0
  uint8_t* out = op.out + (static_cast<int64_t>(bh) * groups + group) * chunks * 8;
#pragma unroll
  for (int u = 0; u < kQuantizeChunksPerLane; ++u) {
    const int chunk = member + kTeam * u;
    if (chunk >= chunks) break;
    const int token = chunk >> token_shift;
    const int slot = op.reverse_tokens ? p.stride - 1 - token : token;
    const T* values = reinterpret_cast<const T*>(&raw[u]);
    uint32_t packed[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const __nv_fp8x2_storage_t lo =
          __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(to_float(values[4 * half]), multiplier),
                                               __fmul_rn(to_float(values[4 * half + 1]), multiplier)),
                                   __NV_SATFINITE, __NV_E4M3);
      const __nv_fp8x2_storage_t hi =
          __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(to_float(values[4 * half + 2]), multiplier),
                                               __fmul_rn(to_float(values[4 * half + 3]), multiplier)),
                                   __NV_SATFINITE, __NV_E4M3);
      packed[half] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    *reinterpret_cast<uint2*>(out + slot * p.head_dim + (chunk & within_token) * 8) =
        make_uint2(packed[0], packed[1]);
  }
  if (member == 0) op.scales[static_cast<int64_t>(bh) * op.scale_stride + group] = scale;
}

template <typename T>
cudaError_t launch_quantize_anti_rows(const QuantizeAntiRowsParams& p, cudaStream_t stream) {
  const int chunks_per_token = p.head_dim / 8;
  if (p.head_dim % 8 != 0 || (chunks_per_token & (chunks_per_token - 1)) != 0) return cudaErrorInvalidValue;
  const int team = quantize_team_lanes(p.stride * p.head_dim / 8);
  int64_t teams = 0;
  for (const QuantizeAntiRowsOperand& op : p.operands) {
    teams = std::max(teams, static_cast<int64_t>(p.batch) * op.heads * op.scale_stride);
  }
  const dim3 grid(static_cast<unsigned>((teams * team + kQuantizeThreads - 1) / kQuantizeThreads), 2);
  switch (team) {  // the host passes groups of 8 tokens of 64 or 128 values, or of fewer tokens
    case 32: quantize_anti_rows_kernel<T, 32><<<grid, kQuantizeThreads, 0, stream>>>(p); break;
    case 16: quantize_anti_rows_kernel<T, 16><<<grid, kQuantizeThreads, 0, stream>>>(p); break;
    case 8: quantize_anti_rows_kernel<T, 8><<<grid, kQuantizeThreads, 0, stream>>>(p); break;
    case 4: quantize_anti_rows_kernel<T, 4><<<grid, kQuantizeThreads, 0, stream>>>(p); break;
    case 2: quantize_anti_rows_kernel<T, 2><<<grid, kQuantizeThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;  // more than a warp holds, or one lane's worth (S * D < 128)
  }
  return cudaGetLastError();
}

}  // namespace psa::kernels
