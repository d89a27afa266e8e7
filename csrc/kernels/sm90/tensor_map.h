// Host side: TMA descriptors (CUtensorMap) for [B, H, L, D] tensors with 16-bit elements (and rows of
// bytes, for FP8 operands).
//
// The driver's encoder is fetched through the runtime (cudaGetDriverEntryPointByVersion), so the
// extension does not link libcuda itself.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace psa::kernels::sm90 {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A 4-D map over (D, L, H, B), innermost first, whose box is `box_rows` tokens x 64 head_dim columns
// of one (batch, head), written to shared memory with the 128-byte swizzle. Reads past L are filled
// with zeros: partial key blocks and the coordinates we use for empty slots land there.
// `strides`: batch, head and token strides in elements (multiples of 8, i.e. 16 bytes, where the size
// exceeds 1; see tma_compatible in the host dispatch).
inline cudaError_t encode_bhld_map(CUtensorMap* map, const void* data, bool is_bf16, int64_t batch, int64_t heads,
                                   int64_t length, int64_t head_dim, const int64_t (&strides)[3], int box_rows) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  constexpr int64_t kElementBytes = 2;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(length),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  // A dimension of size 1 is only ever read at index 0: its stride may be anything torch left there
  // (0 or 1 included), so give TMA a valid one.
  auto stride_bytes = [&](int64_t size, int64_t stride) {
    return static_cast<cuuint64_t>((size == 1 ? head_dim : stride) * kElementBytes);
  };
  const cuuint64_t byte_strides[3] = {stride_bytes(length, strides[2]), stride_bytes(heads, strides[1]),
                                      stride_bytes(batch, strides[0])};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(map, is_bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                                 const_cast<void*>(data), dims, byte_strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// A 4-D map over rows of bytes [B, H, rows, row_bytes] (contiguous), innermost first, whose box is
// `box_rows` rows x 128 bytes, written with the 128-byte swizzle; rows past `rows` read zeros. The FP8
// antidiagonal estimator reads its quantized anti-rows and anti-columns this way.
inline cudaError_t encode_byte_rows_map(CUtensorMap* map, const void* data, int64_t batch, int64_t heads,
                                        int64_t rows, int64_t row_bytes, int box_rows) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t byte_strides[3] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(rows * row_bytes),
                                      static_cast<cuuint64_t>(heads * rows * row_bytes)};
  const cuuint32_t box[4] = {128, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<void*>(data), dims, byte_strides,
                                 box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// A 5-D map over 128-row tiles of `rows` rows of a [B, H, rows, D] tensor (strides: batch, head and row, in
// elements) whose box lands in shared memory with its row order transposed as a 16 x 8 matrix: tile row
// 16 i + c (i < 8, c < 16) becomes shared row i + 8 c, in the same 128-byte swizzle as encode_bhld_map's.
// Dimensions, innermost first: D, row / 16 (stride 16 rows: i, and the tile through it), row % 16
// (stride 1 row: c), H, B; a tile's box starts at (column, 8 * tile, 0, head, batch). Rows past `rows`
// (a multiple of 16) read zeros. The sampled estimator loads its key tiles this way: see
// estimate_sampled_sm90.cuh for why.
inline cudaError_t encode_row_transposed_map(CUtensorMap* map, const void* data, bool is_bf16, int64_t batch,
                                             int64_t heads, int64_t rows, int64_t head_dim,
                                             const int64_t (&strides)[3]) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  if (rows % 16 != 0) return cudaErrorInvalidValue;  // the extent counts whole groups of 16 rows
  constexpr int64_t kElementBytes = 2;
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(rows / 16), 16,
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  auto stride_bytes = [&](int64_t size, int64_t stride) {  // as in encode_bhld_map
    return static_cast<cuuint64_t>((size == 1 ? head_dim : stride) * kElementBytes);
  };
  const cuuint64_t byte_strides[4] = {static_cast<cuuint64_t>(16 * strides[2] * kElementBytes),
                                      static_cast<cuuint64_t>(strides[2] * kElementBytes),
                                      stride_bytes(heads, strides[1]), stride_bytes(batch, strides[0])};
  const cuuint32_t box[5] = {64, 8, 16, 1, 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult result = encode(map, is_bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 5,
                                 const_cast<void*>(data), dims, byte_strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace psa::kernels::sm90
