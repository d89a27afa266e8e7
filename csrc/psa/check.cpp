#include "check.h"

#include <cmath>
#include <cstdio>

namespace psa {
namespace detail {

std::string text(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", value);
  return buffer;
}

template <typename T>
std::string join(at::ArrayRef<T> values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + text(values[i]);
  return out + "]";
}

std::string text(at::IntArrayRef values) { return join(values); }
std::string text(at::ArrayRef<double> values) { return join(values); }

std::string text(const at::Tensor& values) {
  const auto flat = values.flatten().narrow(0, 0, std::min<int64_t>(values.numel(), 8)).to(at::kCPU, at::kLong);
  std::vector<int64_t> items(flat.data_ptr<int64_t>(), flat.data_ptr<int64_t>() + flat.numel());
  return text(items);
}

}  // namespace detail

namespace {

bool is_supported_dtype(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  if (t.is_cuda()) return dtype == at::kBFloat16 || dtype == at::kHalf;
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// `like` (named `like_name`) is the argument whose device and dtype every other one must share.
void check_tensor(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                  const at::Tensor& like) {
  PSA_CHECK(t.dim() == 4, op, ": ", name, " must have 4 dims [B, H, L, D], got shape ", t.sizes());
  PSA_CHECK(t.device() == like.device(), op, ": ", name, " must be on the same device as ", like_name, " (",
              like.device(), "), got ", t.device());
  PSA_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the same dtype as ", like_name,
              " (", like.scalar_type(), "), got ", t.scalar_type());
  PSA_CHECK(t.size(-1) == 0 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dim (stride 1), got strides ", t.strides());
  PSA_CHECK(t.size(2) >= 1, op, ": ", name, " must hold at least one token, got shape ", t.sizes());
}

// The dtype and head_dim the backend of `t`'s device supports.
void check_dtype_and_head_dim(const char* op, const char* name, const at::Tensor& t) {
  PSA_CHECK(is_supported_dtype(t), op, ": ", name, " must be ",
              t.is_cuda() ? "bfloat16 or float16 on CUDA" : "float32, float64, bfloat16 or float16 on the CPU",
              ", got ", t.scalar_type());
  if (t.is_cuda()) {
    PSA_CHECK(t.size(3) == 64 || t.size(3) == 128, op, ": head_dim must be 64 or 128 on CUDA, got ", t.size(3));
  } else {
    PSA_CHECK(t.size(3) >= 1, op, ": head_dim must be positive, got ", t.size(3));
  }
}

}  // namespace

bool is_supported_block_size(int64_t block) { return block == 32 || block == 64 || block == 128; }

void check_qk(const char* op, const at::Tensor& q, const at::Tensor& k) {
  check_tensor(op, "q", q, "q", q);
  check_tensor(op, "k", k, "q", q);
  check_dtype_and_head_dim(op, "q", q);
  PSA_CHECK(k.size(0) == q.size(0), op, ": k must have the batch size of q (", q.size(0), "), got ",
              k.size(0));
  PSA_CHECK(q.size(1) >= 1, op, ": q must have at least one head (dim 1 of [B, H, L, D]), got ", q.size(1));
  PSA_CHECK(k.size(1) >= 1, op, ": k must have at least one head (dim 1 of [B, H, L, D]), got ", k.size(1));
  PSA_CHECK(q.size(1) % k.size(1) == 0, op,
              ": the head count of q must be a multiple of that of k (GQA), got ", q.size(1), " and ", k.size(1));
  PSA_CHECK(k.size(3) == q.size(3), op, ": k must have the head_dim of q (", q.size(3), "), got ", k.size(3));
}

namespace {

void check_kv(const char* op, const at::Tensor& k, const at::Tensor& v, const char* like_name,
              const at::Tensor& like) {
  check_tensor(op, "v", v, like_name, like);
  PSA_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k (", k.sizes(), "), got ", v.sizes());
}

}  // namespace

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qk(op, q, k);
  check_kv(op, k, v, "q", q);
}

void check_pyramid_inputs(const char* op, const at::Tensor& k, const at::Tensor& v) {
  check_tensor(op, "k", k, "k", k);
  check_dtype_and_head_dim(op, "k", k);
  check_kv(op, k, v, "k", k);
}

void check_block_sizes(const char* op, int64_t block_m, int64_t block_n) {
  PSA_CHECK(is_supported_block_size(block_m), op, ": block_m must be 32, 64 or 128, got ", block_m);
  PSA_CHECK(is_supported_block_size(block_n), op, ": block_n must be 32, 64 or 128, got ", block_n);
}

void check_levels(const char* op, const at::Tensor& levels, const at::Tensor& q, const at::Tensor& k,
                  int64_t block_m, int64_t block_n) {
  PSA_CHECK(levels.scalar_type() == at::kChar, op, ": levels must be int8, got ", levels.scalar_type());
  PSA_CHECK(levels.device() == q.device(), op, ": levels must be on the device of q (", q.device(),
              "), got ", levels.device());
  const std::vector<int64_t> expected = {q.size(0), q.size(1), ceil_div(q.size(2), block_m),
                                         ceil_div(k.size(2), block_n)};
  PSA_CHECK(levels.sizes() == at::IntArrayRef(expected), op,
              ": levels must have shape [B, Hq, ceil(Lq/block_m), ceil(Lk/block_n)] = ", expected, ", got ",
              levels.sizes());
}

double check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& levels, int64_t block_m, int64_t block_n,
                              std::optional<double> scale) {
  check_qkv(op, q, k, v);
  check_block_sizes(op, block_m, block_n);
  check_levels(op, levels, q, k, block_m, block_n);
  const double softmax_scale = scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  PSA_CHECK(std::isfinite(softmax_scale), op, ": scale must be finite, got ", softmax_scale);
  return softmax_scale;
}

void check_level_values(const char* op, const at::Tensor& levels) {
  const auto valid = levels.eq(0) | levels.eq(1) | levels.eq(2) | levels.eq(4) | levels.eq(8);
  PSA_CHECK(valid.all().item<bool>(), op, ": levels values must be in {0, 1, 2, 4, 8}, got ",
            std::get<0>(at::_unique(levels.masked_select(valid.logical_not()))));
}

void check_pooled_keys(const char* op, const char* name, const at::Tensor& t, const at::Tensor& k, int64_t level) {
  check_tensor(op, name, t, "k", k);
  const std::vector<int64_t> expected = {k.size(0), k.size(1), ceil_div(k.size(2), level), k.size(3)};
  PSA_CHECK(t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape [B, Hkv, ceil(Lk/", level,
            "), D] = ", expected, " (kv_pyramid's output for k and v), got ", t.sizes());
}

void check_pyramid(const char* op, const at::Tensor& k, const std::vector<at::Tensor>& pooled) {
  static const char* const kNames[] = {"k2", "v2", "k4", "v4", "k8", "v8"};
  for (size_t i = 0; i < pooled.size(); ++i) check_pooled_keys(op, kNames[i], pooled[i], k, int64_t{2} << (i / 2));
}

void check_pyramid_gradients(const char* op, const std::vector<at::Tensor>& d_pooled, int64_t k_len) {
  static const char* const kNames[] = {"dk2", "dv2", "dk4", "dv4", "dk8", "dv8"};
  // Any strides: autograd hands expanded or transposed gradients, and both backends read a contiguous copy.
  const at::Tensor& first = d_pooled[0];
  PSA_CHECK(k_len >= 1, op, ": k_len must be at least 1, got ", k_len);
  PSA_CHECK(first.dim() == 4, op, ": dk2 must have 4 dims [B, H, L, D], got shape ", first.sizes());
  check_dtype_and_head_dim(op, kNames[0], first);
  for (size_t i = 0; i < d_pooled.size(); ++i) {
    const at::Tensor& t = d_pooled[i];
    const int64_t level = int64_t{2} << (i / 2);
    PSA_CHECK(t.device() == first.device(), op, ": ", kNames[i], " must be on the same device as dk2 (",
              first.device(), "), got ", t.device());
    PSA_CHECK(t.scalar_type() == first.scalar_type(), op, ": ", kNames[i], " must have the same dtype as dk2 (",
              first.scalar_type(), "), got ", t.scalar_type());
    const std::vector<int64_t> expected = {first.size(0), first.size(1), ceil_div(k_len, level), first.size(3)};
    PSA_CHECK(t.sizes() == at::IntArrayRef(expected), op, ": ", kNames[i], " must have shape [B, H, ceil(k_len/",
              level, "), D] = ", expected, " (the shape of kv_pyramid's output for k_len = ", k_len, "), got ",
              t.sizes());
  }
}

bool any_symbolic(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors) {
    if (t.defined() && t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return true;
  }
  return false;
}

void check_position_mask(const char* op, const char* name, const c10::optional<at::Tensor>& mask,
                         int64_t batch, int64_t length, const at::Device& device) {
  if (!mask.has_value()) return;
  const auto& m = *mask;
  PSA_CHECK(m.scalar_type() == at::kBool, op, ": ", name, " must be a bool mask of positions, got ",
              m.scalar_type());
  PSA_CHECK(m.device() == device, op, ": ", name, " must be on device ", device, ", got ", m.device());
  const bool shape_ok = (m.dim() == 1 && m.size(0) == length) ||
                        (m.dim() == 2 && (m.size(0) == batch || m.size(0) == 1) && m.size(1) == length);
  PSA_CHECK(shape_ok, op, ": ", name, " must have shape [", length, "] or [", batch, ", ", length, "], got ",
              m.sizes());
}

}  // namespace psa
