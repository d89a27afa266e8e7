#include "check.h"
#include "ops.h"

namespace psa {

void prepare_kv_pyramid(const at::Tensor& k, const at::Tensor& v) { check_pyramid_inputs("psa.kv_pyramid", k, v); }

}  // namespace psa
