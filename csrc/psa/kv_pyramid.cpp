#include "check.h"
#include "ops.h"

namespace psa {

void prepare_kv_pyramid(const at::Tensor& k, const at::Tensor& v) { check_pyramid_inputs("psa.kv_pyramid", k, v); }

void prepare_kv_pyramid_backward(const std::vector<at::Tensor>& d_pooled, int64_t k_len) {
  check_pyramid_gradients("psa.kv_pyramid_backward", d_pooled, k_len);
}

}  // namespace psa
