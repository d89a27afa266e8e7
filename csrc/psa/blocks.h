// Block geometry shared by the estimators and the level assignment, as device-generic ATen code.
#pragma once

#include <ATen/ATen.h>

namespace psa {

// bool [n_q, n_k]: key blocks a query block may attend to. Causal (bottom-right aligned, offset
// k_len - q_len): block j is a candidate of block i when its first key is visible to i's last query.
at::Tensor candidate_blocks(int64_t q_len, int64_t k_len, int64_t block_m, int64_t block_n, bool causal,
                            const at::TensorOptions& options);

// Rows divided by their sum; rows summing to zero stay zero, rows holding NaN or inf become NaN.
at::Tensor normalize_rows(const at::Tensor& scores);

// bool [B, n_blocks] from a bool position mask [L] or [B, L] (any position set marks its block).
at::Tensor positions_to_blocks(const at::Tensor& mask, int64_t batch, int64_t length, int64_t block);

}  // namespace psa
