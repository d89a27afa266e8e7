#include "blocks.h"
#include "check.h"
#include "ops.h"

namespace psa {
namespace {

constexpr const char* kOp = "psa.assign_levels";

// int64 [B, Hkv, n_k]: the coarsest level each key block may take (docs/spec.md section 5). sim_l is the mean,
// over the groups of l keys of the block, of the cosine similarity between the group's first and last
// real key; a group of one key counts as 1. cap = max(1, every l with sim_l > t_l).
at::Tensor similarity_cap(const at::Tensor& k, int64_t block_n, at::ArrayRef<double> thresholds) {
  const int64_t k_len = k.size(2), n_k = ceil_div(k_len, block_n);
  const auto x = k.to(at::kDouble);
  const auto index = k.options().dtype(at::kLong);
  auto cap = at::ones({k.size(0), k.size(1), n_k}, index);
  int64_t level = 2;
  for (const double threshold : thresholds) {
    const auto first = at::arange(0, k_len, level, index);
    const auto last = at::clamp_max(first + (level - 1), k_len - 1);
    const auto a = x.index_select(2, first), b = x.index_select(2, last);
    const auto cosine = (a * b).sum(-1) / at::clamp_min(a.norm(2, -1) * b.norm(2, -1), 1e-12);
    const auto group_block = at::div(first, block_n, "floor");
    const auto sums = at::zeros({k.size(0), k.size(1), n_k}, x.options()).index_add_(2, group_block, cosine);
    const auto groups = at::zeros({n_k}, x.options()).index_add_(0, group_block, at::ones_like(cosine[0][0]));
    cap = at::where(sums / groups > threshold, at::clamp_min(cap, level), cap);
    level *= 2;
  }
  return cap;
}

// Undefined where no mask was given (the backends then force nothing): no all-false tensors to fill
// on every call.
at::Tensor blocks_or_none(const std::optional<at::Tensor>& mask, int64_t batch, int64_t length, int64_t block) {
  return mask.has_value() ? positions_to_blocks(*mask, batch, length, block) : at::Tensor();
}

}  // namespace

AssignArgs prepare_assign_levels(const at::Tensor& scores, const std::optional<at::Tensor>& force_keys,
                                 const std::optional<at::Tensor>& force_queries, const std::optional<at::Tensor>& k,
                                 const std::string& mode, at::ArrayRef<double> bounds, int64_t block_m,
                                 int64_t block_n, int64_t q_len, int64_t k_len, double min_full,
                                 std::optional<at::ArrayRef<double>> sim_thresholds) {
  check_block_sizes(kOp, block_m, block_n);
  PSA_CHECK(q_len >= 1 && k_len >= 1, kOp, ": q_len and k_len must be positive, got ", q_len, " and ", k_len);
  PSA_CHECK(scores.dim() == 4 && at::isFloatingType(scores.scalar_type()), kOp,
              ": scores must be a floating tensor [B, Hq, n_q, n_k], got ", scores.scalar_type(), " of shape ",
              scores.sizes());
  const int64_t batch = scores.size(0), q_heads = scores.size(1);
  const int64_t n_q = ceil_div(q_len, block_m), n_k = ceil_div(k_len, block_n);
  PSA_CHECK(scores.size(2) == n_q && scores.size(3) == n_k, kOp,
              ": scores must have n_q = ceil(q_len/block_m) = ", n_q, " and n_k = ceil(k_len/block_n) = ", n_k,
              " in its last two dims, got shape ", scores.sizes());
  PSA_CHECK(mode == "topk" || mode == "threshold", kOp, ": mode must be 'topk' or 'threshold', got '", mode, "'");
  PSA_CHECK(bounds.size() == 4, kOp, ": bounds must hold 4 values (e1, e2, e4, e8), got ", bounds);
  for (size_t i = 0; i < bounds.size(); ++i) {
    PSA_CHECK(bounds[i] >= 0.0 && bounds[i] <= 1.0 && (i == 0 || bounds[i - 1] <= bounds[i]), kOp,
                ": bounds must be non-decreasing values in [0, 1], got ", bounds);
  }
  PSA_CHECK(min_full >= 0.0 && min_full <= 1.0, kOp, ": min_full must lie in [0, 1], got ", min_full);
  check_position_mask(kOp, "force_keys", force_keys, batch, k_len, scores.device());
  check_position_mask(kOp, "force_queries", force_queries, batch, q_len, scores.device());

  AssignArgs args;
  args.threshold_mode = mode == "threshold";
  if (sim_thresholds.has_value()) {
    PSA_CHECK(sim_thresholds->size() == 3, kOp, ": sim_thresholds must hold 3 values (t2, t4, t8), got ",
                *sim_thresholds);
    PSA_CHECK(k.has_value() && k->defined(), kOp, ": the similarity cap (sim_thresholds) needs k");
    PSA_CHECK(k->dim() == 4 && k->size(0) == batch && k->size(2) == k_len && k->size(1) >= 1 &&
                    q_heads % k->size(1) == 0,
                kOp, ": k must be [B=", batch, ", Hkv dividing ", q_heads, ", Lk=", k_len, ", D], got ", k->sizes());
    PSA_CHECK(k->device() == scores.device(), kOp, ": k must be on the device of scores (", scores.device(),
                "), got ", k->device());
    args.cap = similarity_cap(*k, block_n, *sim_thresholds);
  }
  args.force_key_blocks = blocks_or_none(force_keys, batch, k_len, block_n);
  args.force_query_blocks = blocks_or_none(force_queries, batch, q_len, block_m);
  return args;
}

void check_scores_non_negative(const at::Tensor& scores) {
  PSA_CHECK(!(scores < 0).any().item<bool>(), kOp,
            ": scores must be non-negative (NaN or inf in a row makes that row dense, docs/spec.md section 5)");
}

}  // namespace psa
