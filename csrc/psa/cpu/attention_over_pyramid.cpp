// CPU reference kernel of attention over a level map (docs/spec.md section 3).
//
// For each (batch, head, query block) the visible tokens of every level are gathered into one
// contiguous key/value panel (pyramid_panel.h), so that the block is one softmax over two matmuls.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../check.h"
#include "../ops.h"
#include "pyramid_panel.h"

namespace psa::cpu {

std::tuple<at::Tensor, at::Tensor> attention_over_pyramid(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::vector<at::Tensor>& pooled,
                                                          const at::Tensor& levels, int64_t block_m,
                                                          int64_t block_n, double scale, bool causal) {
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), k_len = k.size(2);
  const int64_t n_q = ceil_div(q_len, block_m), n_k = ceil_div(k_len, block_n);
  const int64_t group = q_heads / kv_heads;
  const int64_t causal_offset = k_len - q_len;
  const auto compute_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto compute = q.options().dtype(compute_dtype);
  const std::vector<LevelTensors> pyramid = pyramid_levels(k, v, pooled, compute_dtype);

  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({batch, q_heads, q_len}, q.options().dtype(at::kFloat));
  const auto level_map = levels.contiguous();
  const int8_t* level_data = level_map.data_ptr<int8_t>();

  at::parallel_for(0, batch * q_heads * n_q, 1, [&](int64_t begin, int64_t end) {
    std::vector<TokenRange> ranges;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (q_heads * n_q), h = task / n_q % q_heads, i = task % n_q;
      const int64_t row_begin = i * block_m, rows = std::min(block_m, q_len - row_begin);
      auto out_rows = out[b][h].narrow(0, row_begin, rows);
      auto lse_rows = lse[b][h].narrow(0, row_begin, rows);

      const int64_t tokens = visible_ranges(level_data + task * n_k, n_k, block_n, pyramid, ranges);
      if (tokens == 0) {
        out_rows.zero_();
        lse_rows.fill_(-std::numeric_limits<float>::infinity());
        continue;
      }

      auto keys = at::empty({tokens, dim}, compute);
      auto values = at::empty({tokens, dim}, compute);
      AT_DISPATCH_FLOATING_TYPES(compute_dtype, "psa_gather", [&] {
        gather_rows<scalar_t>(b, h / group, ranges, pyramid, true, keys);
        gather_rows<scalar_t>(b, h / group, ranges, pyramid, false, values);
      });
      const auto logits = panel_logits(q[b][h].narrow(0, row_begin, rows).to(compute_dtype), keys, ranges, pyramid,
                                       scale, causal, row_begin, causal_offset);
      const auto row_max = std::get<0>(logits.max(1, true));
      // Rows that see no key (max -inf) output 0; a +inf or NaN max (overflowing or non-finite inputs)
      // propagates NaN as dense attention does.
      const auto empty_row = at::eq(row_max, -std::numeric_limits<double>::infinity());
      const auto probs = at::exp(logits - at::where(empty_row, at::zeros_like(row_max), row_max));
      const auto denom = probs.sum(1, true);
      const auto result = at::mm(probs, values) / denom;
      out_rows.copy_(at::where(empty_row, at::zeros_like(result), result));
      lse_rows.copy_((row_max + at::log(denom)).squeeze(1));
    }
  });
  return {out, lse};
}

}  // namespace psa::cpu
