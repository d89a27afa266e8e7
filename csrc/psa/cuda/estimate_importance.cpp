// CUDA host side of the sampled estimator: the fused kernel where it applies, the ATen path elsewhere.
#include "../ops.h"
#include "common.h"
#include "kernels/launchers.h"

namespace psa::cuda {
namespace {

constexpr const char* kOp = "psa.estimate_importance";

bool fused_sample_count(int64_t samples) { return samples == 8 || samples == 16 || samples == 32; }

template <int kHeadDim>
size_t sampled_smem_bytes(int warps, int n_k) {
  return warps == 4 ? kernels::SampledShape<kHeadDim, 4>::smem_bytes(n_k)
                    : kernels::SampledShape<kHeadDim, 2>::smem_bytes(n_k);
}

template <typename T, int kHeadDim>
cudaError_t launch_for_warps(int warps, const kernels::SampledParams& params, cudaStream_t stream) {
  return warps == 4 ? kernels::launch_estimate_sampled<T, kHeadDim, 4>(params, stream)
                    : kernels::launch_estimate_sampled<T, kHeadDim, 2>(params, stream);
}

}  // namespace

at::Tensor estimate_sampled(const at::Tensor& q_in, const at::Tensor& k_in, int64_t block_m, int64_t block_n,
                            double scale, bool causal, const at::Tensor& q_offsets, const at::Tensor& k_offsets) {
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const int64_t batch = q_in.size(0), q_heads = q_in.size(1), dim = q_in.size(3);
  const int64_t n_q = ceil_div(q_in.size(2), block_m), n_k = ceil_div(k_in.size(2), block_n);
  // The CTA keeps a [rows, n_k] float table in shared memory: 64 rows where it fits, else 32.
  const size_t limit = max_dynamic_smem(q_in.device());
  auto smem = [&](int warps) {
    return dim == 128 ? sampled_smem_bytes<128>(warps, static_cast<int>(n_k))
                      : sampled_smem_bytes<64>(warps, static_cast<int>(n_k));
  };
  const int warps = smem(4) <= limit ? 4 : (smem(2) <= limit ? 2 : 0);
  const bool fused = warps > 0 && fused_sample_count(q_offsets.numel()) && fused_sample_count(k_offsets.numel()) &&
                     batch * q_heads <= 65535;
  if (!fused) return aten::estimate_sampled(q_in, k_in, block_m, block_n, scale, causal, q_offsets, k_offsets);

  const auto q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in);
  const auto q_off = q_offsets.contiguous(), k_off = k_offsets.contiguous();
  auto scores = at::empty({batch, q_heads, n_q, n_k}, q.options().dtype(at::kFloat));
  kernels::SampledParams params{};
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  set_strides(params.q_stride, q);
  set_strides(params.k_stride, k);
  params.q_offsets = q_off.data_ptr<int64_t>();
  params.k_offsets = k_off.data_ptr<int64_t>();
  params.scores = scores.data_ptr<float>();
  params.batch = static_cast<int>(batch);
  params.q_heads = static_cast<int>(q_heads);
  params.kv_heads = static_cast<int>(k.size(1));
  params.q_len = static_cast<int>(q.size(2));
  params.k_len = static_cast<int>(k.size(2));
  params.block_m = static_cast<int>(block_m);
  params.block_n = static_cast<int>(block_n);
  params.n_q = static_cast<int>(n_q);
  params.n_k = static_cast<int>(n_k);
  params.q_samples = static_cast<int>(q_off.numel());
  params.k_samples = static_cast<int>(k_off.numel());
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  params.causal = causal;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t status = dispatch_input_dtype(kOp, q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    return dim == 128 ? launch_for_warps<T, 128>(warps, params, stream) : launch_for_warps<T, 64>(warps, params, stream);
  });
  check_launch(kOp, status);
  return scores;
}

}  // namespace psa::cuda
