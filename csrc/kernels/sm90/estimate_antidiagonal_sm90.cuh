// The "antidiagonal" block-importance estimator (docs/spec.md section 4) on Hopper (sm_90a): a TMA +
// wgmma GEMM of anti-rows against anti-columns whose epilogue keeps an online softmax per anti-row and
// the sums of its exponentials per group of 8 anti-columns. Same results as the portable kernel
// (../estimate_antidiagonal.cuh); see there for the algorithm and the table of group sums.
//
// Why it is shaped this way: the anti-logits are a GEMM of [Lq/S, S*D] by [S*D, Lk/S], 1/16 of dense
// attention's FLOPs at S = 8, with a long inner dimension and a cheap epilogue (one exp2 per anti-logit
// against S*D multiply-adds), so it runs at the rate the tensor cores are fed.
//   - Inner-dimension step t multiplies Q rows S i + S-1-t by K rows S j + t. Each member t of the
//     groups of S tokens has its own TMA descriptor: the tensor seen from token t with a token stride
//     of S rows and ceil((L - t) / S) rows, so a box is one step's rows, and the rows past the sequence
//     (the last, partial group) are out of bounds and arrive as zeros, as the reference pads them. No
//     copy of Q or K is made.
//   - Warpgroup 0 is the producer: one thread issues per step a 128 x 64 box of Q and a 256 x 64 box of
//     K into a ring of kStages stages. Warpgroups 1 and 2 each own 64 anti-rows and issue m64n256k16
//     MMAs; a stage is released when the MMAs of the next one have been issued and it is done.
//   - After a tile's S * D / 64 steps a consumer turns its 64 x 256 accumulator into the tile's row maxima
//     and group sums (a quad reduce-scatter leaves each thread 8 of the 32 groups of a row), writes
//     them to its item's table and moves on; the last pass (write_antidiagonal_scores) is the sm80 one.
//   - Persistent: one CTA per SM walks work items (128 anti-rows of one head), the stage ring running on
//     from one item to the next. The last pass of an item runs on the producer warpgroup's three idle
//     warps while the consumers compute the next item: in a CTA per item it held the tensor cores idle
//     for about a fifth of the kernel (ncu, NOTES.md), the pipeline's refill after it too.
//   - FP8 scoring (T = __nv_fp8_e4m3): Q and K arrive quantized by quantize_anti_rows.cuh as rows of
//     S * D bytes, one per anti-row or anti-column, so each operand has one plain descriptor and a step
//     is the next 128 bytes of those rows (S * D / 128 steps a tile, m64n256k32 MMAs at twice the 16-bit
//     rate); the epilogue multiplies each anti-logit by its row's and column's group scales.
#pragma once

#include <algorithm>
#include <cfloat>
#include <type_traits>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cute/arch/copy_sm90_tma.hpp>

#include "../device_utils.cuh"
#include "../estimate_antidiagonal.cuh"
#include "../params.h"
#include "shapes_sm90.h"
#include "sm_count.h"
#include "tensor_map.h"
#include "wgmma.cuh"

namespace psa::kernels::sm90 {

// AntidiagonalParams plus one descriptor per member t of the groups of S tokens: q_maps[t] reads Q
// rows S i + t as its row i, k_maps[t] K rows S j + t (box 128 x 64 and 256 x 64). FP8 scoring uses
// q_maps[0] and k_maps[0] only, over the quantized rows (box 128 x 128 bytes and 256 x 128).
struct AntidiagonalSm90Params {
  AntidiagonalParams base;
  CUtensorMap q_maps[AntidiagonalSm90Shape<64>::kMaxStride];
  CUtensorMap k_maps[AntidiagonalSm90Shape<64>::kMaxStride];
};

// Operand rows are 128-byte swizzled panels whatever the element (64 16-bit values or 128 e4m3 ones).
template <int kHeadDim>
struct AntidiagonalSm90Storage {
  using Shape = AntidiagonalSm90Shape<kHeadDim>;
  alignas(kSwizzleAtomBytes) uint8_t q[Shape::kStages][Shape::kRows][kPanelRowBytes];
  alignas(kSwizzleAtomBytes) uint8_t k[Shape::kStages][Shape::kTileN][kPanelRowBytes];
  float row_max[2][Shape::kRows];  // an item's rows' final maxima and sums, for the finisher warps
  float row_sum[2][Shape::kRows];
  uint64_t full[Shape::kStages];
  uint64_t empty[Shape::kStages];
  float column_scales[Shape::kConsumers][2][Shape::kTileN];  // FP8 scoring: a tile's key group scales
  uint64_t rows_ready[2];  // row_max / row_sum[slot] written (consumers) and read (finishers)
  uint64_t rows_free[2];
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(AntidiagonalSm90Shape<kHeadDim>::kThreads, 1)
    estimate_antidiagonal_sm90_kernel(const __grid_constant__ AntidiagonalSm90Params params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = AntidiagonalSm90Shape<kHeadDim>;
  using Storage = AntidiagonalSm90Storage<kHeadDim>;
  constexpr bool kFp8 = std::is_same_v<T, __nv_fp8_e4m3>;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kRows = Shape::kRows, kTileN = Shape::kTileN, kStages = Shape::kStages;
  constexpr int kPanels = Shape::kPanels, kGroups = Shape::kGroups;
  const AntidiagonalParams& p = params.base;

  extern __shared__ unsigned char smem_unaligned[];
  Storage& smem = aligned_shared<Storage, kSwizzleAtomBytes>(smem_unaligned);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int S = p.stride;
  // 16-bit: member t, panel c of each; FP8: the next 128 bytes of the S * D-byte rows.
  const int steps_per_tile = kFp8 ? S * kHeadDim / kPanelRowBytes : S * kPanels;
  // Work items: (row CTA, head slot), row CTAs from the last down. Without a mask head by head: the CTAs
  // at work at once read the K of a few heads, which stays in L2 (every head's last row CTA first made it
  // 20-25% slower). Under a causal mask, whose items grow with the row, every head's last row CTA first,
  // so that each CTA gets a like mix of long and short items (head by head it took 1.5x as long at 64k
  // tokens).
  const int ctas_per_head = (p.n_q * (p.block_m / S) + kRows - 1) / kRows;  // Shape::ctas_per_head
  const int items = ctas_per_head * p.bh_count;
  const auto item_head_slot = [&](int item) { return p.causal ? item % p.bh_count : item / ctas_per_head; };
  // An item's head: bh (batch * q_heads + head), its batch, head and kv head (what the TMA boxes index).
  struct ItemHead {
    int bh, b, h, kv_head;
  };
  const auto item_head = [&](int item) {
    const int bh = p.bh_begin + item_head_slot(item), h = bh % p.q_heads;
    return ItemHead{bh, bh / p.q_heads, h, h / (p.q_heads / p.kv_heads)};
  };
  const auto item_cta = [&](int item) {
    const int row_cta = ctas_per_head - 1 - (p.causal ? item / p.bh_count : item % ctas_per_head);
    return AntidiagonalCta<kRows, kTileN, kGroups>(p, row_cta, item_head_slot(item), ctas_per_head);
  };
  // This CTA's local-th item (past the last once it reaches `items`): rounds of gridDim.x items, taken
  // in serpentine order, CTA c the c-th of an even round and the c-th from the end of an odd one. Under
  // a causal mask a round's items shrink from first to last, so the CTA with a round's longest item takes
  // the next round's shortest. Counting tiles (plus one per item) at 32k tokens (Qwen2.5-VL's 28 heads,
  // 132 SMs), the busiest CTA takes 12% more than the mean round-robin, 2% in serpentine order (5.1 ->
  // 4.9% of causal cuDNN, H200). Without a mask all items are alike and the order only changes which CTA
  // takes which.
  const auto cta_item = [&](int local) {
    return local * static_cast<int>(gridDim.x) +
           ((local & 1) ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x));
  };

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&smem.full[s], 1);                       // the producer's arrive (+ TMA bytes)
      Barrier::init(&smem.empty[s], Shape::kConsumers * 4);  // one arrive per consumer warp
    }
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      Barrier::init(&smem.rows_ready[slot], Shape::kConsumers * 128);  // every consumer thread
      Barrier::init(&smem.rows_free[slot], Shape::kFinisherThreads);   // every finisher thread
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (warp < 4) {
    cutlass::arch::warpgroup_reg_dealloc<Shape::kProducerRegisters>();
    if (warp > 0) {
      // ================= Finisher warps (1-3) =================
      // The last pass of each item, under the consumers' mainloop of the next: its rows' final maxima
      // and sums arrive in row_max / row_sum[slot] with rows_ready, the group sums and tile maxima in
      // the table (global; rows_ready's arrive releases them).
      const int thread = tid - 32;
      const auto finishers_sync = [] { cutlass::arch::NamedBarrier::sync(Shape::kFinisherThreads, 1); };
      for (int local = 0, item = cta_item(0); item < items; item = cta_item(++local)) {
        const int slot = local & 1;
        const auto cta = item_cta(item);
        Barrier::wait(&smem.rows_ready[slot], (local >> 1) & 1);
        write_antidiagonal_scores<kRows, kGroups>(p, cta.group_sums, cta.tile_maxima, smem.row_max[slot],
                                                  smem.row_sum[slot], item_head(item).bh,
                                                  cta.first_block, cta.n_tiles, thread, Shape::kFinisherThreads,
                                                  finishers_sync);
        Barrier::arrive(&smem.rows_free[slot]);
      }
      return;
    }
    // ================= Producer (one thread) =================
    if (lane != 0) return;
    constexpr uint32_t kStageBytes = sizeof(smem.q[0]) + sizeof(smem.k[0]);
    int step_base = 0;  // steps of the earlier items: the ring runs on across items
    for (int local = 0, item = cta_item(0); item < items; item = cta_item(++local)) {
      const auto cta = item_cta(item);
      const auto [bh, b, h, kv_head] = item_head(item);
      const int steps = cta.n_tiles * steps_per_tile;
      for (int step = 0; step < steps; ++step) {
        const int ring_step = step_base + step, stage = ring_step % kStages;
        const int tile = step / steps_per_tile, member = (step % steps_per_tile) / kPanels, panel = step % kPanels;
        Barrier::wait(&smem.empty[stage], ((ring_step / kStages) & 1) ^ 1);
        TxBarrier::expect_transaction(&smem.full[stage], kStageBytes);
        if constexpr (kFp8) {
          const int column = (step % steps_per_tile) * kPanelRowBytes;
          cute::SM90_TMA_LOAD_4D::copy(&params.q_maps[0], &smem.full[stage], 0, &smem.q[stage][0][0], column,
                                       cta.first_row, h, b);
          cute::SM90_TMA_LOAD_4D::copy(&params.k_maps[0], &smem.full[stage], 0, &smem.k[stage][0][0], column,
                                       tile * kTileN, kv_head, b);
        } else {
          cute::SM90_TMA_LOAD_4D::copy(&params.q_maps[S - 1 - member], &smem.full[stage], 0, &smem.q[stage][0][0],
                                       panel * kPanelColumns, cta.first_row, h, b);
          cute::SM90_TMA_LOAD_4D::copy(&params.k_maps[member], &smem.full[stage], 0, &smem.k[stage][0][0],
                                       panel * kPanelColumns, tile * kTileN, kv_head, b);
        }
        Barrier::arrive(&smem.full[stage]);
      }
      step_base += steps;
    }
    return;
  }

  // ================= Consumer warpgroups =================
  cutlass::arch::warpgroup_reg_alloc<Shape::kConsumerRegisters>();
  const int consumer = __shfl_sync(0xffffffffu, warp / 4 - 1, 0), warp_in_group = warp % 4;
  const int g = lane >> 2, t = lane & 3;
  float acc[kTileN / 2];  // m64n256: column of element 4j + e is 8j + 2t + (e & 1), row g + 8 (e >> 1)
  const auto q_desc = SmemDescriptor::of(&smem.q[0][consumer * 64][0], 16, kSwizzleAtomBytes);
  const auto k_desc = SmemDescriptor::of(&smem.k[0][0][0], 16, kSwizzleAtomBytes);
  constexpr uint32_t kQStageBytes = sizeof(smem.q[0]), kKStageBytes = sizeof(smem.k[0]);
  int step_base = 0;
  for (int local = 0, item = cta_item(0); item < items; item = cta_item(++local)) {
    const auto cta = item_cta(item);
    const int first_row = cta.first_row, steps = cta.n_tiles * steps_per_tile;
    const auto [bh, b, h, kv_head] = item_head(item);
    // A thread holds rows g and g + 8 of its warp's 16 anti-rows.
    int local_row[2], visible_end[2];  // anti-columns [0, visible_end) are visible to the row
    float run_max[2], run_sum[2];
    // |scale_log2|, times the row's group scale under FP8 scoring; FLT_MIN for 0 (a zero softmax scale):
    // an exponent |acc| * FLT_MIN is then below float32's resolution of 1, as acc * 0 is, and -inf stays
    // -inf.
    float row_magnitude[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      local_row[r] = consumer * 64 + warp_in_group * 16 + g + 8 * r;
      visible_end[r] = cta.visible_end(first_row + local_row[r]);
      run_max[r] = -INFINITY;
      run_sum[r] = 0.f;
      row_magnitude[r] = fabsf(p.scale_log2);
      if constexpr (kFp8) {
        const int row = first_row + local_row[r];
        if (row < p.q_tiles) row_magnitude[r] *= __ldg(p.q_scales + static_cast<int64_t>(bh) * p.q_tiles + row);
      }
      row_magnitude[r] = fmaxf(row_magnitude[r], FLT_MIN);
    }
    // FP8 scoring: the key groups' scales (rows padded to whole tiles, so no load needs a bound). Each
    // thread loads two of a tile's 256 at its first step and stores them to shared memory at its last,
    // so the epilogue reads them there: loaded in the epilogue they stalled it on L2's latency.
    const float* column_scales =
        kFp8 ? p.k_scales + static_cast<int64_t>(b * p.kv_heads + kv_head) * p.k_scale_stride : nullptr;
    float2 staged_scales = make_float2(0.f, 0.f);

    // The tile's anti-logits are complete in acc: mask, online softmax, group sums into the table. An
    // anti-logit is acc * column scale * row factor: acc is multiplied by the column's scale and the
    // softmax scale's sign (uniform over the kernel), the row maxima are taken over that and multiplied by
    // |row factor| once, and each exponent is one FFMA. Only a tile that reaches past one of the thread's
    // rows' visible end masks (to -inf; row_magnitude is never 0, so no -inf * 0 in the FFMA).
    const bool negative_scale = p.scale_log2 < 0.f;
    const auto reduce_tile = [&](int tile, int parity) {
      if constexpr (kFp8) {
#pragma unroll
        for (int j = 0; j < kTileN / 8; ++j) {
          float2 column_scale = *reinterpret_cast<const float2*>(&smem.column_scales[consumer][parity][8 * j + 2 * t]);
          if (negative_scale) column_scale = make_float2(-column_scale.x, -column_scale.y);
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[4 * j + e] *= (e & 1) ? column_scale.y : column_scale.x;
        }
      } else if (negative_scale) {
#pragma unroll
        for (int i = 0; i < kTileN / 2; ++i) acc[i] = -acc[i];
      }
      int bound[2];  // column 8j + 2t + (e & 1) of the tile is visible to row r if 8j + (e & 1) < bound[r]
#pragma unroll
      for (int r = 0; r < 2; ++r) bound[r] = visible_end[r] - tile * kTileN - 2 * t;
      if (min(bound[0], bound[1]) <= kTileN - 7) {  // some column 8j + (e & 1) <= kTileN - 7 is not visible
#pragma unroll
        for (int j = 0; j < kTileN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[4 * j + e] = 8 * j + (e & 1) < bound[e >> 1] ? acc[4 * j + e] : -INFINITY;
        }
      }
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < kTileN / 2; ++i) tile_max[(i >> 1) & 1] = max_nan(tile_max[(i >> 1) & 1], acc[i]);
      float base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float new_max = max_nan(run_max[r], quad_max(tile_max[r]) * row_magnitude[r]);
        base[r] = new_max == -INFINITY ? 0.f : new_max;  // a NaN logit poisons its row
        run_sum[r] *= exp2f(run_max[r] - base[r]);
        run_max[r] = new_max;
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float groups[kGroups];
#pragma unroll
        for (int j = 0; j < kGroups; ++j) {
          groups[j] = exp2f(fmaf(acc[4 * j + 2 * r], row_magnitude[r], -base[r])) +
                      exp2f(fmaf(acc[4 * j + 2 * r + 1], row_magnitude[r], -base[r]));
          run_sum[r] += groups[j];
        }
        float owned[kGroups / 4];
        quad_reduce_scatter(groups, owned, t, [](float x, float y) { return x + y; });
#pragma unroll
        for (int m = 0; m < kGroups / 4; ++m) {
          cta.group_sums[static_cast<int64_t>(tile * kGroups + 4 * m + t) * kRows + local_row[r]] = owned[m];
        }
        if (t == 0) cta.tile_maxima[tile * kRows + local_row[r]] = run_max[r];
      }
    };

    // If no anti-row of the item sees past the first half of its last tile (under a causal mask, every
    // other item's diagonal tile), that tile's MMAs are m64n128 into the first half of acc: the other
    // half keeps stale values, which the epilogue's mask replaces with -inf (a select, so not even a NaN
    // there survives it).
    const bool narrow_last_tile = cta.columns - (cta.n_tiles - 1) * kTileN <= kTileN / 2;
    for (int step = 0; step < steps; ++step) {
      const int ring_step = step_base + step, stage = ring_step % kStages, in_tile = step % steps_per_tile;
      // The tile within the item, and its parity counted across items (the scales' buffer).
      const int tile = step / steps_per_tile, parity = (ring_step / steps_per_tile) & 1;
      const bool narrow = narrow_last_tile && tile == cta.n_tiles - 1;
      Barrier::wait(&smem.full[stage], (ring_step / kStages) & 1);
      // A step's 128-byte rows: four k16 MMAs of 16-bit values or four k32 MMAs of e4m3, 32 bytes each.
      // The width is chosen outside the loop of MMAs: chosen per MMA, ptxas injected warpgroup.arrives
      // between them (C7519).
      const auto issue_step = [&](auto columns) {
        constexpr int kColumns = decltype(columns)::value;
        cute::warpgroup_arrive();
#pragma unroll
        for (int kk = 0; kk < kPanelRowBytes / 32; ++kk) {
          mma_ss<T, kColumns>(q_desc.at(stage * kQStageBytes + kk * 32), k_desc.at(stage * kKStageBytes + kk * 32),
                              *reinterpret_cast<float(*)[kColumns / 2]>(acc), in_tile > 0 || kk > 0);
        }
        cute::warpgroup_commit_batch();
      };
      if (narrow) {
        issue_step(std::integral_constant<int, kTileN / 2>{});
      } else {
        issue_step(std::integral_constant<int, kTileN>{});
      }
      if constexpr (kFp8) {
        const int pair = tid % 128;  // this thread's columns 2 pair, 2 pair + 1 of the tile
        if (in_tile == 0) staged_scales = __ldg(reinterpret_cast<const float2*>(column_scales + tile * kTileN) + pair);
        if (in_tile == steps_per_tile - 1) {
          *reinterpret_cast<float2*>(&smem.column_scales[consumer][parity][2 * pair]) = staged_scales;
        }
      }
      if (in_tile == steps_per_tile - 1) {
        cute::warpgroup_wait<0>();
        fence_registers(acc);
        if (lane == 0) {  // this step's stage and, within the tile, the previous step's
          if (in_tile > 0) Barrier::arrive(&smem.empty[(ring_step - 1) % kStages]);
          Barrier::arrive(&smem.empty[stage]);
        }
        // The warpgroup's scales stored (a buffer per tile parity: a warp that runs ahead stores the next
        // tile's, of this item or the next, into the other while the rest still read these).
        if constexpr (kFp8) cutlass::arch::NamedBarrier::sync(128, 2 + consumer);
        reduce_tile(tile, parity);
      } else {
        cute::warpgroup_wait<1>();  // the previous step's MMAs are done: its stage may be refilled
        if (lane == 0 && in_tile > 0) Barrier::arrive(&smem.empty[(ring_step - 1) % kStages]);
      }
    }
    // Nothing is in flight (a tile's last step waited for all), but ptxas cannot see that across the
    // loop's branches and would insert this wait itself (warning C7517).
    cute::warpgroup_wait<0>();
    step_base += steps;

    // Hand the rows' final maxima and sums to the finisher warps (once they are done with this slot's
    // item two back); each thread's arrive releases its table writes to them.
    const int slot = local & 1;
    Barrier::wait(&smem.rows_free[slot], ((local >> 1) & 1) ^ 1);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float row_sum = quad_sum(run_sum[r]);
      if (t == 0) {
        smem.row_max[slot][local_row[r]] = run_max[r];
        smem.row_sum[slot][local_row[r]] = row_sum;
      }
    }
    Barrier::arrive(&smem.rows_ready[slot]);
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <typename T, int kHeadDim>
cudaError_t launch_estimate_antidiagonal_sm90(const AntidiagonalParams& p, cudaStream_t stream) {
  using Shape = AntidiagonalSm90Shape<kHeadDim>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const int S = p.stride;
  if (S > Shape::kMaxStride || p.q_len < S || p.k_len < S) return cudaErrorInvalidValue;  // the host checks
  AntidiagonalSm90Params params{};
  params.base = p;
  if constexpr (std::is_same_v<T, __nv_fp8_e4m3>) {
    // The quantized rows: [B, H, tiles, S * D] bytes, contiguous.
    const int64_t row_bytes = static_cast<int64_t>(S) * kHeadDim;
    if (row_bytes % kPanelRowBytes != 0) return cudaErrorInvalidValue;  // the host checks
    cudaError_t status = encode_byte_rows_map(&params.q_maps[0], p.q, p.batch, p.q_heads, p.q_tiles, row_bytes,
                                              Shape::kRows);
    if (status == cudaSuccess) {
      status = encode_byte_rows_map(&params.k_maps[0], p.k, p.batch, p.kv_heads, p.k_tiles, row_bytes, Shape::kTileN);
    }
    if (status != cudaSuccess) return status;
  } else {
    for (int member = 0; member < S; ++member) {
      // Rows member, member + S, ...: the view from token `member` with S times the token stride.
      const int64_t q_strides[3] = {p.q_stride[0], p.q_stride[1], S * p.q_stride[2]};
      const int64_t k_strides[3] = {p.k_stride[0], p.k_stride[1], S * p.k_stride[2]};
      const auto* q = static_cast<const T*>(p.q) + member * p.q_stride[2];
      const auto* k = static_cast<const T*>(p.k) + member * p.k_stride[2];
      cudaError_t status = encode_bhld_map(&params.q_maps[member], q, kBf16, p.batch, p.q_heads,
                                           (p.q_len - member + S - 1) / S, kHeadDim, q_strides, Shape::kRows);
      if (status == cudaSuccess) {
        status = encode_bhld_map(&params.k_maps[member], k, kBf16, p.batch, p.kv_heads,
                                 (p.k_len - member + S - 1) / S, kHeadDim, k_strides, Shape::kTileN);
      }
      if (status != cudaSuccess) return status;
    }
  }
  auto kernel = estimate_antidiagonal_sm90_kernel<T, kHeadDim>;
  constexpr size_t smem = sizeof(AntidiagonalSm90Storage<kHeadDim>) + kSwizzleAtomBytes;  // + alignment slack
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem));
  if (status != cudaSuccess) return status;
  // Persistent: one CTA per SM (its shared memory allows no second), each taking work items in turn.
  int sms = 0;
  status = current_sm_count(&sms);
  if (status != cudaSuccess) return status;
  const int64_t items = Shape::ctas_per_head(p.n_q, p.block_m / S) * p.bh_count;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(items, sms)));
  kernel<<<grid, Shape::kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace psa::kernels::sm90
