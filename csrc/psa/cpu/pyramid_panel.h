// What the CPU attention kernels (forward and backward) share: the pyramid in the compute dtype with
// each token's bias and last covered key, and a query block's visible tokens as runs of consecutive
// tokens of one level (docs/spec.md section 3), gathered into one contiguous [tokens, D] panel so that
// the block is a few matmuls.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <limits>
#include <vector>

namespace psa::cpu {

constexpr int kNumLevels = 4;
constexpr int64_t kLevels[kNumLevels] = {1, 2, 4, 8};

// Index of a level value in kLevels, -1 for 0 (skipped).
inline int level_index(int8_t level) {
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

// pooled = {k2, v2, k4, v4, k8, v8}.
inline std::vector<LevelTensors> pyramid_levels(const at::Tensor& k, const at::Tensor& v,
                                                const std::vector<at::Tensor>& pooled, at::ScalarType compute) {
  const int64_t k_len = k.size(2);
  std::vector<LevelTensors> pyramid(kNumLevels);
  for (int i = 0; i < kNumLevels; ++i) {
    const int64_t level = kLevels[i];
    auto& p = pyramid[i];
    p.k = (i == 0 ? k : pooled[2 * (i - 1)]).to(compute).contiguous();
    p.v = (i == 0 ? v : pooled[2 * (i - 1) + 1]).to(compute).contiguous();
    const auto first = at::arange(0, k_len, level, k.options().dtype(at::kLong));
    const auto last = at::clamp_max(first + (level - 1), k_len - 1);
    p.bias = at::log((last - first + 1).to(compute));
    p.last_position = last;
  }
  return pyramid;
}

// A run of tokens [begin, end) of one level, taken into the panel as a unit.
struct TokenRange {
  int level;
  int64_t begin, end;
};

// The runs a level-map row selects (consecutive key blocks at one level are one run) and their total.
inline int64_t visible_ranges(const int8_t* level_row, int64_t n_k, int64_t block_n,
                              const std::vector<LevelTensors>& pyramid, std::vector<TokenRange>& ranges) {
  ranges.clear();
  int64_t tokens = 0;
  for (int64_t j = 0; j < n_k; ++j) {
    const int level = level_index(level_row[j]);
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
  return tokens;
}

// The runs' rows of K (is_key) or V of (batch, kv_head) into dst [tokens, D].
template <typename scalar_t>
void gather_rows(int64_t batch, int64_t kv_head, const std::vector<TokenRange>& ranges,
                 const std::vector<LevelTensors>& pyramid, bool is_key, at::Tensor& dst) {
  const int64_t dim = dst.size(1);
  scalar_t* out = dst.data_ptr<scalar_t>();
  int64_t row = 0;
  for (const auto& range : ranges) {
    const at::Tensor& level = is_key ? pyramid[range.level].k : pyramid[range.level].v;
    const scalar_t* base =
        level.data_ptr<scalar_t>() + ((batch * level.size(1) + kv_head) * level.size(2) + range.begin) * dim;
    std::memcpy(out + row * dim, base, (range.end - range.begin) * dim * sizeof(scalar_t));
    row += range.end - range.begin;
  }
}

// The reverse of gather_rows: src [tokens, D] added into the runs' rows of per-level gradients
// (`grads[level]`, contiguous [B, Hkv, T_level, D]).
template <typename scalar_t>
void scatter_add_rows(int64_t batch, int64_t kv_head, const std::vector<TokenRange>& ranges, const at::Tensor& src,
                      std::vector<at::Tensor>& grads) {
  const int64_t dim = src.size(1);
  const scalar_t* in = src.data_ptr<scalar_t>();
  int64_t row = 0;
  for (const auto& range : ranges) {
    at::Tensor& level = grads[range.level];
    scalar_t* base =
        level.data_ptr<scalar_t>() + ((batch * level.size(1) + kv_head) * level.size(2) + range.begin) * dim;
    const int64_t count = (range.end - range.begin) * dim;
    for (int64_t e = 0; e < count; ++e) base[e] += in[row * dim + e];
    row += range.end - range.begin;
  }
}

// Per panel token: its bias (`bias`) or its last covered key position.
inline at::Tensor gather_vector(const std::vector<TokenRange>& ranges, const std::vector<LevelTensors>& pyramid,
                                bool bias) {
  std::vector<at::Tensor> parts;
  parts.reserve(ranges.size());
  for (const auto& range : ranges) {
    const auto& level = pyramid[range.level];
    parts.push_back((bias ? level.bias : level.last_position).narrow(0, range.begin, range.end - range.begin));
  }
  return at::cat(parts);
}

// The logits of `rows` query rows from row_begin against a panel: scale q K^T + bias, -inf where the
// causal mask hides a token.
inline at::Tensor panel_logits(const at::Tensor& q_rows, const at::Tensor& keys, const std::vector<TokenRange>& ranges,
                               const std::vector<LevelTensors>& pyramid, double scale, bool causal, int64_t row_begin,
                               int64_t causal_offset) {
  auto logits = at::addmm(gather_vector(ranges, pyramid, true).unsqueeze(0), q_rows, keys.t(), 1.0, scale);
  if (causal) {
    const auto row_positions = at::arange(row_begin, row_begin + q_rows.size(0), q_rows.options().dtype(at::kLong));
    const auto hidden =
        gather_vector(ranges, pyramid, false).unsqueeze(0) > (row_positions + causal_offset).unsqueeze(1);
    logits.masked_fill_(hidden, -std::numeric_limits<double>::infinity());
  }
  return logits;
}

// What both kernels derive from their inputs before walking query blocks: sizes, the compute dtype
// (float64 for float64 inputs, else float32), the pyramid in it and the level map.
struct PanelContext {
  int64_t batch, q_heads, q_len, dim, kv_heads, k_len, n_q, n_k, group, block_m, block_n, causal_offset;
  at::ScalarType compute_dtype;
  at::TensorOptions compute;
  double scale;
  bool causal;
  std::vector<LevelTensors> pyramid;
  at::Tensor level_map;  // contiguous int8 [B, Hq, n_q, n_k]

  PanelContext(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<at::Tensor>& pooled,
               const at::Tensor& levels, int64_t block_m_, int64_t block_n_, double scale_, bool causal_)
      : batch(q.size(0)),
        q_heads(q.size(1)),
        q_len(q.size(2)),
        dim(q.size(3)),
        kv_heads(k.size(1)),
        k_len(k.size(2)),
        n_q((q_len + block_m_ - 1) / block_m_),
        n_k((k_len + block_n_ - 1) / block_n_),
        group(q_heads / kv_heads),
        block_m(block_m_),
        block_n(block_n_),
        causal_offset(k_len - q_len),
        compute_dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
        compute(q.options().dtype(compute_dtype)),
        scale(scale_),
        causal(causal_),
        pyramid(pyramid_levels(k, v, pooled, compute_dtype)),
        level_map(levels.contiguous()) {}
};

// One query block (batch b, query head h, block i) over its panel: the gathered keys and values, its
// query rows and exp(logits - row max) in the compute dtype. A row that sees no token (max -inf) has
// `empty_row` set and exps 0; a +inf or NaN max (overflowing or non-finite inputs) gives NaN, as dense
// attention does.
struct QueryBlockPanel {
  int64_t row_begin, rows;
  std::vector<TokenRange> ranges;
  at::Tensor keys, values, q_rows, row_max, empty_row, exps;

  // Fills the panel; false (and nothing gathered) when the block sees no token at all.
  bool gather(const PanelContext& c, const at::Tensor& q, int64_t b, int64_t h, int64_t i) {
    row_begin = i * c.block_m;
    rows = std::min(c.block_m, c.q_len - row_begin);
    const int8_t* level_row = c.level_map.data_ptr<int8_t>() + ((b * c.q_heads + h) * c.n_q + i) * c.n_k;
    const int64_t tokens = visible_ranges(level_row, c.n_k, c.block_n, c.pyramid, ranges);
    if (tokens == 0) return false;
    keys = at::empty({tokens, c.dim}, c.compute);
    values = at::empty({tokens, c.dim}, c.compute);
    AT_DISPATCH_FLOATING_TYPES(c.compute_dtype, "psa_gather", [&] {
      gather_rows<scalar_t>(b, h / c.group, ranges, c.pyramid, true, keys);
      gather_rows<scalar_t>(b, h / c.group, ranges, c.pyramid, false, values);
    });
    q_rows = q[b][h].narrow(0, row_begin, rows).to(c.compute_dtype);
    const auto logits =
        panel_logits(q_rows, keys, ranges, c.pyramid, c.scale, c.causal, row_begin, c.causal_offset);
    row_max = std::get<0>(logits.max(1, true));
    empty_row = at::eq(row_max, -std::numeric_limits<double>::infinity());
    exps = at::exp(logits - at::where(empty_row, at::zeros_like(row_max), row_max));
    return true;
  }
};

}  // namespace psa::cpu
