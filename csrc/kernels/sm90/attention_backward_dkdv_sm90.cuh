// The backward's key-major dK / dV pass for Hopper (sm_90a): TMA, mbarriers, wgmma, warp specialization.
// Same contract as attention_backward_dkdv_kernel in ../attention_backward.cuh (the mma.sync fallback);
// this file changes how the tiles move and multiply. docs/spec.md section 7 has the math.
//
// One launch per level L; one CTA per key block at that level of one (batch, key head) where the block
// has 128 pooled keys (kKeyRows 128), else per 64 pooled keys (kKeyRows 64): one key block of 64, or
// 64 / (block_n >> L) consecutive shorter blocks packed, each tile masking the blocks that did not choose
// its query block. K and V of those keys stay in shared memory.
//   - Warp 0 walks the level map's columns of the CTA's key blocks for entries equal to 1 << L over the
//     (query head of the GQA group, query block) pairs, 32 at a time with a ballot as the mma.sync kernel
//     does, and loads the query rows of each pair any of its blocks chose (with the mask of those blocks)
//     as kQTile-row tiles into a ring of stages: Q and dO by TMA (rows past Lq read as zeros), the rows'
//     lse (exp2 domain) and delta by the warp's lanes. A tile with q_begin = -1 ends
//     the walk (one per consumer stream).
//   - Consumer warpgroups, per tile, on 64 keys each:
//       S^T = K Q^T and dP^T = V dO^T (one SS wgmma batch, both operands in shared memory),
//       P^T = exp2(S^T scale + bias - lse), dS^T = P^T (dP^T - delta) (in place, fp32),
//       dV += P^T dO and dK += dS^T Q (RS wgmma: P^T and dS^T from registers, dO and Q read as the forward
//       reads V, the query rows as the MMA's K dimension).
//     dV's MMA is issued as soon as P^T is packed and runs while dS^T is computed; beyond that the two
//     warpgroups' MMAs and elementwise work interleave on the tensor cores. (Overlapping tile j's S^T /
//     dP^T with tile j - 1's dK / dV as the dq pass does needs S^T, dP^T, both fragments and dK, dV
//     live at once: it spilled.)
// Every pooled key belongs to one CTA, so dK_L and dV_L are written once each, without atomics: the
// result does not depend on scheduling. dK is scaled by the softmax scale once, at the end.
#pragma once

#include <cfloat>
#include <climits>
#include <type_traits>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cute/arch/copy_sm90_tma.hpp>

#include "../common/level_gradient_rows.cuh"
#include "../device_utils.cuh"
#include "../params.h"
#include "shapes_sm90.h"
#include "tensor_map.h"
#include "wgmma.cuh"

namespace psa::kernels::sm90 {

// AttentionBackwardParams plus the TMA descriptors: Q and dO (box: kQTile rows), the launch's level's
// pooled K and V (box: 64 rows). Passed as a __grid_constant__ kernel parameter so TMA reads it in place.
struct KeyBackwardSm90Params {
  AttentionBackwardParams backward;
  CUtensorMap q_map;  // CUtensorMap is 64-byte aligned by its type
  CUtensorMap d_out_map;
  CUtensorMap k_map;
  CUtensorMap v_map;
};

template <typename T, int kHeadDim, int kKeyRows>
__global__ void __launch_bounds__(KeyBackwardSm90Shape<kHeadDim, kKeyRows>::kThreads, 1)
    attention_backward_dkdv_sm90_kernel(const __grid_constant__ KeyBackwardSm90Params params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = KeyBackwardSm90Shape<kHeadDim, kKeyRows>;
  using Storage = KeyBackwardSm90Storage<kHeadDim, kKeyRows>;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kStages = Shape::kStages, kPanels = Shape::kPanels, kQTile = Shape::kQTile;
  constexpr bool kSplit = Shape::kSplitTiles;
  constexpr float kLog2e = 1.4426950408889634f;
  const AttentionBackwardParams& bp = params.backward;
  const AttentionParams& p = bp.base;
  const int L = bp.level;

  extern __shared__ unsigned char smem_unaligned[];
  Storage& smem = aligned_shared<Storage, kSwizzleAtomBytes>(smem_unaligned);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bkv = blockIdx.y, b = bkv / p.kv_heads, kv_head = bkv % p.kv_heads;
  const int per_block = p.block_n >> L;               // <= kKeyRows
  const int tokens = (p.k_len + (1 << L) - 1) >> L;
  // Key blocks shorter than the CTA's rows are packed: blocks first_block .. + blocks_per_cta - 1 share
  // its rows (consecutive blocks hold consecutive pooled tokens), and a tile masks the blocks whose
  // level-map entry did not ask for it.
  const int blocks_per_cta = kKeyRows / per_block;
  const int first_block = blockIdx.x * blocks_per_cta;
  const int first_token = first_block * per_block;   // the CTA's first pooled row

  if (tid == 0) {
    Barrier::init(&smem.kv_full, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&smem.full[s], 32);                               // the loader warp's lanes (+ TMA bytes)
      Barrier::init(&smem.empty[s], Shape::kConsumersPerTile * 128);  // every consuming thread
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (warp < 4) {
    // ================= Producer warpgroup: warp 0 loads, the others leave =================
    cutlass::arch::warpgroup_reg_dealloc<Shape::kProducerRegisters>();
    if (warp != 0) return;
    // The CTA's keys and values: one 64-row box per panel and 64 rows. Rows past the block belong to the
    // next key block (their bias is -inf in the consumers); rows past the level's length read as zeros.
    if (lane == 0) {
      TxBarrier::arrive_and_expect_tx(&smem.kv_full, static_cast<uint32_t>(sizeof(smem.k) + sizeof(smem.v)));
#pragma unroll
      for (int c = 0; c < kKeyRows / 64; ++c) {
#pragma unroll
        for (int panel = 0; panel < kPanels; ++panel) {
          cute::SM90_TMA_LOAD_4D::copy(&params.k_map, &smem.kv_full, 0, &smem.k[panel][c * 64][0],
                                       panel * kPanelColumns, first_token + c * 64, kv_head, b);
          cute::SM90_TMA_LOAD_4D::copy(&params.v_map, &smem.kv_full, 0, &smem.v[panel][c * 64][0],
                                       panel * kPanelColumns, first_token + c * 64, kv_head, b);
        }
      }
    }
    const int group = p.q_heads / p.kv_heads;
    const int candidates = group * p.n_q;  // (query head of the group, query block), query blocks fastest
    const int8_t wanted = static_cast<int8_t>(1 << L);
    int tile = 0;  // tiles loaded so far: the ring's stage and phase
    const auto claim_stage = [&] {
      const int stage = tile % kStages;
      Barrier::wait(&smem.empty[stage], ((tile / kStages) & 1) ^ 1);
      return stage;
    };
    // Candidate c's mask: bit jj set where key block first_block + jj's entry asks for level L. Lane l
    // reads candidate base + l's entries; the next 32 are read before this round's tiles are issued, so
    // the column walk's loads overlap the TMA traffic instead of stalling between rounds.
    const int blocks_here = min(blocks_per_cta, p.n_k - first_block);
    const auto wanted_blocks = [&](int c) {
      uint32_t mask = 0;
      if (c < candidates) {
        const int h = kv_head * group + c / p.n_q, i = c % p.n_q;
        const int8_t* entries = p.levels + ((static_cast<int64_t>(b) * p.q_heads + h) * p.n_q + i) * p.n_k + first_block;
        for (int jj = 0; jj < blocks_here; ++jj) mask |= static_cast<uint32_t>(entries[jj] == wanted) << jj;
      }
      return mask;
    };
    uint32_t next_mask = wanted_blocks(lane);
    for (int base = 0; base < candidates; base += 32) {
      const uint32_t round_mask = next_mask;
      const unsigned round_hits = __ballot_sync(0xffffffffu, round_mask != 0);
      next_mask = wanted_blocks(base + 32 + lane);
      for (unsigned hits = round_hits; hits != 0; hits &= hits - 1) {
        const int hit_lane = __ffs(hits) - 1, c = base + hit_lane;
        const uint32_t mask = __shfl_sync(0xffffffffu, round_mask, hit_lane);
        const int h = kv_head * group + c / p.n_q, i = c % p.n_q;
        const int64_t row_base = (static_cast<int64_t>(b) * p.q_heads + h) * p.q_len;
        const int block_begin = i * bp.block_m, block_end = min(block_begin + bp.block_m, p.q_len);
        for (int q0 = block_begin; q0 < block_end; q0 += kQTile, ++tile) {
          const int stage = claim_stage();
#pragma unroll
          for (int r = lane; r < kQTile; r += 32) {
            const bool valid = q0 + r < block_end;
            const float lse = valid ? bp.lse[row_base + q0 + r] : -INFINITY;
            smem.lse[stage][r] = lse == -INFINITY ? INFINITY : lse * kLog2e;  // +inf: P = 0
            smem.delta[stage][r] = valid ? bp.delta[row_base + q0 + r] : 0.f;
          }
          // Every lane arrives after its own stores; lane 0 also announces the TMA bytes.
          if (lane == 0) {
            smem.q_begin[stage] = q0;
            smem.blocks[stage] = mask;
            TxBarrier::arrive_and_expect_tx(&smem.full[stage], static_cast<uint32_t>(sizeof(smem.q[0]) * 2));
#pragma unroll
            for (int panel = 0; panel < kPanels; ++panel) {
              cute::SM90_TMA_LOAD_4D::copy(&params.q_map, &smem.full[stage], 0, &smem.q[stage][panel][0][0],
                                           panel * kPanelColumns, q0, h, b);
              cute::SM90_TMA_LOAD_4D::copy(&params.d_out_map, &smem.full[stage], 0, &smem.d_out[stage][panel][0][0],
                                           panel * kPanelColumns, q0, h, b);
            }
          } else {
            Barrier::arrive(&smem.full[stage]);
          }
        }
      }
    }
    // The end of the walk, once per consumer stream (the split variant's warpgroups take alternate tiles).
#pragma unroll
    for (int end = 0; end < (kSplit ? 2 : 1); ++end, ++tile) {
      const int stage = claim_stage();
      if (lane == 0) smem.q_begin[stage] = -1;
      Barrier::arrive(&smem.full[stage]);
    }
  } else {
    // ================= Consumer warpgroups =================
    cutlass::arch::warpgroup_reg_alloc<Shape::kConsumerRegisters>();
    const int consumer = __shfl_sync(0xffffffffu, warp / 4 - 1, 0), warp_in_group = warp % 4;
    const int g = lane >> 2, t = lane & 3;
    const int causal_offset = p.k_len - p.q_len;
    const int group_row = (kSplit ? 0 : consumer * 64);  // the warpgroup's first key row in the CTA

    // This thread's two key rows (accumulator rows g and g + 8 of its warp): their key block within the
    // CTA, bias log2(keys covered) (-inf for a row past the level or the CTA's blocks), and the last key
    // each covers (causal mask).
    float row_bias[2];
    int row_last[2], row_block[2];
    bool row_valid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = group_row + warp_in_group * 16 + g + 8 * r, token = first_token + row;
      row_block[r] = row / per_block;
      row_valid[r] = row_block[r] < blocks_per_cta && first_block + row_block[r] < p.n_k && token < tokens;
      const int covered = row_valid[r] ? min((token + 1) << L, p.k_len) - (token << L) : 0;
      row_bias[r] = !row_valid[r]           ? -INFINITY
                    : covered == (1 << L)   ? static_cast<float>(L)
                                            : __log2f(static_cast<float>(covered));
      row_last[r] = row_valid[r] ? min((token + 1) << L, p.k_len) - 1 : INT_MAX;
    }
    // Warpgroup-uniform: do its 64 keys all cover 2^L keys inside the block (the common case, one bias
    // for the whole tile), and the last key any of them covers (whether a tile needs the causal mask).
    const int group_first_token = first_token + group_row;
    const bool group_full = group_row + 64 <= blocks_per_cta * per_block && (group_first_token + 64) << L <= p.k_len;
    // A tile whose mask holds every block of the CTA needs no per-row block test.
    const uint32_t every_block = (1u << blocks_per_cta) - 1;
    const int group_last_key = min((group_first_token + 64) << L, p.k_len) - 1;

    float dk[kHeadDim / 2], dv[kHeadDim / 2];
    float st[kQTile / 2];            // S^T, then P^T
    float dpt[kQTile / 2];           // dP^T, then dS^T
    uint32_t pa[kQTile / 16][4];     // P^T as the dV MMA's A fragments
    uint32_t dsa[kQTile / 16][4];    // dS^T as the dK MMA's A fragments
#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) dk[i] = dv[i] = 0.f;

    // Operand descriptors, built once; per MMA only the start address moves.
    const auto k_desc = SmemDescriptor::of(&smem.k[0][group_row][0], 16, kSwizzleAtomBytes);
    const auto v_desc = SmemDescriptor::of(&smem.v[0][group_row][0], 16, kSwizzleAtomBytes);
    const auto q_desc = SmemDescriptor::of(&smem.q[0][0][0][0], 16, kSwizzleAtomBytes);
    const auto d_out_desc = SmemDescriptor::of(&smem.d_out[0][0][0][0], 16, kSwizzleAtomBytes);
    const auto q_as_b_desc = SmemDescriptor::of(&smem.q[0][0][0][0], kQTile * kPanelRowBytes, kSwizzleAtomBytes);
    const auto d_out_as_b_desc =
        SmemDescriptor::of(&smem.d_out[0][0][0][0], kQTile * kPanelRowBytes, kSwizzleAtomBytes);
    constexpr uint32_t kStageBytes = sizeof(smem.q[0]);
    static_assert(sizeof(smem.d_out[0]) == kStageBytes, "Q and dO stages advance alike");

    // S^T = K Q^T and dP^T = V dO^T of one stage: one batch of SS MMAs.
    const auto issue_s_dp = [&](int stage) {
      fence_registers(st);
      fence_registers(dpt);
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t key_offset = k_major_step_offset(kk, kKeyRows);
        const uint32_t query_offset = stage * kStageBytes + k_major_step_offset(kk, kQTile);
        mma_ss<T, kQTile>(k_desc.at(key_offset), q_desc.at(query_offset), st, kk > 0);
        mma_ss<T, kQTile>(v_desc.at(key_offset), d_out_desc.at(query_offset), dpt, kk > 0);
      }
      cute::warpgroup_commit_batch();
    };
    // accumulator += fragments x rows of one stage: dV += P^T dO and dK += dS^T Q, P^T and dS^T from
    // their A fragments, the stage's dO or Q as the B operand.
    const auto issue_rs = [&](int stage, const uint32_t (&fragments)[kQTile / 16][4], SmemDescriptor rows_as_b,
                              float (&accumulator)[kHeadDim / 2]) {
      fence_registers(accumulator);
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < kQTile / 16; ++kk) {
        // k16 step kk: 16 query rows further down the tile.
        mma_rs<T, kHeadDim>(fragments[kk], rows_as_b.at(stage * kStageBytes + kk * 16 * kPanelRowBytes), accumulator);
      }
      cute::warpgroup_commit_batch();
    };
    // P^T into st, then (make_ds) dS^T into dpt. Element st[4c + e]: key row (e >> 1), query column
    // 8c + 2t + (e & 1).
    const auto make_p = [&](int stage, int q0) {
      const bool masked = p.causal && group_last_key > q0 + causal_offset;
      const uint32_t blocks = smem.blocks[stage];
      const bool all_blocks = blocks == every_block;
      // The rows of blocks that did not ask for this tile take no part in it.
      const float bias[2] = {(blocks >> row_block[0]) & 1 ? row_bias[0] : -INFINITY,
                             (blocks >> row_block[1]) & 1 ? row_bias[1] : -INFINITY};
#pragma unroll
      for (int c = 0; c < kQTile / 8; ++c) {
        const float2 lse = *reinterpret_cast<const float2*>(&smem.lse[stage][8 * c + 2 * t]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const float column_lse = (e & 1) ? lse.y : lse.x;
          float x;
          if (group_full && all_blocks && !masked) {
            x = fmaf(st[4 * c + e], p.scale_log2, static_cast<float>(L) - column_lse);
          } else {
            x = fmaf(st[4 * c + e], p.scale_log2, bias[r]) - column_lse;
            if (masked && row_last[r] > q0 + 8 * c + 2 * t + (e & 1) + causal_offset) x = -INFINITY;
          }
          st[4 * c + e] = exp2f(x);
        }
      }
    };
    const auto make_ds = [&](int stage) {
#pragma unroll
      for (int c = 0; c < kQTile / 8; ++c) {
        const float2 delta = *reinterpret_cast<const float2*>(&smem.delta[stage][8 * c + 2 * t]);
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[4 * c + e] = st[4 * c + e] * (dpt[4 * c + e] - ((e & 1) ? delta.y : delta.x));
      }
    };
    // The accumulator's n8 chunks 2kk, 2kk + 1 are the A fragment of k16 step kk (the forward's P).
    const auto pack = [&](uint32_t (&fragments)[kQTile / 16][4], const float (&accumulator)[kQTile / 2]) {
#pragma unroll
      for (int kk = 0; kk < kQTile / 16; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          fragments[kk][i] = pack2<T>(accumulator[8 * kk + 2 * i], accumulator[8 * kk + 2 * i + 1]);
        }
      }
    };
    // This warpgroup's tiles: all of them, or (split) every other one from its own index.
    constexpr int kTileStep = kSplit ? 2 : 1;
    const auto wait_tile = [&](int tile) {
      const int stage = tile % kStages;
      Barrier::wait(&smem.full[stage], (tile / kStages) & 1);
      return stage;
    };
    // Every consumer thread arrives: each read the stage's lse, delta and block mask with ordinary loads,
    // and its own arrive orders those reads before the loader's next writes to the stage.
    const auto release = [&](int stage) { Barrier::arrive(&smem.empty[stage]); };

    // Per tile: S^T / dP^T, then P^T; dV's MMA runs while dS^T is computed, then dK's.
    Barrier::wait(&smem.kv_full, 0);
    for (int tile = kSplit ? consumer : 0;; tile += kTileStep) {
      const int stage = wait_tile(tile);
      const int q0 = smem.q_begin[stage];
      if (q0 < 0) break;
      issue_s_dp(stage);
      cute::warpgroup_wait<0>();
      fence_registers(st);
      fence_registers(dpt);
      make_p(stage, q0);
      pack(pa, st);
      issue_rs(stage, pa, d_out_as_b_desc, dv);
      make_ds(stage);
      pack(dsa, dpt);
      issue_rs(stage, dsa, q_as_b_desc, dk);
      cute::warpgroup_wait<0>();
      fence_registers(dk);
      fence_registers(dv);
      release(stage);
    }

    // ---- Epilogue. Split: the second warpgroup hands its sums to the first through shared memory.
    const int wg_thread = tid % 128;
    if constexpr (kSplit) {
      if (consumer == 1) {
#pragma unroll
        for (int i = 0; i < kHeadDim / 2; ++i) {
          smem.partials.dk[i][wg_thread] = dk[i];
          smem.partials.dv[i][wg_thread] = dv[i];
        }
      }
      cutlass::arch::NamedBarrier::sync(Shape::kConsumers * 128, 0);
      if (consumer == 1) return;
#pragma unroll
      for (int i = 0; i < kHeadDim / 2; ++i) {
        dk[i] += smem.partials.dk[i][wg_thread];
        dv[i] += smem.partials.dv[i][wg_thread];
      }
    }
    const LevelGradientRows<T> out = level_gradient_rows<T, kHeadDim>(bp, L, bkv, tokens);
    // dk[i] / dv[i] belong to key row (i >> 1) & 1, column 8 (i >> 2) + 2t + (i & 1): consecutive pairs
    // are one 4-byte store.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!row_valid[r]) continue;
      const int64_t token = first_token + group_row + warp_in_group * 16 + g + 8 * r;
      T* dk_row = out.dk + token * kHeadDim;
      T* dv_row = out.dv + token * kHeadDim;
#pragma unroll
      for (int c = 0; c < kHeadDim / 8; ++c) {
        *reinterpret_cast<uint32_t*>(dk_row + 8 * c + 2 * t) =
            pack2<T>(dk[4 * c + 2 * r] * bp.scale, dk[4 * c + 2 * r + 1] * bp.scale);
        *reinterpret_cast<uint32_t*>(dv_row + 8 * c + 2 * t) = pack2<T>(dv[4 * c + 2 * r], dv[4 * c + 2 * r + 1]);
      }
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// Encodes the maps and launches one CTA per (kKeyRows pooled keys, batch x key head) for the level in
// `bp.level`.
template <typename T, int kHeadDim, int kKeyRows>
cudaError_t launch_attention_backward_dkdv_sm90(const AttentionBackwardParams& bp, cudaStream_t stream) {
  using Shape = KeyBackwardSm90Shape<kHeadDim, kKeyRows>;
  using Storage = KeyBackwardSm90Storage<kHeadDim, kKeyRows>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  KeyBackwardSm90Params params{};
  params.backward = bp;
  const AttentionParams& p = bp.base;
  const int level = bp.level;
  // dO is contiguous [B, Hq, Lq, D] (the host makes it so).
  const int64_t d_out_strides[3] = {static_cast<int64_t>(p.q_heads) * p.q_len * kHeadDim,
                                    static_cast<int64_t>(p.q_len) * kHeadDim, kHeadDim};
  const int64_t tokens = (static_cast<int64_t>(p.k_len) + (1 << level) - 1) >> level;
  cudaError_t status = encode_bhld_map(&params.q_map, p.q, kBf16, p.batch, p.q_heads, p.q_len, kHeadDim, p.q_stride,
                                       Shape::kQTile);
  if (status == cudaSuccess) {
    status = encode_bhld_map(&params.d_out_map, bp.grad_out, kBf16, p.batch, p.q_heads, p.q_len, kHeadDim,
                             d_out_strides, Shape::kQTile);
  }
  if (status == cudaSuccess) {
    status = encode_bhld_map(&params.k_map, p.k[level], kBf16, p.batch, p.kv_heads, tokens, kHeadDim,
                             p.k_stride[level], 64);
  }
  if (status == cudaSuccess) {
    status = encode_bhld_map(&params.v_map, p.v[level], kBf16, p.batch, p.kv_heads, tokens, kHeadDim,
                             p.v_stride[level], 64);
  }
  if (status != cudaSuccess) return status;
  constexpr size_t smem = Storage::smem_bytes();
  auto kernel = attention_backward_dkdv_sm90_kernel<T, kHeadDim, kKeyRows>;
  status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (status != cudaSuccess) return status;
  const int blocks_per_cta = kKeyRows / (p.block_n >> level);
  const dim3 grid(static_cast<unsigned>((p.n_k + blocks_per_cta - 1) / blocks_per_cta),
                  static_cast<unsigned>(p.batch * p.kv_heads));
  kernel<<<grid, Shape::kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace psa::kernels::sm90
