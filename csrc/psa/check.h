// Input validation shared by every backend of every op. Messages name the op, the argument, what was
// expected and what arrived, so a user can fix the call without reading this code.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

// PSA_CHECK(cond, parts...) is TORCH_CHECK with a message assembled by psa::detail::message. Numbers
// and shapes are formatted with std::to_string rather than streamed: streaming an integer from this
// library crashed inside libstdc++'s num_put on the GPU machine's torch 2.11 / g++ 13 environment.
#define PSA_CHECK(cond, ...) TORCH_CHECK(cond, ::psa::detail::message(__VA_ARGS__))

namespace psa {
namespace detail {

inline std::string text(const char* s) { return s; }
inline std::string text(const std::string& s) { return s; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string text(T value) {
  return std::to_string(value);
}
std::string text(double value);
std::string text(at::IntArrayRef values);
std::string text(at::ArrayRef<double> values);
inline std::string text(const std::vector<int64_t>& values) { return text(at::IntArrayRef(values)); }
inline std::string text(at::ScalarType dtype) { return c10::toString(dtype); }
inline std::string text(const at::Device& device) { return device.str(); }
// The first few values of an integer tensor, e.g. "[3, 5, 7]".
std::string text(const at::Tensor& values);

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  ((out += text(parts)), ...);
  return out;
}

}  // namespace detail

// Block sizes the kernels are instantiated for.
bool is_supported_block_size(int64_t block);

// q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D]: rank, dtype, device, last-dim contiguity, GQA, D.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
void check_qk(const char* op, const at::Tensor& q, const at::Tensor& k);
// k and v [B, H, L, D] of one shape, dtype and device, as kv_pyramid takes them.
void check_pyramid_inputs(const char* op, const at::Tensor& k, const at::Tensor& v);
// The gradients {dk2, dv2, dk4, dv4, dk8, dv8} of kv_pyramid's outputs for keys of length k_len: dtype
// (one for all six), device and the pyramid's shapes; any strides.
void check_pyramid_gradients(const char* op, const std::vector<at::Tensor>& d_pooled, int64_t k_len);
void check_block_sizes(const char* op, int64_t block_m, int64_t block_n);
// levels int8 [B, Hq, ceil(Lq/block_m), ceil(Lk/block_n)] on q's device (dtype, device and shape only).
void check_levels(const char* op, const at::Tensor& levels, const at::Tensor& q, const at::Tensor& k,
                  int64_t block_m, int64_t block_n);
// The inputs of attention over a level map (q, k, v, block sizes, levels' shape, a finite scale); returns
// the softmax scale (1/sqrt(head_dim) by default).
double check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& levels, int64_t block_m, int64_t block_n,
                              std::optional<double> scale);
// Every value of a CPU level map in {0, 1, 2, 4, 8}. (CUDA kernels stop on other values instead: the
// host cannot read a device tensor without a synchronisation.)
void check_level_values(const char* op, const at::Tensor& levels);
// The pyramid {k2, v2, k4, v4, k8, v8} of k and v: level l is [B, Hkv, ceil(Lk/l), D], dtype and device of k.
void check_pyramid(const char* op, const at::Tensor& k, const std::vector<at::Tensor>& pooled);
// One pooled tensor of k's pyramid, `name` at level `level`, as check_pyramid checks each.
void check_pooled_keys(const char* op, const char* name, const at::Tensor& t, const at::Tensor& k, int64_t level);
// Whether any tensor has symbolic sizes (torch.compile with dynamic shapes traces the composite ops
// with such tensors; their checks run in the stage ops instead).
bool any_symbolic(std::initializer_list<at::Tensor> tensors);
// An optional bool mask of positions, [length] or [batch, length], on `device`.
void check_position_mask(const char* op, const char* name, const c10::optional<at::Tensor>& mask,
                         int64_t batch, int64_t length, const at::Device& device);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace psa
