// Helpers shared by the CUDA host code: dtype dispatch, launch checks, layout and device limits.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../check.h"

namespace psa::cuda {

// Calls f(T{}) with T the CUDA type of a bf16/fp16 tensor.
template <typename F>
auto dispatch_input_dtype(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: PSA_CHECK(false, op, ": no CUDA kernel for dtype ", dtype);
  }
  return f(__half{});  // unreachable
}

// Calls f(std::integral_constant<int, kBlockM>{}) for the portable kernels' block_m (32, 64 or 128; the
// op's checks have ruled out anything else), so a launch and its shared-memory size pick one instance.
template <typename F>
auto with_block_m(int64_t block_m, F&& f) {
  switch (block_m) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: return f(std::integral_constant<int, 128>{});
  }
}

// The same for the Hopper level-map kernels, whose block_m is 64 or 128 (64-row warpgroups).
template <typename F>
auto with_sm90_block_m(int64_t block_m, F&& f) {
  return block_m == 64 ? f(std::integral_constant<int, 64>{}) : f(std::integral_constant<int, 128>{});
}

inline void check_launch(const char* op, cudaError_t status) {
  PSA_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

// The kernels copy rows with 16-byte cp.async: the base pointer and every stride above the last dim
// must keep rows 16-byte aligned. Otherwise we take a fresh copy (a device copy, no sync); a clone,
// because contiguous() returns a contiguous tensor at an odd storage offset unchanged.
inline at::Tensor rows_16b_aligned(const at::Tensor& t) {
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d + 1 < t.dim(); ++d) aligned = aligned && (t.stride(d) * t.element_size()) % 16 == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

// TMA reads a [B, H, L, D] tensor through its strides if each stride of a dimension longer than one
// is a positive multiple of 16 bytes (rows_16b_aligned has made the base pointer 16-byte aligned).
inline bool tma_compatible(const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && (t.stride(d) <= 0 || (t.stride(d) * t.element_size()) % 16 != 0)) return false;
  }
  return t.stride(3) == 1;
}

// Largest dynamic shared memory a kernel may opt into on `device` (a cached attribute query).
inline size_t max_dynamic_smem(const at::Device& device) {
  int bytes = 0;
  cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index());
  return static_cast<size_t>(bytes);
}

// The number of SMs of `device`.
inline int sm_count(const at::Device& device) {
  int count = 0;
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index());
  return count;
}

// Which tensor-core kernels run: PSA_CUDA_KERNEL=sm80 forces the portable mma.sync kernels, =sm90
// demands the Hopper ones (an error where they cannot run), unset or "auto" takes the Hopper kernels
// wherever they apply. Read at every call, so a test or benchmark can switch between calls.
enum class KernelChoice { kAuto, kSm80, kSm90 };

inline KernelChoice requested_kernel(const char* op) {
  const char* value = std::getenv("PSA_CUDA_KERNEL");
  const std::string choice = value == nullptr ? "auto" : value;
  if (choice == "sm80") return KernelChoice::kSm80;
  if (choice == "sm90") return KernelChoice::kSm90;
  PSA_CHECK(choice == "auto" || choice.empty(), op, ": PSA_CUDA_KERNEL must be auto, sm80 or sm90, got '", choice,
            "'");
  return KernelChoice::kAuto;
}

// The one place that decides whether an op runs its Hopper (sm_90a) kernel or the portable one:
// PSA_CUDA_KERNEL=sm80 says no; otherwise `hopper_unavailable()` (the device's and the op's own
// conditions, called only then) says why not, or "" for yes. PSA_CUDA_KERNEL=sm90 turns a "why not"
// into an error naming it.
template <typename Reason>
bool use_hopper_kernel(const char* op, Reason hopper_unavailable) {
  const KernelChoice choice = requested_kernel(op);
  if (choice == KernelChoice::kSm80) return false;
  const std::string reason = hopper_unavailable();
  PSA_CHECK(reason.empty() || choice != KernelChoice::kSm90, op,
            ": PSA_CUDA_KERNEL=sm90 but the Hopper kernel cannot run: ", reason);
  return reason.empty();
}

// Empty when this build and `device` can run the sm_90a kernels, else why not.
inline std::string sm90_device_unavailable_reason(const at::Device& device) {
#ifdef PSA_WITH_SM90
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index());
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index());
  return major == 9 && minor == 0 ? "" : "the GPU is not sm_90 (H100/H200)";
#else
  (void)device;
  return "psa was built without sm_90a (PSA_CUDA_ARCHS) or without CUTLASS headers";
#endif
}

// Empty when the Hopper level-map kernels (the attention forward, the backward's dq pass) can take
// these operands, else why not: the device, block_m 64 or 128 (64-row warpgroups), block_n >= 64
// (level-8 pieces of at least 8 rows), TMA-compatible strides, and `smem_bytes` (the variant's shared
// memory at this n_k) within the device's limit.
inline std::string sm90_level_map_unavailable_reason(const at::Tensor& q, const std::vector<at::Tensor>& operands,
                                                     int64_t block_m, int64_t block_n, size_t smem_bytes) {
  const std::string device_reason = sm90_device_unavailable_reason(q.device());
  if (!device_reason.empty()) return device_reason;
  if (block_m != 64 && block_m != 128) return "block_m must be 64 or 128";
  if (block_n < 64) return "block_n must be 64 or 128 (level-8 pieces of at least 8 rows)";
  if (!tma_compatible(q)) return "q strides are not TMA-compatible";
  for (const auto& t : operands) {
    if (!tma_compatible(t)) return "k/v strides are not TMA-compatible";
  }
  if (smem_bytes > max_dynamic_smem(q.device())) return "n_k is too large for its shared memory";
  return "";
}

inline void set_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) dst[d] = t.stride(d);
}

}  // namespace psa::cuda
