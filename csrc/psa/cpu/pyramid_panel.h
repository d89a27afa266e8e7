// What the CPU attention kernels (forward and backward) share: the pyramid in the compute dtype with
// each token's bias and last covered key, and a query block's visible tokens as runs of consecutive
// tokens of one level (docs/spec.md section 3), gathered into one contiguous [tokens, D] panel so that
// the block is a few matmuls.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
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

}  // namespace psa::cpu
