// Which key blocks an estimator scores for a query block (docs/spec.md section 4): all of them, or under
// causal attention those whose first key is visible to the block's last query (bottom-right
// alignment). The device twin of csrc/psa/blocks.cpp's candidate_blocks.
#pragma once

namespace psa::kernels {

struct CandidateBlocks {
  int n_k, block_m, block_n, q_len, causal_offset;
  bool causal;
  __device__ CandidateBlocks(int n_k, int block_m, int block_n, int q_len, int k_len, bool causal)
      : n_k(n_k), block_m(block_m), block_n(block_n), q_len(q_len), causal_offset(k_len - q_len), causal(causal) {}
  // Last candidate key block of query block i (-1: none); candidates are 0..last(i).
  __device__ int last(int i) const {
    if (!causal) return n_k - 1;
    const int horizon = min((i + 1) * block_m, q_len) - 1 + causal_offset;
    return horizon < 0 ? -1 : min(n_k - 1, horizon / block_n);
  }
};

}  // namespace psa::kernels
