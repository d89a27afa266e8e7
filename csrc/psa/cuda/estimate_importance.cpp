// CUDA host side of the estimators. Sampled: for 8, 16 or 32 offsets per block the fused kernels (on
// sm_90 a TMA + wgmma GEMM over the sampled rows, read in place for the default offsets and gathered into
// compact tensors where that cannot be done; else the portable mma.sync kernel), the ATen path for other
// counts. Antidiagonal: a fused kernel (anti-logits reduced in registers to block sums of their softmax;
// TMA + wgmma on sm_90, else mma.sync) where the block sizes allow, else the ATen path; FP8 scoring
// quantizes q and k into rows of anti-row bytes, then runs the Hopper kernel on FP8 wgmma (the ATen path
// where that kernel does not apply). Pooled: the block means (the keys' from the pyramid's k8 when
// given), then one small kernel for the logits and the softmax.
#include <algorithm>
#include <string>

#include "../ops.h"
#include "common.h"
#include "kernels/launchers.h"
#include "kernels/sm90/shapes_sm90.h"

#include <cuda_fp8.h>

namespace psa::cuda {
namespace {

constexpr const char* kOp = "psa.estimate_importance";
// Upper bound of the scratch table of block maxima; longer inputs run in several head chunks.
constexpr int64_t kMaxTableBytes = int64_t{256} << 20;

bool fused_sample_count(int64_t samples) { return samples == 8 || samples == 16 || samples == 32; }

// The first compact sampled row (kernels/params.h) of `input` that the Hopper estimator reads from a copy
// rather than in place, for boxes of `box_rows` compact rows. In place needs the default offsets and a
// TMA-readable input, and a box is read in place only if all its rows are: compact row r of a block-aligned
// prefix is token kDefaultSampleStep * r + kDefaultSampleStep / 2, which exists for r < length / step; the
// last, partial block's rows clamp to its last token instead and are copied.
int64_t first_copied_row(const at::Tensor& input, bool default_offsets, int64_t compact_rows, int64_t box_rows) {
  if (!default_offsets || !tma_compatible(input)) return 0;
  const int64_t in_place = input.size(2) / kDefaultSampleStep;
  return in_place >= compact_rows ? compact_rows : in_place / box_rows * box_rows;
}

// The fields SampledParams and PooledParams share: inputs, scores and the block geometry.
template <typename Params>
void fill_common_params(Params& params, const at::Tensor& q, const at::Tensor& k, const at::Tensor& scores,
                        int64_t block_m, int64_t block_n, double scale, bool causal) {
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  set_strides(params.q_stride, q);
  set_strides(params.k_stride, k);
  params.scores = scores.data_ptr<float>();
  params.batch = static_cast<int>(q.size(0));
  params.q_heads = static_cast<int>(q.size(1));
  params.kv_heads = static_cast<int>(k.size(1));
  params.q_len = static_cast<int>(q.size(2));
  params.k_len = static_cast<int>(k.size(2));
  params.block_m = static_cast<int>(block_m);
  params.block_n = static_cast<int>(block_n);
  params.n_q = static_cast<int>(scores.size(2));
  params.n_k = static_cast<int>(scores.size(3));
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  params.causal = causal;
}

// Runs `launch(tag)` (tag: the input element type) over the flattened batch * head range in chunks that
// fit the scratch table (per_head floats a head, at most kMaxTableBytes), setting params.table and the
// chunk's bh_begin / bh_count.
template <typename Params, typename Launch>
void launch_over_head_chunks(Params& params, const at::Tensor& q, int64_t per_head, Launch launch) {
  const int64_t heads = q.size(0) * q.size(1);
  const int64_t chunk = std::clamp<int64_t>(kMaxTableBytes / (per_head * 4), 1, std::min<int64_t>(heads, 65535));
  auto table = at::empty({chunk * per_head}, q.options().dtype(at::kFloat));
  params.table = table.data_ptr<float>();
  for (int64_t begin = 0; begin < heads; begin += chunk) {
    params.bh_begin = static_cast<int>(begin);
    params.bh_count = static_cast<int>(std::min(chunk, heads - begin));
    check_launch(kOp, dispatch_input_dtype(kOp, q.scalar_type(), launch));
  }
}

// Runs `launch(tag)` over every batch * head in one launch (chunks of 65535 heads, grid.y's limit) whose
// CTAs take their scratch tables by slot (kernels/table_slots.cuh): one table of per_cta floats per CTA
// that can be resident at once, `ctas_per_sm` on each of the device's SMs, but no more than the grid has.
template <typename Params, typename Launch>
void launch_over_table_slots(Params& params, const at::Tensor& q, int64_t ctas_per_head, int64_t per_cta,
                             int ctas_per_sm, Launch launch) {
  const int64_t heads = q.size(0) * q.size(1);
  const int64_t resident = std::max<int64_t>(1, sm_count(q.device())) * ctas_per_sm;
  const int64_t slots = std::min(resident, heads * ctas_per_head);
  auto table = at::empty({slots * per_cta}, q.options().dtype(at::kFloat));
  auto busy = at::zeros({slots}, q.options().dtype(at::kInt));
  params.table = table.data_ptr<float>();
  params.table_slot_busy = reinterpret_cast<unsigned*>(busy.data_ptr<int>());
  params.table_slots = static_cast<int>(slots);
  for (int64_t begin = 0; begin < heads; begin += 65535) {
    params.bh_begin = static_cast<int>(begin);
    params.bh_count = static_cast<int>(std::min<int64_t>(65535, heads - begin));
    check_launch(kOp, dispatch_input_dtype(kOp, q.scalar_type(), launch));
  }
}

}  // namespace

at::Tensor estimate_sampled(const at::Tensor& q_in, const at::Tensor& k_in, int64_t block_m, int64_t block_n,
                            double scale, bool causal, const at::Tensor& q_offsets, const at::Tensor& k_offsets,
                            bool default_q_offsets, bool default_k_offsets) {
  if (!fused_sample_count(q_offsets.numel()) || !fused_sample_count(k_offsets.numel())) {
    // (Default offsets, made on the host, always have a fused count: blocks of 32, 64, 128.)
    return aten::estimate_sampled(q_in, k_in, block_m, block_n, scale, causal, q_offsets.to(q_in.device()),
                                  k_offsets.to(q_in.device()));
  }
  if (scale < 0) {
    // The fused kernels scale block maxima of raw products, which only a positive factor commutes
    // with: a negative scale is its magnitude applied to -q (a copy, for this rare case only).
    return estimate_sampled(q_in.neg(), k_in, block_m, block_n, -scale, causal, q_offsets, k_offsets,
                            default_q_offsets, default_k_offsets);
  }
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const auto q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in);
  // The default offsets stay on the host: the kernels compute them (null pointers).
  const auto q_off = q_offsets.contiguous(), k_off = k_offsets.contiguous();
  const int64_t batch = q.size(0), q_heads = q.size(1), dim = q.size(3);
  const int64_t n_q = ceil_div(q.size(2), block_m), n_k = ceil_div(k.size(2), block_n);
  auto scores = at::empty({batch, q_heads, n_q, n_k}, q.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;

  kernels::SampledParams params{};
  fill_common_params(params, q, k, scores, block_m, block_n, scale, causal);
  params.q_offsets = default_q_offsets ? nullptr : q_off.data_ptr<int64_t>();
  params.k_offsets = default_k_offsets ? nullptr : k_off.data_ptr<int64_t>();
  params.q_samples = static_cast<int>(q_off.numel());
  params.k_samples = static_cast<int>(k_off.numel());
  params.default_step = static_cast<int>(kDefaultSampleStep);
  const bool hopper = use_hopper_kernel(kOp, [&] { return sm90_device_unavailable_reason(q.device()); });
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // The Hopper kernel's copied sampled rows; they live until the launches are queued.
  at::Tensor q_rows, k_rows;
  if (hopper) {
    using Shape = kernels::sm90::SampledSm90Shape<64>;  // both head dims share the box heights
    const int64_t q_compact = n_q * params.q_samples, k_compact = n_k * params.k_samples;
    const int64_t q_begin = first_copied_row(q, default_q_offsets, q_compact, Shape::kRows);
    const int64_t k_begin = first_copied_row(k, default_k_offsets, k_compact, Shape::kTileN);
    params.q_rows_begin = static_cast<int>(q_begin);
    params.k_rows_begin = static_cast<int>(k_begin);
    q_rows = at::empty({batch, q_heads, q_compact - q_begin, dim}, q.options());
    k_rows = at::empty({batch, k.size(1), k_compact - k_begin, dim}, k.options());
    params.q_rows = q_rows.data_ptr();
    params.k_rows = k_rows.data_ptr();
    check_launch(kOp, dispatch_input_dtype(kOp, q.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      return dim == 128 ? kernels::launch_gather_sampled_rows<T, 128>(params, stream)
                        : kernels::launch_gather_sampled_rows<T, 64>(params, stream);
    }));
  }

  // Both head dims share a kernel's CTA shape; only the Q/K tiles differ.
  if (hopper) {
    using Shape = kernels::sm90::SampledSm90Shape<64>;
    launch_over_table_slots(params, q, Shape::ctas_per_head(params.n_q, params.q_samples),
                            Shape::table_floats_per_cta(params.n_k), Shape::kCtasPerSm, [&](auto tag) {
#ifdef PSA_WITH_SM90  // else sm90_device_unavailable_reason is never empty
      using T = decltype(tag);
      return dim == 128 ? kernels::sm90::launch_estimate_sampled_sm90<T, 128>(params, stream)
                        : kernels::sm90::launch_estimate_sampled_sm90<T, 64>(params, stream);
#else
      return cudaErrorNotSupported;
#endif
    });
    return scores;
  }
  const int64_t per_head = kernels::SampledShape<64>::table_floats_per_head(params.n_q, params.q_samples, params.n_k);
  launch_over_head_chunks(params, q, per_head, [&](auto tag) {
    using T = decltype(tag);
    return dim == 128 ? kernels::launch_estimate_sampled<T, 128>(params, stream)
                      : kernels::launch_estimate_sampled<T, 64>(params, stream);
  });
  return scores;
}

at::Tensor estimate_antidiagonal(const at::Tensor& q_in, const at::Tensor& k_in, int64_t block_m, int64_t block_n,
                                 double scale, bool causal, int64_t stride, EstimatePrecision precision) {
  // The fused kernels need whole query blocks per CTA (block_m / S dividing 64 anti-rows) and key
  // blocks of whole groups of 8 anti-columns within a 64-column tile; other strides take the ATen path
  // (for FP8 scoring: quantization, then a 16-bit GEMM of the e4m3 values, exact for them).
  const int64_t rows_per_block = block_m / stride, cols_per_block = block_n / stride;
  using Shape = kernels::AntidiagonalShape<64>;  // both head dims share the CTA shape and the table
  const bool fused = block_m % stride == 0 && block_n % stride == 0 && Shape::kRows % rows_per_block == 0 &&
                     cols_per_block % 8 == 0 && Shape::kTileN % cols_per_block == 0;
  if (!fused) return aten::estimate_antidiagonal(q_in, k_in, block_m, block_n, scale, causal, stride, precision);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const auto q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in);
  const int64_t batch = q.size(0), q_heads = q.size(1), dim = q.size(3);
  const int64_t n_q = ceil_div(q.size(2), block_m), n_k = ceil_div(k.size(2), block_n);
  auto scores = at::empty({batch, q_heads, n_q, n_k}, q.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;

  // The Hopper kernel (TMA + wgmma) where it applies: its 128 anti-rows and 256-column tiles hold whole
  // blocks whenever the sm80 kernel's 64 and 64 do; one TMA descriptor per member of a group of S.
  using Sm90Shape = kernels::sm90::AntidiagonalSm90Shape<64>;
  const bool fp8 = precision == EstimatePrecision::kFp8;
  const bool hopper = use_hopper_kernel(kOp, [&]() -> std::string {
    const std::string device_reason = sm90_device_unavailable_reason(q.device());
    if (!device_reason.empty()) return device_reason;
    if (stride > Sm90Shape::kMaxStride) return "stride must be at most 8";
    if (std::min(q.size(2), k.size(2)) < stride) return "sequences shorter than stride";
    // FP8 scoring's GEMM reads the quantized copies (contiguous); the quantization reads rows of 16 bytes.
    if (fp8 && (q.stride(3) != 1 || k.stride(3) != 1)) return "q/k rows are not contiguous";
    if (!fp8 && !(tma_compatible(q) && tma_compatible(k))) return "q/k strides are not TMA-compatible";
    return "";
  });
  // FP8 scoring runs on the Hopper kernel only, whose steps are 128 bytes of an anti-row of S * D.
  if (fp8 && !(hopper && (stride * dim) % kernels::sm90::kPanelRowBytes == 0)) {
    return aten::estimate_antidiagonal(q_in, k_in, block_m, block_n, scale, causal, stride, precision);
  }

  kernels::AntidiagonalParams params{};
  fill_common_params(params, q, k, scores, block_m, block_n, scale / static_cast<double>(stride), causal);
  params.stride = static_cast<int>(stride);
  params.q_tiles = static_cast<int>(ceil_div(q.size(2), stride));
  params.k_tiles = static_cast<int>(ceil_div(k.size(2), stride));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // FP8 scoring: the quantized rows and their scales replace q and k (kernels/quantize_anti_rows.cuh).
  at::Tensor q_rows, k_rows, q_scales, k_scales;
  if (fp8) {
    const int64_t kv_heads = k.size(1), row_bytes = stride * dim;
    const int64_t k_scale_stride = ceil_div(params.k_tiles, Sm90Shape::kTileN) * Sm90Shape::kTileN;
    q_rows = at::empty({batch, q_heads, params.q_tiles, row_bytes}, q.options().dtype(at::kByte));
    k_rows = at::empty({batch, kv_heads, params.k_tiles, row_bytes}, q.options().dtype(at::kByte));
    q_scales = at::empty({batch * q_heads, params.q_tiles}, q.options().dtype(at::kFloat));
    k_scales = at::empty({batch * kv_heads, k_scale_stride}, q.options().dtype(at::kFloat));
    kernels::QuantizeAntiRowsParams quantize_params{};
    const auto set_operand = [&](kernels::QuantizeAntiRowsOperand& operand, const at::Tensor& x,
                                 const at::Tensor& rows, const at::Tensor& scales, bool reverse) {
      operand.x = x.data_ptr();
      set_strides(operand.x_stride, x);
      operand.out = rows.data_ptr<uint8_t>();
      operand.scales = scales.data_ptr<float>();
      operand.heads = static_cast<int>(x.size(1));
      operand.length = static_cast<int>(x.size(2));
      operand.scale_stride = static_cast<int>(scales.size(1));
      operand.reverse_tokens = reverse;
    };
    set_operand(quantize_params.operands[0], q, q_rows, q_scales, /*reverse=*/true);
    set_operand(quantize_params.operands[1], k, k_rows, k_scales, /*reverse=*/false);
    quantize_params.batch = static_cast<int>(batch);
    quantize_params.head_dim = static_cast<int>(dim);
    quantize_params.stride = static_cast<int>(stride);
    check_launch(kOp, dispatch_input_dtype(kOp, q.scalar_type(), [&](auto tag) {
      return kernels::launch_quantize_anti_rows<decltype(tag)>(quantize_params, stream);
    }));
    params.q = q_rows.data_ptr();
    params.k = k_rows.data_ptr();
    params.q_scales = q_scales.data_ptr<float>();
    params.k_scales = k_scales.data_ptr<float>();
    params.k_scale_stride = static_cast<int>(k_scale_stride);
  }
  const int64_t per_head =
      hopper ? Sm90Shape::table_floats_per_head(params.n_q, static_cast<int>(rows_per_block), params.k_tiles)
             : Shape::table_floats_per_head(params.n_q, static_cast<int>(rows_per_block), params.k_tiles);
  launch_over_head_chunks(params, q, per_head, [&](auto tag) {
    using T = decltype(tag);
#ifdef PSA_WITH_SM90  // else sm90_device_unavailable_reason is never empty
    if (fp8) {
      return dim == 128 ? kernels::sm90::launch_estimate_antidiagonal_sm90<__nv_fp8_e4m3, 128>(params, stream)
                        : kernels::sm90::launch_estimate_antidiagonal_sm90<__nv_fp8_e4m3, 64>(params, stream);
    }
    if (hopper) {
      return dim == 128 ? kernels::sm90::launch_estimate_antidiagonal_sm90<T, 128>(params, stream)
                        : kernels::sm90::launch_estimate_antidiagonal_sm90<T, 64>(params, stream);
    }
#endif
    return dim == 128 ? kernels::launch_estimate_antidiagonal<T, 128>(params, stream)
                      : kernels::launch_estimate_antidiagonal<T, 64>(params, stream);
  });
  return scores;
}

at::Tensor estimate_pooled(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& k8_in, int64_t block_m,
                           int64_t block_n, double scale, bool causal) {
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const auto q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in);
  const auto k8 = k8_in.defined() ? rows_16b_aligned(k8_in) : k8_in;
  const int64_t batch = q.size(0), q_heads = q.size(1), dim = q.size(3);
  const int64_t n_q = ceil_div(q.size(2), block_m), n_k = ceil_div(k.size(2), block_n);
  // Groups of kRowsPerCta query blocks index gridDim.y.
  constexpr int64_t kMaxQueryBlocks = int64_t{65535} * kernels::PooledScoresShape::kRowsPerCta;
  PSA_CHECK(n_q <= kMaxQueryBlocks, kOp, ": the pooled estimator takes at most ", kMaxQueryBlocks,
            " query blocks on CUDA, got ", n_q);
  PSA_CHECK(batch <= 65535, kOp, ": the pooled estimator takes a batch of at most 65535 on CUDA (grid.z), got ",
            batch);
  auto scores = at::empty({batch, q_heads, n_q, n_k}, q.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;
  auto k_means = at::empty({batch, k.size(1), n_k, dim}, scores.options());

  kernels::PooledParams params{};
  fill_common_params(params, q, k, scores, block_m, block_n, scale, causal);
  params.k_means = k_means.data_ptr<float>();
  if (k8.defined()) {
    params.k8 = k8.data_ptr();
    set_strides(params.k8_stride, k8);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(kOp, dispatch_input_dtype(kOp, q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    return dim == 128 ? kernels::launch_estimate_pooled<T, 128>(params, stream)
                      : kernels::launch_estimate_pooled<T, 64>(params, stream);
  }));
  return scores;
}

}  // namespace psa::cuda
