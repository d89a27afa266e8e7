// CUDA host side of attention_over_pyramid_backward: delta = rowsum(dO * O) - dlse by one kernel,
// then the query-major dq pass and one key-major dK / dV launch per level, all on the current stream,
// no host synchronisation. On Hopper both run on TMA + wgmma (the dq pass as the forward's kernel in
// its dq mode, kernels/sm90/attention_with_levels_sm90.cuh; dK / dV in
// kernels/sm90/attention_backward_dkdv_sm90.cuh); else on mma.sync (kernels/attention_backward.cuh).
#include "../ops.h"
#include "attention_params.h"
#include "common.h"
#include "kernels/launchers.h"

#include <algorithm>
#include <string>
#include <vector>
#ifdef PSA_WITH_SM90
#include "kernels/sm90/shapes_sm90.h"
#endif

namespace psa::cuda {
namespace {

constexpr const char* kOp = "psa.attention_over_pyramid_backward";

template <typename T, int kHeadDim>
cudaError_t launch_dq(int64_t block_m, const kernels::AttentionBackwardParams& params, cudaStream_t stream) {
  return with_block_m(block_m, [&](auto m) {
    return kernels::launch_attention_backward_dq<T, kHeadDim, decltype(m)::value>(params, stream);
  });
}

// A level's pooled rows per key block, block_n >> level, at least 16 (one warp's MMA rows).
template <typename T, int kHeadDim>
cudaError_t launch_dkdv(int rows, const kernels::AttentionBackwardParams& params, cudaStream_t stream) {
  switch (rows) {
    case 128: return kernels::launch_attention_backward_dkdv<T, kHeadDim, 128>(params, stream);
    case 64: return kernels::launch_attention_backward_dkdv<T, kHeadDim, 64>(params, stream);
    case 32: return kernels::launch_attention_backward_dkdv<T, kHeadDim, 32>(params, stream);
    default: return kernels::launch_attention_backward_dkdv<T, kHeadDim, 16>(params, stream);
  }
}

template <int kHeadDim>
size_t dq_smem_bytes(int64_t block_m, int n_k) {
  return with_block_m(block_m, [&](auto m) {
    return kernels::AttentionBackwardShape<kHeadDim, decltype(m)::value>::smem_bytes(n_k);
  });
}

#ifdef PSA_WITH_SM90
template <typename T, int kHeadDim>
cudaError_t launch_dq_sm90(int64_t block_m, const kernels::AttentionBackwardParams& params, cudaStream_t stream) {
  return with_sm90_block_m(block_m, [&](auto m) {
    return kernels::sm90::launch_attention_backward_dq_sm90<T, kHeadDim, decltype(m)::value>(params, stream);
  });
}

// A level's key block of `rows` pooled keys: 128-key CTAs where it has that many, else 64 (the rows
// past a shorter block are masked).
template <typename T, int kHeadDim>
cudaError_t launch_dkdv_sm90(int rows, const kernels::AttentionBackwardParams& params, cudaStream_t stream) {
  return rows >= 128 ? kernels::sm90::launch_attention_backward_dkdv_sm90<T, kHeadDim, 128>(params, stream)
                     : kernels::sm90::launch_attention_backward_dkdv_sm90<T, kHeadDim, 64>(params, stream);
}

// The larger of the two Hopper passes' shared memory.
template <int kHeadDim>
size_t backward_sm90_smem_bytes(int64_t block_m, int n_k) {
  const size_t dq = with_sm90_block_m(block_m, [&](auto m) {
    return kernels::sm90::AttentionSm90Shape<kHeadDim, decltype(m)::value, true>::smem_bytes(n_k);
  });
  const size_t dkdv = std::max(kernels::sm90::KeyBackwardSm90Storage<kHeadDim, 64>::smem_bytes(),
                               kernels::sm90::KeyBackwardSm90Storage<kHeadDim, 128>::smem_bytes());
  return std::max(dq, dkdv);
}
#endif

// Empty when the Hopper backward applies (the forward's conditions, with dO among the TMA operands),
// else why not.
std::string backward_sm90_unavailable_reason(const at::Tensor& q, const std::vector<at::Tensor>& operands,
                                             int64_t block_m, int64_t block_n, int64_t n_k) {
#ifdef PSA_WITH_SM90
  const size_t smem = q.size(3) == 128 ? backward_sm90_smem_bytes<128>(block_m, static_cast<int>(n_k))
                                       : backward_sm90_smem_bytes<64>(block_m, static_cast<int>(n_k));
  return sm90_level_map_unavailable_reason(q, operands, block_m, block_n, smem);
#else
  (void)operands; (void)block_m; (void)block_n; (void)n_k;
  return sm90_device_unavailable_reason(q.device());
#endif
}

}  // namespace

std::vector<at::Tensor> attention_over_pyramid_backward(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                                        const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in,
                                                        const std::vector<at::Tensor>& pooled_in,
                                                        const at::Tensor& levels, const at::Tensor& out,
                                                        const at::Tensor& lse, int64_t block_m, int64_t block_n,
                                                        double scale, bool causal) {
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const auto q = rows_16b_aligned(q_in), k = rows_16b_aligned(k_in), v = rows_16b_aligned(v_in);
  std::vector<at::Tensor> pooled;  // {k2, v2, k4, v4, k8, v8}
  for (const auto& t : pooled_in) pooled.push_back(rows_16b_aligned(t));
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), k_len = k.size(2);
  const int64_t n_k = ceil_div(k_len, block_n);
  PSA_CHECK(batch * q_heads <= 65535, kOp, ": B * Hq must be at most 65535 on CUDA, got ", batch * q_heads);
  PSA_CHECK(n_k <= 65535, kOp, ": ceil(Lk / block_n) must be at most 65535 on CUDA, got ", n_k);

  // dS = P (dO V^T - delta) with delta = rowsum(dO * O) - dlse is the gradient of both outputs.
  // The kernels address dO and O as contiguous [B, Hq, Lq, D] rows of 16-byte vectors; dO is zeros where no
  // gradient reached out (the dq / dK / dV kernels read it all the same).
  const auto d_out = grad_out.defined() ? rows_16b_aligned(grad_out.to(q.scalar_type()).contiguous())
                                        : at::zeros(q.sizes(), q.options());
  const auto out_rows = rows_16b_aligned(out.to(q.scalar_type()).contiguous());
  const auto d_lse = grad_lse.defined() ? grad_lse.to(at::kFloat).contiguous() : at::Tensor();
  auto delta = at::empty({batch, q_heads, q_len}, q.options().dtype(at::kFloat));
  const auto lse_rows = lse.to(at::kFloat).contiguous();
  // dq and dK / dV on the forward's Hopper machinery where it applies, else the portable kernels, whose
  // dq pass's schedule ids must fit its shared memory.
  const bool hopper = use_hopper_kernel(kOp, [&] {
    std::vector<at::Tensor> operands = {k, v, d_out};
    operands.insert(operands.end(), pooled.begin(), pooled.end());
    return backward_sm90_unavailable_reason(q, operands, block_m, block_n, n_k);
  });
  if (!hopper) {
    const size_t smem = dim == 128 ? dq_smem_bytes<128>(block_m, static_cast<int>(n_k))
                                   : dq_smem_bytes<64>(block_m, static_cast<int>(n_k));
    PSA_CHECK(smem <= max_dynamic_smem(q.device()), kOp, ": needs ", static_cast<int64_t>(smem),
              " bytes of shared memory for n_k = ", n_k, ", the device allows ",
              static_cast<int64_t>(max_dynamic_smem(q.device())));
  }
  const auto level_map = levels.contiguous();

  auto dq = at::empty({batch, q_heads, q_len, dim}, q.options());
  std::vector<at::Tensor> d_keys, d_values;  // level L: [B, Hkv, ceil(Lk / 2^L), D]
  for (int level = 0; level < kernels::kNumLevels; ++level) {
    const at::Tensor& level_k = level == 0 ? k : pooled[2 * (level - 1)];
    d_keys.push_back(at::empty({batch, kv_heads, level_k.size(2), dim}, level_k.options()));
    d_values.push_back(at::empty({batch, kv_heads, level_k.size(2), dim}, level_k.options()));
  }
  const auto gradients = [&] {
    std::vector<at::Tensor> grads = {dq.to(q_in.scalar_type()), d_keys[0].to(k_in.scalar_type()),
                                     d_values[0].to(v_in.scalar_type())};
    for (int level = 1; level < kernels::kNumLevels; ++level) {
      grads.push_back(d_keys[level].to(pooled_in[2 * (level - 1)].scalar_type()));
      grads.push_back(d_values[level].to(pooled_in[2 * (level - 1) + 1].scalar_type()));
    }
    return grads;
  };
  if (batch * q_heads == 0 || q_len == 0 || k_len == 0) {
    dq.zero_();
    for (auto& t : d_keys) t.zero_();
    for (auto& t : d_values) t.zero_();
    return gradients();
  }

  kernels::AttentionBackwardParams params{};
  params.base = level_map_attention_params(q, k, v, pooled, level_map, block_m, block_n, scale, causal);
  for (int level = 0; level < kernels::kNumLevels; ++level) {
    params.dk[level] = d_keys[level].data_ptr();
    params.dv[level] = d_values[level].data_ptr();
  }
  params.grad_out = d_out.data_ptr();
  params.lse = lse_rows.data_ptr<float>();
  params.delta = delta.data_ptr<float>();
  params.dq = dq.data_ptr();
  params.scale = static_cast<float>(scale);
  params.block_m = static_cast<int>(block_m);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t status = dispatch_input_dtype(kOp, q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    kernels::AttentionBackwardDeltaParams delta_params{};
    delta_params.grad_out = grad_out.defined() ? d_out.data_ptr() : nullptr;
    delta_params.out = out_rows.data_ptr();
    delta_params.grad_lse = d_lse.defined() ? d_lse.data_ptr<float>() : nullptr;
    delta_params.delta = delta.data_ptr<float>();
    delta_params.rows = batch * q_heads * q_len;
    delta_params.head_dim = static_cast<int>(dim);
    cudaError_t result = kernels::launch_attention_backward_delta<T>(delta_params, stream);
    if (result != cudaSuccess) return result;
    if (hopper) {
#ifdef PSA_WITH_SM90  // else hopper is false
      result = dim == 128 ? launch_dq_sm90<T, 128>(block_m, params, stream)
                          : launch_dq_sm90<T, 64>(block_m, params, stream);
#endif
    } else {
      result = dim == 128 ? launch_dq<T, 128>(block_m, params, stream) : launch_dq<T, 64>(block_m, params, stream);
    }
    for (int level = 0; level < kernels::kNumLevels && result == cudaSuccess; ++level) {
      params.level = level;
      const int rows = std::max(16, static_cast<int>(block_n >> level));
      if (hopper) {
#ifdef PSA_WITH_SM90
        result = dim == 128 ? launch_dkdv_sm90<T, 128>(rows, params, stream)
                            : launch_dkdv_sm90<T, 64>(rows, params, stream);
#endif
      } else {
        result = dim == 128 ? launch_dkdv<T, 128>(rows, params, stream) : launch_dkdv<T, 64>(rows, params, stream);
      }
    }
    return result;
  });
  check_launch(kOp, status);
  return gradients();
}

}  // namespace psa::cuda
