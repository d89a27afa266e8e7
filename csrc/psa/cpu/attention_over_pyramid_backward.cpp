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
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), k_len = k.size(2);
  const int64_t n_q = ceil_div(q_len, block_m), n_k = ceil_div(k_len, block_n);
  const int64_t group = q_heads / kv_heads;
  const int64_t causal_offset = k_len - q_len;
  const auto compute_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto compute = q.options().dtype(compute_dtype);
  const std::vector<LevelTensors> pyramid = pyramid_levels(k, v, pooled, compute_dtype);

  auto dq = at::zeros(q.sizes(), compute);
  std::vector<at::Tensor> d_keys, d_values;
  for (const auto& level : pyramid) {
    d_keys.push_back(at::zeros_like(level.k));
    d_values.push_back(at::zeros_like(level.v));
  }
  const auto level_map = levels.contiguous();
  const int8_t* level_data = level_map.data_ptr<int8_t>();
  const bool has_grad_out = grad_out.defined(), has_grad_lse = grad_lse.defined();

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<TokenRange> ranges;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, kv_head = task % kv_heads;
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        for (int64_t i = 0; i < n_q; ++i) {
          const int64_t row_begin = i * block_m, rows = std::min(block_m, q_len - row_begin);
          const int64_t tokens =
              visible_ranges(level_data + ((b * q_heads + h) * n_q + i) * n_k, n_k, block_n, pyramid, ranges);
          if (tokens == 0) continue;  // a row that saw no key: zero gradient everywhere

          auto keys = at::empty({tokens, dim}, compute);
          auto values = at::empty({tokens, dim}, compute);
          AT_DISPATCH_FLOATING_TYPES(compute_dtype, "psa_gather", [&] {
            gather_rows<scalar_t>(b, kv_head, ranges, pyramid, true, keys);
            gather_rows<scalar_t>(b, kv_head, ranges, pyramid, false, values);
          });
          const auto q_rows = q[b][h].narrow(0, row_begin, rows).to(compute_dtype);
          const auto logits =
              panel_logits(q_rows, keys, ranges, pyramid, scale, causal, row_begin, causal_offset);
          // P from the logits in the compute dtype, not from the float32 lse (too coarse for float64
          // gradients); a row that sees no token (max -inf) gets P = 0.
          const auto row_max = std::get<0>(logits.max(1, true));
          const auto empty_row = at::eq(row_max, -std::numeric_limits<double>::infinity());
          const auto exps = at::exp(logits - at::where(empty_row, at::zeros_like(row_max), row_max));
          const auto probs = exps / at::where(empty_row, at::ones_like(row_max), exps.sum(1, true));
          auto d_scores = at::zeros_like(probs);
          at::Tensor d_values_panel;
          if (has_grad_out) {
            const auto d_out = grad_out[b][h].narrow(0, row_begin, rows).to(compute_dtype);
            const auto delta = (d_out * out[b][h].narrow(0, row_begin, rows).to(compute_dtype)).sum(1, true);
            d_scores = probs * (at::mm(d_out, values.t()) - delta);
            d_values_panel = at::mm(probs.t(), d_out);
          }
          if (has_grad_lse) {
            d_scores = d_scores + probs * grad_lse[b][h].narrow(0, row_begin, rows).to(compute_dtype).unsqueeze(1);
          }
          dq[b][h].narrow(0, row_begin, rows).copy_(at::mm(d_scores, keys) * scale);
          const auto d_keys_panel = (at::mm(d_scores.t(), q_rows) * scale).contiguous();
          AT_DISPATCH_FLOATING_TYPES(compute_dtype, "psa_scatter", [&] {
            scatter_add_rows<scalar_t>(b, kv_head, ranges, d_keys_panel, d_keys);
            if (has_grad_out) scatter_add_rows<scalar_t>(b, kv_head, ranges, d_values_panel.contiguous(), d_values);
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
