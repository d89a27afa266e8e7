#include "check.h"
#include "ops.h"

namespace psa {

PyramidTensors kv_pyramid(const at::Tensor& k, const at::Tensor& v) {
  constexpr const char* op = "psa.kv_pyramid";
  check_pyramid_inputs(op, k, v);
#ifdef PSA_WITH_CUDA
  const auto levels = k.is_cuda() ? cuda::kv_pyramid(k, v) : cpu::kv_pyramid(k, v);
#else
  const auto levels = cpu::kv_pyramid(k, v);
#endif
  return {levels[0], levels[1], levels[2], levels[3], levels[4], levels[5]};
}

}  // namespace psa
