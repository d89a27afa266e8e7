// CUDA host side of attention_over_pyramid: fills AttentionParams and launches the block-tile kernel
// for the (dtype, head_dim, block_m) variant on the current stream.
#include "../ops.h"
#include "attention_params.h"
#include "common.h"
#include "kernels/launchers.h"

#include <string>
#include <vector>
#ifdef PSA_WITH_SM90
#include "kernels/sm90/shapes_sm90.h"
#endif

namespace psa::cuda {
namespace {

constexpr const char* kOp = "psa.attention_over_pyramid";

template <typename T, int kHeadDim>
cudaError_t launch_for_block_m(int64_t block_m, const kernels::AttentionParams& params, cudaStream_t stream) {
  return with_block_m(block_m, [&](auto m) {
    return kernels::launch_attention_with_levels<T, kHeadDim, decltype(m)::value>(params, stream);
  });
}

template <int kHeadDim>
size_t smem_bytes(int64_t block_m, int n_k) {
  return with_block_m(block_m, [&](auto m) {
    return kernels::AttentionShape<kHeadDim, decltype(m)::value>::smem_bytes(n_k);
  });
}

#ifdef PSA_WITH_SM90
template <typename T, int kHeadDim>
cudaError_t launch_sm90_for_block_m(int64_t block_m, const kernels::AttentionParams& params, cudaStream_t stream) {
  return with_sm90_block_m(block_m, [&](auto m) {
    return kernels::sm90::launch_attention_with_levels_sm90<T, kHeadDim, decltype(m)::value>(params, stream);
  });
}

template <int kHeadDim>
size_t sm90_smem_bytes(int64_t block_m, int n_k) {
  return with_sm90_block_m(block_m, [&](auto m) {
    return kernels::sm90::AttentionSm90Shape<kHeadDim, decltype(m)::value>::smem_bytes(n_k);
  });
}
#endif

// Empty when the Hopper kernel applies, else why not.
std::string sm90_unavailable_reason(const at::Tensor& q, const std::vector<at::Tensor>& keys_and_values,
                                    int64_t block_m, int64_t block_n, int64_t n_k) {
#ifdef PSA_WITH_SM90
  const size_t smem = q.size(3) == 128 ? sm90_smem_bytes<128>(block_m, static_cast<int>(n_k))
                                       : sm90_smem_bytes<64>(block_m, static_cast<int>(n_k));
  return sm90_level_map_unavailable_reason(q, keys_and_values, block_m, block_n, smem);
#else
  (void)keys_and_values; (void)block_m; (void)block_n; (void)n_k;
  return sm90_device_unavailable_reason(q.device());
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_over_pyramid(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in,
                                                          const std::vector<at::Tensor>& pooled_in,
                                                          const at::Tensor& levels, int64_t block_m,
                                                          int64_t block_n, double scale, bool causal) {
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const auto q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in), v = rows_16b_aligned(v_in);
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t n_k = ceil_div(k.size(2), block_n);
  PSA_CHECK(batch * q_heads <= 65535, kOp, ": B * Hq must be at most 65535 on CUDA, got ", batch * q_heads);
  PSA_CHECK(n_k <= 65535, kOp, ": ceil(Lk / block_n) must be at most 65535 on CUDA, got ", n_k);
  PSA_CHECK(q_len < (int64_t{1} << 31) && k.size(2) < (int64_t{1} << 31), kOp,
            ": Lq and Lk must be below 2^31, got ", q_len, " and ", k.size(2));
  std::vector<at::Tensor> pooled;  // {k2, v2, k4, v4, k8, v8}
  for (const auto& t : pooled_in) pooled.push_back(rows_16b_aligned(t));
  const bool use_sm90 = use_hopper_kernel(kOp, [&] {
    std::vector<at::Tensor> keys_and_values = {k, v};
    keys_and_values.insert(keys_and_values.end(), pooled.begin(), pooled.end());
    return sm90_unavailable_reason(q, keys_and_values, block_m, block_n, n_k);
  });
  if (!use_sm90) {
    const size_t smem = dim == 128 ? smem_bytes<128>(block_m, static_cast<int>(n_k))
                                   : smem_bytes<64>(block_m, static_cast<int>(n_k));
    PSA_CHECK(smem <= max_dynamic_smem(q.device()), kOp, ": needs ", static_cast<int64_t>(smem),
              " bytes of shared memory for n_k = ", n_k, ", the device allows ",
              static_cast<int64_t>(max_dynamic_smem(q.device())));
  }
  const auto level_map = levels.contiguous();
  auto out = at::empty({batch, q_heads, q_len, dim}, q.options());
  auto lse = at::empty({batch, q_heads, q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};  // an empty batch, as SDPA: nothing to launch

  kernels::AttentionParams params =
      level_map_attention_params(q, k, v, pooled, level_map, block_m, block_n, scale, causal);
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t status = dispatch_input_dtype(kOp, q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
#ifdef PSA_WITH_SM90
    if (use_sm90) {
      return dim == 128 ? launch_sm90_for_block_m<T, 128>(block_m, params, stream)
                        : launch_sm90_for_block_m<T, 64>(block_m, params, stream);
    }
#endif
    return dim == 128 ? launch_for_block_m<T, 128>(block_m, params, stream)
                      : launch_for_block_m<T, 64>(block_m, params, stream);
  });
  check_launch(kOp, status);
  return {out, lse};
}

}  // namespace psa::cuda
