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
  const PanelContext c(q, k, v, pooled, levels, block_m, block_n, scale, causal);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({c.batch, c.q_heads, c.q_len}, q.options().dtype(at::kFloat));

  at::parallel_for(0, c.batch * c.q_heads * c.n_q, 1, [&](int64_t begin, int64_t end) {
    QueryBlockPanel panel;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (c.q_heads * c.n_q), h = task / c.n_q % c.q_heads, i = task % c.n_q;
      const bool sees_keys = panel.gather(c, q, b, h, i);
      auto out_rows = out[b][h].narrow(0, panel.row_begin, panel.rows);
      auto lse_rows = lse[b][h].narrow(0, panel.row_begin, panel.rows);
      if (!sees_keys) {
        out_rows.zero_();
        lse_rows.fill_(-std::numeric_limits<float>::infinity());
        continue;
      }
      // Rows that see no key output 0.
      const auto denom = panel.exps.sum(1, true);
      const auto result = at::mm(panel.exps, panel.values) / denom;
      out_rows.copy_(at::where(panel.empty_row, at::zeros_like(result), result));
      lse_rows.copy_((panel.row_max + at::log(denom)).squeeze(1));
    }
  });
  return {out, lse};
}

}  // namespace psa::cpu
