// CUDA host side of attention_with_levels: builds the pyramid, fills AttentionParams and launches the
// block-tile kernel for the (dtype, head_dim, block_m) variant on the current stream.
#include "../ops.h"
#include "common.h"
#include "kernels/launchers.h"

namespace psa::cuda {
namespace {

constexpr const char* kOp = "psa.attention_with_levels";

template <typename T, int kHeadDim>
cudaError_t launch_for_block_m(int64_t block_m, const kernels::AttentionParams& params, cudaStream_t stream) {
  switch (block_m) {
    case 32: return kernels::launch_attention_with_levels<T, kHeadDim, 32>(params, stream);
    case 64: return kernels::launch_attention_with_levels<T, kHeadDim, 64>(params, stream);
    default: return kernels::launch_attention_with_levels<T, kHeadDim, 128>(params, stream);
  }
}

template <int kHeadDim>
size_t smem_bytes(int64_t block_m, int n_k) {
  switch (block_m) {
    case 32: return kernels::AttentionShape<kHeadDim, 32>::smem_bytes(n_k);
    case 64: return kernels::AttentionShape<kHeadDim, 64>::smem_bytes(n_k);
    default: return kernels::AttentionShape<kHeadDim, 128>::smem_bytes(n_k);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_with_levels(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& levels,
                                                         int64_t block_m, int64_t block_n, double scale,
                                                         bool causal) {
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const auto q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in), v = rows_16b_aligned(v_in);
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t n_q = ceil_div(q_len, block_m), n_k = ceil_div(k.size(2), block_n);
  PSA_CHECK(batch * q_heads <= 65535, kOp, ": B * Hq must be at most 65535 on CUDA, got ", batch * q_heads);
  PSA_CHECK(n_k <= 65535, kOp, ": ceil(Lk / block_n) must be at most 65535 on CUDA, got ", n_k);
  PSA_CHECK(q_len < (int64_t{1} << 31) && k.size(2) < (int64_t{1} << 31), kOp,
            ": Lq and Lk must be below 2^31, got ", q_len, " and ", k.size(2));
  const size_t smem = dim == 128 ? smem_bytes<128>(block_m, static_cast<int>(n_k))
                                 : smem_bytes<64>(block_m, static_cast<int>(n_k));
  PSA_CHECK(smem <= max_dynamic_smem(q.device()), kOp, ": needs ", static_cast<int64_t>(smem),
            " bytes of shared memory for n_k = ", n_k, ", the device allows ",
            static_cast<int64_t>(max_dynamic_smem(q.device())));

  const auto pooled = kv_pyramid(k, v);  // {k2, v2, k4, v4, k8, v8}, contiguous
  const auto level_map = levels.contiguous();
  auto out = at::empty({batch, q_heads, q_len, dim}, q.options());
  auto lse = at::empty({batch, q_heads, q_len}, q.options().dtype(at::kFloat));

  kernels::AttentionParams params{};
  params.q = q.data_ptr();
  set_strides(params.q_stride, q);
  for (int level = 0; level < kernels::kNumLevels; ++level) {
    const at::Tensor& level_k = level == 0 ? k : pooled[2 * (level - 1)];
    const at::Tensor& level_v = level == 0 ? v : pooled[2 * (level - 1) + 1];
    params.k[level] = level_k.data_ptr();
    params.v[level] = level_v.data_ptr();
    set_strides(params.k_stride[level], level_k);
    set_strides(params.v_stride[level], level_v);
  }
  params.levels = level_map.data_ptr<int8_t>();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.batch = static_cast<int>(batch);
  params.q_heads = static_cast<int>(q_heads);
  params.kv_heads = static_cast<int>(k.size(1));
  params.q_len = static_cast<int>(q_len);
  params.k_len = static_cast<int>(k.size(2));
  params.block_n = static_cast<int>(block_n);
  params.n_q = static_cast<int>(n_q);
  params.n_k = static_cast<int>(n_k);
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  params.causal = causal;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t status = dispatch_input_dtype(kOp, q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    return dim == 128 ? launch_for_block_m<T, 128>(block_m, params, stream)
                      : launch_for_block_m<T, 64>(block_m, params, stream);
  });
  check_launch(kOp, status);
  return {out, lse};
}

}  // namespace psa::cuda
