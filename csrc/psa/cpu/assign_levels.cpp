// CPU reference kernel of level assignment (docs/spec.md section 5): one row of blocks at a time, ranked by a
// stable sort so that ties go to the lower block index.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "../blocks.h"
#include "../check.h"
#include "../ops.h"

namespace psa::cpu {
namespace {

constexpr int8_t kLevels[4] = {1, 2, 4, 8};
// Slack for ceil(min_full * m) and round(e * m), so that 0.06 * 50 = 3.0000000000000004 counts as 3.
// psa/reference.py uses the same value.
constexpr double kCountEps = 1e-9;

}  // namespace

at::Tensor assign_levels(const at::Tensor& scores, bool threshold_mode, at::ArrayRef<double> bounds,
                         int64_t block_m, int64_t block_n, int64_t q_len, int64_t k_len, double min_full,
                         bool causal, bool sink, const at::Tensor& force_key_blocks,
                         const at::Tensor& force_query_blocks, const at::Tensor& cap) {
  const int64_t batch = scores.size(0), q_heads = scores.size(1), n_q = scores.size(2), n_k = scores.size(3);
  const auto score_data = scores.to(at::kDouble).contiguous();
  const auto candidates = candidate_blocks(q_len, k_len, block_m, block_n, causal, scores.options()).contiguous();
  const auto key_blocks = force_key_blocks.defined() ? force_key_blocks.contiguous() : force_key_blocks;
  const auto query_blocks = force_query_blocks.defined() ? force_query_blocks.contiguous() : force_query_blocks;
  const auto cap_data = cap.defined() ? cap.contiguous() : cap;
  const int64_t group = cap.defined() ? q_heads / cap.size(1) : 1;
  auto levels = at::zeros(scores.sizes(), scores.options().dtype(at::kChar));
  int8_t* out = levels.data_ptr<int8_t>();

  at::parallel_for(0, batch * q_heads * n_q, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> ranked;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (q_heads * n_q), h = row / n_q % q_heads, i = row % n_q;
      const double* score = score_data.data_ptr<double>() + row * n_k;
      const bool* candidate = candidates.data_ptr<bool>() + i * n_k;
      int8_t* level = out + row * n_k;

      ranked.clear();
      for (int64_t j = 0; j < n_k; ++j) {
        if (candidate[j]) ranked.push_back(j);
      }
      const int64_t m = static_cast<int64_t>(ranked.size());
      if (m == 0) continue;
      // A row with a non-finite score (inf or NaN in q or k, overflowing logits) is computed densely,
      // so those values reach the output as in dense attention (docs/spec.md section 5); it is not
      // ranked (NaN has no order).
      const bool dense_row =
          std::any_of(ranked.begin(), ranked.end(), [&](int64_t j) { return !std::isfinite(score[j]); });
      if (!dense_row) {
        std::stable_sort(ranked.begin(), ranked.end(), [&](int64_t a, int64_t c) { return score[a] > score[c]; });
      }

      const int64_t full_floor = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(min_full * m - kCountEps)));
      if (dense_row) {
        for (const int64_t j : ranked) level[j] = 1;
      } else if (threshold_mode) {
        // A block takes the finest level whose bound exceeds the mass ranked ahead of it, so the
        // block that crosses a bound is kept at that level. The mass ahead is (sum of the scores ahead)
        // / total, divided once, as in psa/reference.py and the CUDA kernel.
        double total = 0.0;
        for (const int64_t j : ranked) total += score[j];
        double ahead = 0.0;
        for (int64_t r = 0; r < m; ++r) {
          const int64_t j = ranked[r];
          const double before = total > 0.0 ? ahead / total : 0.0;
          int8_t chosen = 0;
          for (int l = 3; l >= 0; --l) {
            if (before < bounds[l]) chosen = kLevels[l];
          }
          level[j] = r < full_floor ? 1 : chosen;
          ahead += score[j];
        }
      } else {
        int64_t quota[4];
        for (int l = 0; l < 4; ++l) quota[l] = static_cast<int64_t>(std::floor(bounds[l] * m + 0.5 + kCountEps));
        for (int64_t r = 0; r < m; ++r) {
          int8_t chosen = 0;
          for (int l = 3; l >= 0; --l) {
            if (r < quota[l]) chosen = kLevels[l];
          }
          level[ranked[r]] = r < full_floor ? 1 : chosen;
        }
      }

      if (causal) {
        level[*std::max_element(ranked.begin(), ranked.end())] = 1;  // the diagonal block
        if (sink) level[0] = 1;  // block 0 is a candidate of every row that has one
      }
      const bool* forced_keys = key_blocks.defined() ? key_blocks.data_ptr<bool>() + b * n_k : nullptr;
      const bool whole_row = query_blocks.defined() && query_blocks.data_ptr<bool>()[b * n_q + i];
      for (int64_t j = 0; j < n_k; ++j) {
        if (candidate[j] && (whole_row || (forced_keys && forced_keys[j]))) level[j] = 1;
      }
      if (cap_data.defined()) {
        const int64_t* cap_row = cap_data.data_ptr<int64_t>() + (b * cap_data.size(1) + h / group) * n_k;
        for (int64_t j = 0; j < n_k; ++j) {
          if (level[j] > cap_row[j]) level[j] = static_cast<int8_t>(cap_row[j]);
        }
      }
    }
  });
  return levels;
}

}  // namespace psa::cpu
