// CPU reference kernel of attention over a level map (docs/spec.md section 3).
//
// For each (batch, head, query block) the visible tokens of every level are gathered into one
// contiguous key/value panel, so that the block is one softmax over two matmuls. Consecutive key
// blocks at the same level are contiguous in that level's tensor and are copied as one range.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "../check.h"
#include "../ops.h"

namespace psa::cpu {
namespace {

constexpr int kNumLevels = 4;
constexpr int64_t kLevels[kNumLevels] = {1, 2, 4, 8};

int level_index(int8_t level) {
  switch (level) {
    case 1: return 0;
    case 2: return 1;
    case 4: return 2;
    case 8: return 3;
    default: return -1;
  }
}

// One level of the pyramid, ready to gather from: contiguous [B, Hkv, T, D] in the compute dtype.
struct LevelTensors {
  at::Tensor k, v;
  at::Tensor bias;           // [T]  ln(number of original keys the token covers)
  at::Tensor last_position;  // [T]  last original key position the token covers
};

// A run of tokens [begin, end) of one level, taken into the panel as a unit.
struct TokenRange {
  int level;
  int64_t begin, end;
};

template <typename scalar_t>
void gather_rows(int64_t batch, int64_t head, const std::vector<TokenRange>& ranges,
                 const std::vector<LevelTensors>& pyramid, bool is_key, at::Tensor& dst) {
  const int64_t dim = dst.size(1);
  scalar_t* out = dst.data_ptr<scalar_t>();
  int64_t row = 0;
  for (const auto& range : ranges) {
    const at::Tensor& level = is_key ? pyramid[range.level].k : pyramid[range.level].v;
    const scalar_t* base = level.data_ptr<scalar_t>() +
                           ((batch * level.size(1) + head) * level.size(2) + range.begin) * dim;
    std::memcpy(out + row * dim, base, (range.end - range.begin) * dim * sizeof(scalar_t));
    row += range.end - range.begin;
  }
}

at::Tensor gather_vector(const std::vector<TokenRange>& ranges, const std::vector<LevelTensors>& pyramid,
                         bool bias) {
  std::vector<at::Tensor> parts;
  parts.reserve(ranges.size());
  for (const auto& range : ranges) {
    const auto& level = pyramid[range.level];
    parts.push_back((bias ? level.bias : level.last_position).narrow(0, range.begin, range.end - range.begin));
  }
  return at::cat(parts);
}

}  // namespace

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

  std::vector<LevelTensors> pyramid(kNumLevels);
  for (int i = 0; i < kNumLevels; ++i) {
    const int64_t level = kLevels[i];
    auto& p = pyramid[i];
    p.k = (i == 0 ? k : pooled[2 * (i - 1)]).to(compute_dtype).contiguous();
    p.v = (i == 0 ? v : pooled[2 * (i - 1) + 1]).to(compute_dtype).contiguous();
    const auto first = at::arange(0, k_len, level, compute.dtype(at::kLong));
    const auto last = at::clamp_max(first + (level - 1), k_len - 1);
    p.bias = at::log((last - first + 1).to(compute_dtype));
    p.last_position = last;
  }

  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({batch, q_heads, q_len}, q.options().dtype(at::kFloat));
  const auto level_map = levels.contiguous();
  const int8_t* level_data = level_map.data_ptr<int8_t>();

  at::parallel_for(0, batch * q_heads * n_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (q_heads * n_q), h = task / n_q % q_heads, i = task % n_q;
      const int64_t row_begin = i * block_m, rows = std::min(block_m, q_len - row_begin);
      auto out_rows = out[b][h].narrow(0, row_begin, rows);
      auto lse_rows = lse[b][h].narrow(0, row_begin, rows);

      std::vector<TokenRange> ranges;
      int64_t tokens = 0;
      for (int64_t j = 0; j < n_k; ++j) {
        const int level = level_index(level_data[task * n_k + j]);
        if (level < 0) continue;
        const int64_t per_block = block_n / kLevels[level];
        const int64_t first = j * per_block;
        const int64_t last = std::min(first + per_block, pyramid[level].k.size(2));
        if (!ranges.empty() && ranges.back().level == level && ranges.back().end == first) {
          ranges.back().end = last;
        } else {
          ranges.push_back({level, first, last});
        }
        tokens += last - first;
      }
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
      auto logits = at::addmm(gather_vector(ranges, pyramid, true).unsqueeze(0),
                              q[b][h].narrow(0, row_begin, rows).to(compute_dtype), keys.t(), 1.0, scale);
      if (causal) {
        const auto row_positions = at::arange(row_begin, row_begin + rows, compute.dtype(at::kLong));
        const auto hidden = gather_vector(ranges, pyramid, false).unsqueeze(0) >
                            (row_positions + causal_offset).unsqueeze(1);
        logits.masked_fill_(hidden, -std::numeric_limits<double>::infinity());
      }
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
