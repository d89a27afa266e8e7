#include <cmath>

#include "check.h"
#include "ops.h"

namespace psa {
namespace {

// block / 4 offsets, evenly strided, each in the middle of its stride (docs/spec.md section 4: deterministic).
// On the host whatever q's device: the reference backend reads them, the CUDA kernels compute them (a null
// offsets pointer) and need no kernel of their own to fill a tensor first. Blocks are 32, 64 or 128.
at::Tensor default_sample_offsets(int64_t block) {
  return at::arange(kDefaultSampleStep / 2, block, kDefaultSampleStep, at::dtype(at::kLong));
}

at::Tensor checked_offsets(const char* name, const std::optional<at::Tensor>& offsets, int64_t block,
                           const at::Tensor& q) {
  if (!offsets.has_value()) return default_sample_offsets(block);
  const auto& t = *offsets;
  PSA_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.numel() >= 1 && t.numel() <= block,
              "psa.estimate_importance: ", name, " must be a 1-D int64 tensor of 1 to ", block,
              " offsets into a block, got ", t.scalar_type(), " of shape ", t.sizes());
  PSA_CHECK(t.device() == q.device(), "psa.estimate_importance: ", name, " must be on the device of q (",
              q.device(), "), got ", t.device());
  return t;
}

}  // namespace

EstimateArgs prepare_estimate_importance(const at::Tensor& q, const at::Tensor& k,
                                         const std::optional<at::Tensor>& q_offsets,
                                         const std::optional<at::Tensor>& k_offsets, int64_t block_m,
                                         int64_t block_n, const std::string& method, std::optional<double> scale,
                                         int64_t stride, const std::optional<at::Tensor>& k8,
                                         const std::string& precision) {
  constexpr const char* op = "psa.estimate_importance";
  check_qk(op, q, k);
  check_block_sizes(op, block_m, block_n);
  EstimateArgs args;
  args.scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  PSA_CHECK(std::isfinite(args.scale), op, ": scale must be finite, got ", args.scale);
  PSA_CHECK(!k8.has_value() || method == "pooled", op, ": k8 applies to the 'pooled' method only, got method '",
            method, "'");
  PSA_CHECK(precision == "full" || precision == "fp8", op, ": precision must be 'full' or 'fp8', got '", precision,
            "'");
  PSA_CHECK(precision == "full" || method == "antidiagonal", op, ": precision '", precision,
            "' applies to the 'antidiagonal' method only, got method '", method, "'");
  args.precision = precision == "fp8" ? EstimatePrecision::kFp8 : EstimatePrecision::kFull;
  if (method == "sampled") {
    args.method = EstimateMethod::kSampled;
    args.q_offsets = checked_offsets("q_offsets", q_offsets, block_m, q);
    args.k_offsets = checked_offsets("k_offsets", k_offsets, block_n, q);
    args.default_q_offsets = !q_offsets.has_value();
    args.default_k_offsets = !k_offsets.has_value();
    return args;
  }
  PSA_CHECK(method == "antidiagonal" || method == "pooled", op,
            ": method must be 'sampled', 'antidiagonal' or 'pooled', got '", method, "'");
  PSA_CHECK(!q_offsets.has_value() && !k_offsets.has_value(), op,
              ": q_offsets and k_offsets apply to the 'sampled' method only, got method '", method, "'");
  if (method == "antidiagonal") {
    PSA_CHECK(stride >= 1 && block_m % stride == 0 && block_n % stride == 0, op,
                ": stride must be a positive divisor of block_m and block_n, got ", stride);
    args.method = EstimateMethod::kAntidiagonal;
  } else {
    args.method = EstimateMethod::kPooled;
    if (k8.has_value()) {
      check_pooled_keys(op, "k8", *k8, k, 8);
      args.k8 = *k8;
    }
  }
  return args;
}

void check_offsets_in_block(const EstimateArgs& args, int64_t block_m, int64_t block_n) {
  const auto in_block = [](const char* name, const at::Tensor& t, int64_t block) {
    PSA_CHECK(t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < block, "psa.estimate_importance: ", name,
              " must lie in [0, ", block, "), got ", t);
  };
  in_block("q_offsets", args.q_offsets, block_m);
  in_block("k_offsets", args.k_offsets, block_n);
}

}  // namespace psa
