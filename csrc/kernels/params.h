// Plain parameter structs shared by host launchers and device kernels (no torch headers here).
#pragma once

#include <cstdint>

namespace psa::kernels {

// Mean pooling of K and V into levels 2, 4, 8 (spec section 2).
struct PyramidParams {
  const void* k;         // [B, H, L, D], last dim contiguous
  const void* v;         // [B, H, L, D], last dim contiguous
  int64_t k_stride[3];   // batch, head, token strides of k, in elements
  int64_t v_stride[3];
  void* k_out[3];        // levels 2, 4, 8: contiguous [B, H, ceil(L/l), D]
  void* v_out[3];
  int batch, heads, length, head_dim;
};

}  // namespace psa::kernels
