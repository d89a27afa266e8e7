// Thin layer over CUTLASS's sm90a warpgroup MMA atoms (cute/arch/mma_sm90_gmma.hpp) and shared-memory
// matrix descriptors: our kernels keep their accumulators in plain float arrays and their tiles in
// the canonical 128-byte-swizzled layout that TMA writes, so they need the instructions, not CuTe's
// layout algebra.
//
// Shared-memory tiles: a [rows x cols] operand is stored as cols/64 column panels, each panel
// [rows][64] 16-bit elements (128 bytes per row) with the SWIZZLE_128B pattern, panels `rows * 128`
// bytes apart: exactly what a TMA box of 64 columns with CU_TENSOR_MAP_SWIZZLE_128B writes, and the
// canonical wgmma layout of both majors:
//   K-major (Q and K in S = Q K^T): 8-row groups 1024 bytes apart (SBO); a k16 step inside a panel
//     advances the start address by 32 bytes, the next panel starts `rows * 128` bytes on.
//   MN-major (V in O = P V, N = head_dim contiguous): LBO = panel stride (the next 64 head_dim
//     columns), SBO = 1024 bytes (the next 8 keys); a k16 step (16 keys) advances 2048 bytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <utility>

#include <cute/arch/mma_sm90_desc.hpp>  // GmmaDescriptor
#include <cute/arch/util.hpp>           // cast_smem_ptr_to_uint
#include <cute/arch/mma_sm90_gmma.hpp>

#include "shapes_sm90.h"

namespace psa::kernels::sm90 {

namespace gmma = cute::SM90::GMMA;

// Descriptor of a SWIZZLE_128B tile starting at `smem` (1024-byte aligned, or offset inside a row by
// a multiple of 32 bytes for K-major k steps), kept as its two 32-bit halves. The start address
// (address >> 4) is the low 14 bits of the low half, and shared-memory addresses (< 256 KiB) never
// carry out of it, so moving a tile's descriptor is one 32-bit add on the low half while the high half
// (strides, swizzle mode) stays put. As a 64-bit add it cost an add with carry plus register moves per
// MMA: 7 uniform instructions per S = Q K^T wgmma, 3 per P V one (SASS of the attention kernel).
struct SmemDescriptor {
  uint32_t lo, hi;

  __device__ __forceinline__ static SmemDescriptor of(const void* smem, uint32_t leading_bytes, uint32_t stride_bytes) {
    cute::GmmaDescriptor desc;
    desc.bitfield.start_address_ = static_cast<uint16_t>(cute::cast_smem_ptr_to_uint(smem) >> 4);
    desc.bitfield.leading_byte_offset_ = static_cast<uint16_t>(leading_bytes >> 4);
    desc.bitfield.stride_byte_offset_ = static_cast<uint16_t>(stride_bytes >> 4);
    desc.bitfield.base_offset_ = 0;
    desc.bitfield.layout_type_ = static_cast<uint8_t>(gmma::LayoutType::B128);
    return {static_cast<uint32_t>(desc.desc_), static_cast<uint32_t>(desc.desc_ >> 32)};
  }
  // The descriptor of the tile `bytes` further on (a multiple of 16).
  __device__ __forceinline__ SmemDescriptor at(uint32_t bytes) const { return {lo + (bytes >> 4), hi}; }
  // Packed with mov.b64: written as (hi << 32) | lo, ptxas built the descriptors in vector registers
  // and moved each into uniform ones with R2UR per MMA (and spilled 84 bytes).
  __device__ __forceinline__ uint64_t word() const {
    uint64_t word;
    asm("mov.b64 %0, {%1, %2};" : "=l"(word) : "r"(lo), "r"(hi));
    return word;
  }
};

// Where k16 step kk (16 columns of the inner dimension) of a K-major operand of `rows` rows starts,
// in bytes from the operand's first panel: panel kk / 4, then 32 bytes per step inside its 128-byte rows.
__device__ __forceinline__ constexpr uint32_t k_major_step_offset(int kk, int rows) {
  return static_cast<uint32_t>((kk / 4) * rows * kPanelRowBytes + (kk % 4) * 32);
}

// The CUTLASS atom for D[64 x N] (+)= A[64 x 16] B[16 x N], float accumulators.
//   SS: A and B K-major in shared memory.  RS: A in registers, B MN-major in shared memory.
template <typename T, int N> struct AtomSS;
template <typename T, int N> struct AtomRS;
template <> struct AtomSS<__nv_bfloat16, 64> { using Op = gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>; };
template <> struct AtomSS<__nv_bfloat16, 128> { using Op = gmma::MMA_64x128x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>; };
template <> struct AtomSS<__half, 64> { using Op = gmma::MMA_64x64x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>; };
template <> struct AtomSS<__half, 128> { using Op = gmma::MMA_64x128x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>; };
template <> struct AtomSS<__nv_bfloat16, 256> { using Op = gmma::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>; };
template <> struct AtomSS<__half, 256> { using Op = gmma::MMA_64x256x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>; };
// FP8 e4m3 (k32 steps: a step is still 32 bytes of a K-major row; FP8 wgmma takes K-major operands only).
template <> struct AtomSS<__nv_fp8_e4m3, 128> { using Op = gmma::MMA_64x128x32_F32E4M3E4M3_SS_TN<>; };
template <> struct AtomSS<__nv_fp8_e4m3, 256> { using Op = gmma::MMA_64x256x32_F32E4M3E4M3_SS_TN<>; };
template <> struct AtomRS<__nv_bfloat16, 64> { using Op = gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>; };
template <> struct AtomRS<__nv_bfloat16, 128> { using Op = gmma::MMA_64x128x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>; };
template <> struct AtomRS<__half, 64> { using Op = gmma::MMA_64x64x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>; };
template <> struct AtomRS<__half, 128> { using Op = gmma::MMA_64x128x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>; };
// RS with B K-major (B's rows are the N dimension: Q K^T with Q in registers).
template <typename T, int N> struct AtomRSK;
template <> struct AtomRSK<__nv_bfloat16, 128> { using Op = gmma::MMA_64x128x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::K>; };
template <> struct AtomRSK<__half, 128> { using Op = gmma::MMA_64x128x16_F32F16F16_RS<gmma::Major::K, gmma::Major::K>; };

namespace detail {
template <typename Op, size_t... I>
__device__ __forceinline__ void mma_ss(uint64_t a, uint64_t b, float* d, gmma::ScaleOut scale, std::index_sequence<I...>) {
  Op::fma(a, b, d[I]..., scale);
}
template <typename Op, size_t... I>
__device__ __forceinline__ void mma_rs(const uint32_t (&a)[4], uint64_t b, float* d, std::index_sequence<I...>,
                                       gmma::ScaleOut scale = gmma::ScaleOut::One) {
  Op::fma(a[0], a[1], a[2], a[3], b, d[I]..., scale);
}
}  // namespace detail

// Issues one asynchronous m64nNk16 MMA (m64nNk32 for FP8: one 32-byte step either way); `accumulate`
// false overwrites d.
template <typename T, int N>
__device__ __forceinline__ void mma_ss(SmemDescriptor a, SmemDescriptor b, float (&d)[N / 2], bool accumulate) {
  detail::mma_ss<typename AtomSS<T, N>::Op>(a.word(), b.word(), d,
                                            accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero,
                                            std::make_index_sequence<N / 2>{});
}

template <typename T, int N>
__device__ __forceinline__ void mma_rs(const uint32_t (&a)[4], SmemDescriptor b, float (&d)[N / 2]) {
  detail::mma_rs<typename AtomRS<T, N>::Op>(a, b.word(), d, std::make_index_sequence<N / 2>{});
}

// A in registers (the m64k16 fragment of ldmatrix_x4), B K-major in shared memory; `accumulate` false
// overwrites d.
template <typename T, int N>
__device__ __forceinline__ void mma_rs_k_major(const uint32_t (&a)[4], SmemDescriptor b, float (&d)[N / 2],
                                               bool accumulate) {
  detail::mma_rs<typename AtomRSK<T, N>::Op>(a, b.word(), d, std::make_index_sequence<N / 2>{},
                                             accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero);
}

// Keeps the compiler from moving reads or writes of accumulator registers across the asynchronous
// MMAs that own them (between warpgroup_arrive and warpgroup_wait).
template <int Size>
__device__ __forceinline__ void fence_registers(float (&d)[Size]) {
#pragma unroll
  for (int i = 0; i < Size; ++i) cute::warpgroup_fence_operand(d[i]);
}

}  // namespace psa::kernels::sm90
