// Scratch tables by slot instead of by CTA. A kernel whose CTAs each need a large scratch table (the
// sampled estimator's block maxima: kRows x n_k floats, 605 KB per CTA at L = 75600) would need one table
// per CTA of the grid, or a grid cut into launches that fit a memory cap, each ending in a partial wave.
// Only the CTAs resident at once need tables, so a CTA takes one of `slots` tables for its lifetime: with
// at most `slots` CTAs resident (the host's bound, e.g. the SM count for a kernel whose shared memory
// admits one CTA per SM), a resident CTA always finds a free slot.
//
// `busy` ([slots], zero before the launch, zero again after it) marks the slots held. A CTA probes from
// the slot of its SM: with one CTA per SM the previous CTA there has just released that slot, so the
// first compare-and-swap takes it; SM ids past `slots` (ids need not be contiguous) only probe further.
#pragma once

namespace psa::kernels {

__device__ __forceinline__ unsigned sm_id() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

// One thread per CTA; broadcast the slot to the others (through shared memory and a barrier).
__device__ __forceinline__ int acquire_table_slot(unsigned* busy, int slots) {
  int slot = static_cast<int>(sm_id() % static_cast<unsigned>(slots));
  while (atomicCAS(busy + slot, 0u, 1u) != 0u) slot = slot + 1 == slots ? 0 : slot + 1;
  __threadfence();  // the previous holder's last reads of the table come before this CTA's writes
  return slot;
}

// One thread per CTA, after a barrier that follows every thread's last access to the slot's table.
__device__ __forceinline__ void release_table_slot(unsigned* busy, int slot) {
  __threadfence();
  atomicExch(busy + slot, 0u);
}

}  // namespace psa::kernels
