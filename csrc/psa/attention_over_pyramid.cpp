#include "check.h"
#include "ops.h"

namespace psa {

namespace {

// The forward's inputs, checked for `op` (the forward or its backward); returns the softmax scale.
double check_pyramid_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::vector<at::Tensor>& pooled, const at::Tensor& levels,
                                      int64_t block_m, int64_t block_n, std::optional<double> scale) {
  const double softmax_scale = check_attention_inputs(op, q, k, v, levels, block_m, block_n, scale);
  check_pyramid(op, k, pooled);
  return softmax_scale;
}

// t's shape, dtype and device as expected, or an error naming the op and the argument.
void check_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype,
                const at::Device& device) {
  PSA_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  PSA_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  PSA_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
}

}  // namespace

double prepare_attention_over_pyramid(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::vector<at::Tensor>& pooled, const at::Tensor& levels,
                                      int64_t block_m, int64_t block_n, std::optional<double> scale) {
  return check_pyramid_attention_inputs("psa.attention_over_pyramid", q, k, v, pooled, levels, block_m, block_n,
                                        scale);
}

double prepare_attention_over_pyramid_backward(const std::optional<at::Tensor>& grad_out,
                                               const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                                               const at::Tensor& k, const at::Tensor& v,
                                               const std::vector<at::Tensor>& pooled, const at::Tensor& levels,
                                               const at::Tensor& out, const at::Tensor& lse, int64_t block_m,
                                               int64_t block_n, std::optional<double> scale) {
  constexpr const char* op = "psa.attention_over_pyramid_backward";
  const double softmax_scale =
      check_pyramid_attention_inputs(op, q, k, v, pooled, levels, block_m, block_n, scale);
  const auto lse_shape = q.sizes().slice(0, 3);
  check_like(op, "out", out, q.sizes(), q.scalar_type(), q.device());
  check_like(op, "lse", lse, lse_shape, at::kFloat, q.device());
  PSA_CHECK(grad_out.has_value() || grad_lse.has_value(), op, ": grad_out and grad_lse are both None");
  if (grad_out.has_value()) check_like(op, "grad_out", *grad_out, q.sizes(), grad_out->scalar_type(), q.device());
  if (grad_lse.has_value()) check_like(op, "grad_lse", *grad_lse, lse_shape, grad_lse->scalar_type(), q.device());
  return softmax_scale;
}

}  // namespace psa
