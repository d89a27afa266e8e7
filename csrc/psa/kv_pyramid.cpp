#include "check.h"
#include "ops.h"

namespace psa {

PyramidTensors kv_pyramid(const at::Tensor& k, const at::Tensor& v) {
  constexpr const char* op = "psa.kv_pyramid";
  // k plays the role of q for the shared checks: v must match it in every respect.
  check_qk(op, k, k);
  PSA_CHECK(v.dim() == 4 && v.sizes() == k.sizes(), op, ": v must have the shape of k (", k.sizes(),
              "), got ", v.sizes());
  PSA_CHECK(v.device() == k.device() && v.scalar_type() == k.scalar_type(), op,
              ": v must have the device and dtype of k (", k.device(), ", ", k.scalar_type(), "), got ",
              v.device(), ", ", v.scalar_type());
  PSA_CHECK(v.stride(-1) == 1, op, ": v must be contiguous in its last dim, got strides ", v.strides());
#ifdef PSA_WITH_CUDA
  const auto levels = k.is_cuda() ? cuda::kv_pyramid(k, v) : cpu::kv_pyramid(k, v);
#else
  const auto levels = cpu::kv_pyramid(k, v);
#endif
  return {levels[0], levels[1], levels[2], levels[3], levels[4], levels[5]};
}

}  // namespace psa
