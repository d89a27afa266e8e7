// CPU reference kernel of the backward of attention over a level map (docs/spec.md section 7).
//
// Per query block, the same panel of visible pyramid tokens as the forward (pyramid_panel.h), then with
// the forward's output:
//   P = softmax(S),  delta = rowsum(dO * O),  dS = P * (dO V^T - delta + dlse),
//   dq = scale dS K,  dK_panel = scale dS^T q,  dV_panel = P^T dO,
// the panel gradients added back into each level's dK_l, dV_l. The softmax is recomputed in the compute
// dtype rather than read from lse (float32, which would cap float64 gradients at float32 accuracy); the
// op takes lse for the GPU kernels. Work is split by (batch, key head), so the query heads of a GQA
// group and all query blocks that add into one key head's gradients run in one task: no two tasks
// write the same rows.
#include <ATen/Parallel.h>

#include <limits>

#include "../check.h"
#include "../ops.h"
#include "pyramid_panel.h"

namespace psa::cpu {

std::vector<at::Tensor> attention_over_pyramid_backward(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                                        const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const std::vector<at::Tensor>& pooled,
                                                        const at::Tensor& levels, const at::Tensor& out,
                                                        const at::Tensor& lse, int64_t block_m, int64_t block_n,
                                                        double scale, bool causal) {
  const PanelContext c(q, k, v, pooled, levels, block_m, block_n, scale, causal);
  auto dq = at::zeros(q.sizes(), c.compute);
  std::vector<at::Tensor> d_keys, d_values;
  for (const auto& level : c.pyramid) {
    d_keys.push_back(at::zeros_like(level.k));
    d_values.push_back(at::zeros_like(level.v));
  }
  const bool has_grad_out = grad_out.defined(), has_grad_lse = grad_lse.defined();

  at::parallel_for(0, c.batch * c.kv_heads, 1, [&](int64_t begin, int64_t end) {
    QueryBlockPanel panel;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / c.kv_heads, kv_head = task % c.kv_heads;
      for (int64_t h = kv_head * c.group; h < (kv_head + 1) * c.group; ++h) {
        for (int64_t i = 0; i < c.n_q; ++i) {
          if (!panel.gather(c, q, b, h, i)) continue;  // a block that saw no key: zero gradient everywhere
          const auto rows = [&](const at::Tensor& t) {  // this block's rows of a [B, Hq, Lq, ...] tensor
            return t[b][h].narrow(0, panel.row_begin, panel.rows).to(c.compute_dtype);
          };
          // P normalised in the compute dtype, not read from the float32 lse (too coarse for float64
          // gradients); a row that sees no token has P = 0.
          const auto probs =
              panel.exps / at::where(panel.empty_row, at::ones_like(panel.row_max), panel.exps.sum(1, true));
          auto d_scores = at::zeros_like(probs);
          at::Tensor d_values_panel;
          if (has_grad_out) {
            const auto d_out = rows(grad_out);
            const auto delta = (d_out * rows(out)).sum(1, true);
            d_scores = probs * (at::mm(d_out, panel.values.t()) - delta);
            d_values_panel = at::mm(probs.t(), d_out).contiguous();
          }
          if (has_grad_lse) d_scores = d_scores + probs * rows(grad_lse).unsqueeze(1);
          dq[b][h].narrow(0, panel.row_begin, panel.rows).copy_(at::mm(d_scores, panel.keys) * c.scale);
          const auto d_keys_panel = (at::mm(d_scores.t(), panel.q_rows) * c.scale).contiguous();
          AT_DISPATCH_FLOATING_TYPES(c.compute_dtype, "psa_scatter", [&] {
            scatter_add_rows<scalar_t>(b, kv_head, panel.ranges, d_keys_panel, d_keys);
            if (has_grad_out) scatter_add_rows<scalar_t>(b, kv_head, panel.ranges, d_values_panel, d_values);
          });
        }
      }
    }
  });

  std::vector<at::Tensor> grads = {dq.to(q.scalar_type()), d_keys[0].to(k.scalar_type()),
                                   d_values[0].to(v.scalar_type())};
  for (int i = 1; i < kNumLevels; ++i) {
    grads.push_back(d_keys[i].to(pooled[2 * (i - 1)].scalar_type()));
    grads.push_back(d_values[i].to(pooled[2 * (i - 1) + 1].scalar_type()));
  }
  return grads;
}

}  // namespace psa::cpu
