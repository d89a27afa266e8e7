// The three block-importance estimators (docs/spec.md section 4) as device-generic ATen code: the CPU
// backend's kernels and the CUDA backend's fallback for what its fused kernel does not cover. The
// logits of a few query blocks at a time are materialised, so memory stays bounded at any length;
// nothing here reads a device value on the host, so on CUDA it runs without a synchronisation.
#include <algorithm>
#include <limits>
#include <tuple>
#include <utility>

#include "../blocks.h"
#include "../check.h"
#include "../ops.h"

namespace psa::aten {
namespace {

// Elements of logits materialised at once (128 MiB of fp32).
constexpr int64_t kChunkElements = int64_t{1} << 25;

at::ScalarType compute_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Query blocks per chunk so that one chunk's logits stay under kChunkElements.
int64_t blocks_per_chunk(int64_t rows_per_block, int64_t columns, int64_t batch_heads) {
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, rows_per_block * columns * batch_heads));
}

at::Tensor repeat_kv_heads(const at::Tensor& x, int64_t q_heads) {
  return x.repeat_interleave(q_heads / x.size(1), 1);
}

// Rows j*block + offsets of every block, clamped into the last (possibly partial) block.
at::Tensor sample_positions(int64_t length, int64_t block, const at::Tensor& offsets) {
  const auto starts = at::arange(0, length, block, offsets.options());
  return at::clamp_max(starts.unsqueeze(1) + offsets.unsqueeze(0), length - 1).flatten();
}

// Sums over blocks of `block` consecutive rows: [B, H, ceil(L/block), D].
at::Tensor block_sums(const at::Tensor& x, int64_t block) {
  const int64_t length = x.size(2), blocks = ceil_div(length, block);
  return at::constant_pad_nd(x, {0, 0, 0, blocks * block - length}).unflatten(2, {blocks, block}).sum(3);
}

// Means over blocks of consecutive rows (real rows only): [B, H, ceil(L/block), D].
at::Tensor block_means(const at::Tensor& x, int64_t block) {
  return block_sums(x, block) / group_counts(x.size(2), block, x.options()).unsqueeze(-1);
}

// The pooled estimator's key means (docs/spec.md section 4): key block j's level-8 keys k8, each
// weighted by how many of the k_len keys it covers, in `dtype`.
at::Tensor key_block_means(const at::Tensor& k8, int64_t k_len, int64_t block_n, at::ScalarType dtype) {
  const auto options = k8.options().dtype(dtype);
  const auto weighted = k8.to(dtype) * group_counts(k_len, 8, options).unsqueeze(-1);
  return block_sums(weighted, block_n / 8) / group_counts(k_len, block_n, options).unsqueeze(-1);
}

// Softmax over the last dim that leaves rows whose logits are all -inf (nothing visible) at zero
// instead of NaN; a NaN logit still makes its row NaN, as dense attention would.
at::Tensor masked_softmax(const at::Tensor& logits) {
  const auto has_key = logits.ne(-std::numeric_limits<double>::infinity()).any(-1, true);
  return at::where(has_key, at::softmax(logits, -1), at::zeros_like(logits));
}

}  // namespace

at::Tensor estimate_sampled(const at::Tensor& q, const at::Tensor& k, int64_t block_m, int64_t block_n,
                            double scale, bool causal, const at::Tensor& q_offsets, const at::Tensor& k_offsets) {
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), k_len = k.size(2);
  const int64_t n_q = ceil_div(q_len, block_m), n_k = ceil_div(k_len, block_n);
  const int64_t q_samples = q_offsets.numel(), k_samples = k_offsets.numel();
  const auto dtype = compute_dtype(q);
  const auto q_rows = q.index_select(2, sample_positions(q_len, block_m, q_offsets)).to(dtype);
  const auto k_rows = repeat_kv_heads(k.index_select(2, sample_positions(k_len, block_n, k_offsets)), q_heads)
                          .to(dtype).transpose(-1, -2);               // [B, Hq, D, n_k * s_k]
  const auto hidden = candidate_blocks(q_len, k_len, block_m, block_n, causal, q.options()).logical_not();

  auto relative = at::empty({batch, q_heads, n_q, n_k}, q.options().dtype(dtype));
  const int64_t chunk = blocks_per_chunk(q_samples, n_k * k_samples, batch * q_heads);
  for (int64_t first = 0; first < n_q; first += chunk) {
    const int64_t blocks = std::min(chunk, n_q - first);
    auto logits = at::matmul(q_rows.narrow(2, first * q_samples, blocks * q_samples), k_rows).mul_(scale);
    // [B, Hq, blocks * s_q, n_k]: per sampled row, the max logit within each key block.
    auto block_max = logits.unflatten(-1, {n_k, k_samples}).amax(-1);
    block_max.masked_fill_(hidden.narrow(0, first, blocks).repeat_interleave(q_samples, 0),
                           -std::numeric_limits<double>::infinity());
    auto row_max = block_max.amax(-1, true);
    row_max.masked_fill_(at::isinf(row_max), 0.0);
    relative.narrow(2, first, blocks).copy_((block_max - row_max).exp_().unflatten(2, {blocks, q_samples}).amax(3));
  }
  return normalize_rows(relative).to(at::kFloat);
}

// The FP8 scoring's quantization (docs/spec.md section 4): x [B, H, L, D] to float8 e4m3 values with a
// float32 scale per group of `stride` tokens: (values as `dtype` [B, H, L, D], scales [B, H, ceil(L / S)]).
// e4m3 values are exact in every floating dtype, 16-bit ones included.
std::pair<at::Tensor, at::Tensor> quantize_anti_rows(const at::Tensor& x, int64_t stride, at::ScalarType dtype) {
  constexpr double kE4m3Max = 448.0;
  const int64_t length = x.size(2), groups = ceil_div(length, stride);
  const auto padded =
      at::constant_pad_nd(x.to(at::kFloat), {0, 0, 0, groups * stride - length}).unflatten(2, {groups, stride});
  const auto peak = padded.abs().amax({3, 4});
  // Tensor operands: ATen multiplies by the reciprocal of a host scalar divisor on CUDA, which is not
  // the quotient.
  const auto e4m3_max = at::scalar_tensor(kE4m3Max, peak.options());
  const auto one = at::ones_like(peak);
  const auto scales = at::where(peak == 0, one, peak / e4m3_max);
  auto multipliers = at::where(peak == 0, one, e4m3_max / peak);
  const auto finite_max = at::scalar_tensor(std::numeric_limits<float>::max(), peak.options());
  multipliers = at::where(multipliers > finite_max, finite_max, multipliers);  // NaN stays NaN
  const auto values = padded.mul(multipliers.unsqueeze(-1).unsqueeze(-1)).to(at::kFloat8_e4m3fn).to(dtype);
  return {values.flatten(2, 3).narrow(2, 0, length), scales};
}

at::Tensor estimate_antidiagonal(const at::Tensor& q_in, const at::Tensor& k_in, int64_t block_m, int64_t block_n,
                                 double scale, bool causal, int64_t stride, EstimatePrecision precision) {
  const int64_t batch = q_in.size(0), q_heads = q_in.size(1), q_len = q_in.size(2), k_len = k_in.size(2);
  const int64_t n_q = ceil_div(q_len, block_m), n_k = ceil_div(k_len, block_n);
  const int64_t q_tiles = ceil_div(q_len, stride), k_tiles = ceil_div(k_len, stride);
  const int64_t rows_per_block = block_m / stride, cols_per_block = block_n / stride;
  const auto dtype = compute_dtype(q_in);
  // On CUDA, 16-bit inputs stay 16-bit for the GEMM, with float32 output: tensor cores multiply them
  // exactly and sum in float32, as the float32 GEMM of the converted values does, at ~10x its rate.
  const bool half_gemm = q_in.is_cuda() && (q_in.scalar_type() == at::kBFloat16 || q_in.scalar_type() == at::kHalf);
  const auto gemm_dtype = half_gemm ? q_in.scalar_type() : dtype;
  // FP8 scoring: the GEMM multiplies the e4m3 values; the logits take the groups' scales after it.
  const bool fp8 = precision == EstimatePrecision::kFp8;
  at::Tensor q = q_in, k = k_in, q_scales, k_scales;
  if (fp8) {
    std::tie(q, q_scales) = quantize_anti_rows(q_in, stride, gemm_dtype);
    std::tie(k, k_scales) = quantize_anti_rows(k_in, stride, gemm_dtype);
    // Padded tile rows get scale 1 (they see nothing); keys' scales per query head, as k_anti's columns.
    q_scales = at::constant_pad_nd(q_scales.to(dtype), {0, n_q * rows_per_block - q_tiles}, 1.0);
    k_scales = repeat_kv_heads(k_scales.to(dtype), q_heads);
  }
  // Row i' of q_anti holds q[S*i' + S-1-t] for t = 0..S-1 and row j' of k_anti holds k[S*j' + t]: their
  // dot product is the sum of the antidiagonal of tile (i', j') of Q K^T. Zero padding adds nothing.
  const auto q_anti = at::constant_pad_nd(q.to(gemm_dtype), {0, 0, 0, n_q * block_m - q_len})
                          .unflatten(2, {n_q * rows_per_block, stride}).flip(3).flatten(3);
  const auto k_anti = repeat_kv_heads(at::constant_pad_nd(k.to(gemm_dtype), {0, 0, 0, k_tiles * stride - k_len})
                                          .unflatten(2, {k_tiles, stride}).flatten(3), q_heads)
                          .transpose(-1, -2);                         // [B, Hq, S*D, k_tiles]
  const auto antidiagonal_sums = [&](const at::Tensor& rows) {
    if (!half_gemm) return at::matmul(rows, k_anti);
    return at::bmm(rows.flatten(0, 1), k_anti.flatten(0, 1), at::kFloat).unflatten(0, {batch, q_heads});
  };
  const auto tile_index = q.options().dtype(at::kLong);
  const auto last_query = at::clamp_max(at::arange(1, n_q * rows_per_block + 1, tile_index) * stride, q_len) - 1;
  const auto first_key = at::arange(k_tiles, tile_index) * stride;
  // Padded tile rows (past the last query) see nothing; causal tiles see keys up to the diagonal.
  auto visible = (at::arange(n_q * rows_per_block, tile_index) < q_tiles).unsqueeze(1).expand({-1, k_tiles});
  if (causal) visible = visible & (first_key.unsqueeze(0) <= (last_query + (k_len - q_len)).unsqueeze(1));

  auto sums = at::empty({batch, q_heads, n_q, n_k}, q_in.options().dtype(dtype));
  const int64_t chunk = blocks_per_chunk(rows_per_block, k_tiles, batch * q_heads);
  for (int64_t first = 0; first < n_q; first += chunk) {
    const int64_t blocks = std::min(chunk, n_q - first);
    const int64_t tile_rows = blocks * rows_per_block;
    auto logits = antidiagonal_sums(q_anti.narrow(2, first * rows_per_block, tile_rows));
    if (fp8) {
      logits.mul_(q_scales.narrow(2, first * rows_per_block, tile_rows).unsqueeze(-1)).mul_(k_scales.unsqueeze(-2));
    }
    logits.mul_(scale / stride);
    logits.masked_fill_(visible.narrow(0, first * rows_per_block, tile_rows).logical_not(),
                        -std::numeric_limits<double>::infinity());
    const auto probs = at::constant_pad_nd(masked_softmax(logits), {0, n_k * cols_per_block - k_tiles});
    sums.narrow(2, first, blocks)
        .copy_(probs.unflatten(3, {n_k, cols_per_block}).sum(4).unflatten(2, {blocks, rows_per_block}).sum(3));
  }
  return normalize_rows(sums).to(at::kFloat);
}

at::Tensor estimate_pooled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k8, int64_t block_m,
                           int64_t block_n, double scale, bool causal) {
  const auto dtype = compute_dtype(q);
  const auto q_mean = block_means(q.to(dtype), block_m);
  const auto level8 = k8.defined() ? k8 : pool_levels(k)[2];
  const auto k_mean = repeat_kv_heads(key_block_means(level8, k.size(2), block_n, dtype), q.size(1));
  auto logits = at::matmul(q_mean, k_mean.transpose(-1, -2)).mul_(scale);
  const auto candidates = candidate_blocks(q.size(2), k.size(2), block_m, block_n, causal, q.options());
  logits.masked_fill_(candidates.logical_not(), -std::numeric_limits<double>::infinity());
  return masked_softmax(logits).to(at::kFloat);
}

}  // namespace psa::aten
