// Device helpers shared by the psa kernels: dtype conversions and the sm80 warp-level primitives
// (cp.async, ldmatrix, mma.sync m16n8k16) the tensor-core kernels are built from.
//
// Fragment layouts follow the PTX ISA for mma.m16n8k16 with lane = 4*g + t (g = lane/4, t = lane%4):
//   A (16x16, row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, "col"):      b0 = (k=2t..2t+1, n=g), b1 = (k=2t+8.., n=g)
//   C (16x8, fp32):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace psa::kernels {

// Explicit conversions: torch builds with __CUDA_NO_{HALF,BF16}_CONVERSIONS__, which removes the implicit ones.
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// The first kAlign-aligned byte of a dynamic shared-memory buffer, as a Storage. The offset is added
// to the __shared__ array itself (not computed through an integer cast of its address), so the
// compiler still knows the result points to shared memory and emits LDS/STS instead of generic
// loads (a round trip through uintptr_t turned every schedule read into LD.E).
template <typename Storage, int kAlign>
__device__ __forceinline__ Storage& aligned_shared(unsigned char* smem) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return *reinterpret_cast<Storage*>(smem + ((kAlign - (address & (kAlign - 1))) & (kAlign - 1)));
}

// Two floats rounded to one 32-bit register of T pairs (lower address = `lo`).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; `valid == false` writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Programmatic dependent launch (sm90). A kernel launched with programmatic stream serialization may
// start before the kernel ahead of it in the stream has finished: once every CTA of that kernel has called
// allow_dependent_launch (or exited). It must call wait_for_prerequisite_grids before it reads what that
// kernel writes; the wait returns once that grid has completed and its writes are visible. Before sm90 both
// are no-ops and the launcher launches without the attribute (kFirstArchWithDependentLaunch against the
// binary's cudaFuncAttributes::binaryVersion), so the stream orders the kernels as usual.
constexpr int kFirstArchWithDependentLaunch = 90;
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// A 16-byte read-only global load that lets L2 fetch the whole 256-byte span around it from DRAM: for
// streaming passes, fewer and larger DRAM requests than the 32-byte sectors alone.
__device__ __forceinline__ uint4 load_global_256b_prefetch(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

// c += a * b for one m16n8k16 tile with fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// fp32 through the tf32 tensor cores at about fp32's precision ("3xTF32"): x = hi + lo exactly, hi being x
// with its mantissa cut to tf32's 10 bits (a mask) and lo the rest (a subtraction, exact), and a product
// taken as lo*hi + hi*lo + hi*hi. The tensor cores read only a tf32 operand's top 19 bits, so lo passes
// as it is and loses its low bits there: |lo| < 2^-10 |x|, so an operand is off by less than 2^-20 |x|
// (and the dropped lo*lo by less than that again). Two instructions a value: cvt.rna.tf32.f32, with
// which a split took seven on sm90, bound the pooled scores kernel by instruction issue (ncu, H200). A
// non-finite x has a NaN lo (inf - inf), so its products come out NaN.
struct Tf32Pair {
  uint32_t hi, lo;
};
__device__ __forceinline__ Tf32Pair split_tf32(float x) {
  const uint32_t hi = __float_as_uint(x) & 0xffffe000u;
  return {hi, __float_as_uint(x - __uint_as_float(hi))};
}
__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// c += A B for an m16n8k8 step of fp32 operands split into tf32 pairs (A fragment a[0..3], B b0, b1), the
// three products into three accumulators (c[0] lo*hi, c[1] hi*lo, c[2] hi*hi; the product is their sum):
// no MMA of a step waits for another, so a loop of steps runs three dependency chains, not one.
__device__ __forceinline__ void mma_1688_3xtf32(float (&c)[3][4], const Tf32Pair (&a)[4], Tf32Pair b0,
                                                Tf32Pair b1) {
  mma_1688_tf32(c[0], a[0].lo, a[1].lo, a[2].lo, a[3].lo, b0.hi, b1.hi);
  mma_1688_tf32(c[1], a[0].hi, a[1].hi, a[2].hi, a[3].hi, b0.lo, b1.lo);
  mma_1688_tf32(c[2], a[0].hi, a[1].hi, a[2].hi, a[3].hi, b0.hi, b1.hi);
}

// A shared-memory tile of rows of kHeadDim 16-bit values, stored with the 16-byte chunks of row r
// XOR-permuted by r % 8, so that the 8 row addresses of an ldmatrix hit 8 different bank groups.
template <int kHeadDim>
struct SwizzledRows {
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  __device__ __forceinline__ static int offset(int row, int chunk) {
    return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
  }
};

// max(a, b), NaN if either is NaN, where fmaxf returns the other operand: one FMNMX.NAN, as cheap as
// fmaxf. The estimators take their maxima with it so that a NaN logit reaches the row's scores, as
// torch.amax carries it on the CPU (docs/spec.md section 5: such a row then runs dense).
__device__ __forceinline__ float max_nan(float a, float b) {
  float out;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(out) : "f"(a), "f"(b));
  return out;
}

// Max and sum across the 4 lanes (t = 0..3) that share a row of an mma C fragment (the max keeps NaN).
__device__ __forceinline__ float quad_max(float x) {
  x = max_nan(x, __shfl_xor_sync(0xffffffff, x, 1));
  return max_nan(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// kGroups values per thread (say the maxima or sums of groups of columns), combined over the 4 threads of
// a quad and scattered: on return owned[m] is the combination over the whole quad of group 4m + t
// (t = lane % 4). Step one exchanges the groups whose bit 1 differs from the thread's, step two those
// whose bit 0 differs: 3 kGroups / 4 shuffles instead of 2 kGroups for a full quad reduction of each.
template <int kGroups, typename Combine>
__device__ __forceinline__ void quad_reduce_scatter(const float (&groups)[kGroups], float (&owned)[kGroups / 4],
                                                    int t, Combine combine) {
  static_assert(kGroups % 4 == 0, "a quad splits the groups four ways");
  const bool high = t & 2, odd = t & 1;
  float half[kGroups / 2];
#pragma unroll
  for (int i = 0; i < kGroups / 2; ++i) {
    const int low_group = ((i >> 1) << 2) | (i & 1);  // bit 1 clear; low_group | 2 has it set
    const float send = high ? groups[low_group] : groups[low_group | 2];
    const float keep = high ? groups[low_group | 2] : groups[low_group];
    half[i] = combine(keep, __shfl_xor_sync(0xffffffffu, send, 2));
  }
#pragma unroll
  for (int m = 0; m < kGroups / 4; ++m) {
    const float send = odd ? half[2 * m] : half[2 * m + 1];
    const float keep = odd ? half[2 * m + 1] : half[2 * m];
    owned[m] = combine(keep, __shfl_xor_sync(0xffffffffu, send, 1));
  }
}

// Max (keeping NaN) and sum across a whole warp (every lane gets the result).
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) x = max_nan(x, __shfl_xor_sync(0xffffffff, x, delta));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) x += __shfl_xor_sync(0xffffffff, x, delta);
  return x;
}

}  // namespace psa::kernels
