#include "blocks.h"

#include "check.h"

namespace psa {

at::Tensor candidate_blocks(int64_t q_len, int64_t k_len, int64_t block_m, int64_t block_n, bool causal,
                            const at::TensorOptions& options) {
  const int64_t n_q = ceil_div(q_len, block_m), n_k = ceil_div(k_len, block_n);
  const auto index = options.dtype(at::kLong);
  if (!causal) return at::ones({n_q, n_k}, index.dtype(at::kBool));
  const auto last_query = at::clamp_max(at::arange(1, n_q + 1, index) * block_m, q_len) - 1;
  const auto first_key = at::arange(n_k, index) * block_n;
  return first_key.unsqueeze(0) <= (last_query + (k_len - q_len)).unsqueeze(1);
}

at::Tensor normalize_rows(const at::Tensor& scores) {
  // An all-zero row (nothing visible) stays zero; a row holding NaN or inf becomes NaN, which the
  // assignment runs dense (docs/spec.md section 5).
  const auto total = scores.sum(-1, true);
  const auto empty = total == 0;
  return at::where(empty, at::zeros_like(scores), scores / at::where(empty, at::ones_like(total), total));
}

at::Tensor positions_to_blocks(const at::Tensor& mask, int64_t batch, int64_t length, int64_t block) {
  const int64_t blocks = ceil_div(length, block);
  const auto padded = at::constant_pad_nd(mask.expand({batch, length}).to(at::kByte), {0, blocks * block - length});
  return padded.view({batch, blocks, block}).amax(2).to(at::kBool);
}

}  // namespace psa
