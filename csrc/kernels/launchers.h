// Declarations of the kernel launchers, for host code. Each is defined in its .cuh and explicitly
// instantiated per variant in instantiations/ (see generate_instantiations.py, the list of variants).
#pragma once

#include <cuda_runtime.h>

#include "params.h"
#include "shapes.h"

namespace psa::kernels {

// T: __nv_bfloat16 or __half.
template <typename T>
cudaError_t launch_kv_pyramid(const PyramidParams& params, cudaStream_t stream);

// kv_pyramid's backward (kv_pyramid_backward.cuh): dk and dv from the gradients of the pooled levels.
template <typename T>
cudaError_t launch_kv_pyramid_backward(const PyramidBackwardParams& params, cudaStream_t stream);

// kHeadDim 64 or 128; kBlockM 32, 64 or 128 (one warp per 16 query rows).
template <typename T, int kHeadDim, int kBlockM>
cudaError_t launch_attention_with_levels(const AttentionParams& params, cudaStream_t stream);

// The backward: delta = rowsum(dO * O) - dlse per row (attention_backward_delta.cuh), then
// (attention_backward.cuh) dq for kBlockM 32, 64 or 128; dK / dV of level params.level for
// kRows = max(16, block_n >> level) (16, 32, 64 or 128) pooled rows per key block.
template <typename T>
cudaError_t launch_attention_backward_delta(const AttentionBackwardDeltaParams& params, cudaStream_t stream);
template <typename T, int kHeadDim, int kBlockM>
cudaError_t launch_attention_backward_dq(const AttentionBackwardParams& params, cudaStream_t stream);
template <typename T, int kHeadDim, int kRows>
cudaError_t launch_attention_backward_dkdv(const AttentionBackwardParams& params, cudaStream_t stream);

namespace sm90 {
// The Hopper kernel (TMA + wgmma, sm_90a): same contract as launch_attention_with_levels, for
// kBlockM 64 or 128 and block_n >= 64; host code checks `tma_compatible` strides first.
template <typename T, int kHeadDim, int kBlockM>
cudaError_t launch_attention_with_levels_sm90(const AttentionParams& params, cudaStream_t stream);
// The backward's dq pass on the same machinery (kBlockM 64 or 128, block_n >= 64, TMA-compatible
// strides; dO contiguous); writes params.dq like launch_attention_backward_dq.
template <typename T, int kHeadDim, int kBlockM>
cudaError_t launch_attention_backward_dq_sm90(const AttentionBackwardParams& params, cudaStream_t stream);
// The key-major dK / dV pass of params.level on TMA + wgmma (kKeyRows 64 or 128: 128 when the level's
// key block has at least 128 rows; block_m 64 or 128; TMA-compatible strides; dO contiguous); writes
// params.dk / dv[level] like launch_attention_backward_dkdv.
template <typename T, int kHeadDim, int kKeyRows>
cudaError_t launch_attention_backward_dkdv_sm90(const AttentionBackwardParams& params, cudaStream_t stream);
}  // namespace sm90

// One launch covers heads [bh_begin, bh_begin + bh_count) of the flattened batch * head range.
template <typename T, int kHeadDim>
cudaError_t launch_estimate_sampled(const SampledParams& params, cudaStream_t stream);

// The fused antidiagonal estimator, heads [bh_begin, bh_begin + bh_count) per launch; params.table sized
// by AntidiagonalShape::table_floats_per_head for bh_count heads.
template <typename T, int kHeadDim>
cudaError_t launch_estimate_antidiagonal(const AntidiagonalParams& params, cudaStream_t stream);

// Fills params.q_rows / params.k_rows with the sampled rows of every head that the Hopper estimator does
// not read in place (from params.q_rows_begin / k_rows_begin on).
template <typename T, int kHeadDim>
cudaError_t launch_gather_sampled_rows(const SampledParams& params, cudaStream_t stream);

namespace sm90 {
// The Hopper estimator (TMA + wgmma, sm_90a) over the sampled rows (in place and copied): same contract as
// launch_estimate_sampled, except that params.table holds params.table_slots tables of
// SampledSm90Shape::table_floats_per_cta floats, taken by slot (table_slots.cuh; table_slot_busy zeroed).
template <typename T, int kHeadDim>
cudaError_t launch_estimate_sampled_sm90(const SampledParams& params, cudaStream_t stream);
// The Hopper antidiagonal estimator: same contract as launch_estimate_antidiagonal, with the table sized
// by AntidiagonalSm90Shape; needs stride <= 8 and both lengths >= stride. T = __nv_fp8_e4m3: FP8 scoring
// of the rows launch_quantize_anti_rows wrote (params.q / k, q_scales / k_scales; stride * kHeadDim a
// multiple of 128).
template <typename T, int kHeadDim>
cudaError_t launch_estimate_antidiagonal_sm90(const AntidiagonalParams& params, cudaStream_t stream);
}  // namespace sm90

// FP8 scoring's quantization for the Hopper antidiagonal kernel (quantize_anti_rows.cuh); T: the input's.
template <typename T>
cudaError_t launch_quantize_anti_rows(const QuantizeAntiRowsParams& params, cudaStream_t stream);

template <typename T, int kHeadDim>
cudaError_t launch_estimate_pooled(const PooledParams& params, cudaStream_t stream);

// Score: float or double.
template <typename Score>
cudaError_t launch_assign_levels(const AssignParams& params, cudaStream_t stream);

}  // namespace psa::kernels
