// The psa operator family: every schema, once, and the composite ops. Each backend registers its kernels
// under its own dispatch key (cpu/registration.cpp, cuda/registration.cpp); fake (meta) kernels and
// autograd live in psa/ops.py (the non-differentiable stages' autograd kernel in autograd.cpp).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(psa, m) {
  m.def("kv_pyramid(Tensor k, Tensor v) -> (Tensor k2, Tensor v2, Tensor k4, Tensor v4, Tensor k8, Tensor v8)");
  m.def(
      "kv_pyramid_backward(Tensor dk2, Tensor dv2, Tensor dk4, Tensor dv4, Tensor dk8, Tensor dv8, *, SymInt k_len) "
      "-> (Tensor dk, Tensor dv)");
  m.def(
      "estimate_importance(Tensor q, Tensor k, Tensor? q_offsets=None, Tensor? k_offsets=None, Tensor? k8=None, *, "
      "int block_m, int block_n, str method, float? scale=None, bool causal=False, int stride=8, "
      "str precision='full') -> Tensor");
  m.def(
      "assign_levels(Tensor scores, Tensor? force_keys=None, Tensor? force_queries=None, Tensor? k=None, *, "
      "str mode, float[] bounds, int block_m, int block_n, SymInt q_len, SymInt k_len, float min_full=0.06, "
      "bool causal=False, bool sink=True, float[]? sim_thresholds=None) -> Tensor");
  m.def(
      "attention_over_pyramid(Tensor q, Tensor k, Tensor v, Tensor k2, Tensor v2, Tensor k4, Tensor v4, Tensor k8, "
      "Tensor v8, Tensor levels, *, int block_m, int block_n, float? scale=None, bool causal=False) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "attention_over_pyramid_backward(Tensor? grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor k2, "
      "Tensor v2, Tensor k4, Tensor v4, Tensor k8, Tensor v8, Tensor levels, Tensor out, Tensor lse, *, int block_m, "
      "int block_n, float? scale=None, bool causal=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dk2, "
      "Tensor dv2, Tensor dk4, Tensor dv4, Tensor dk8, Tensor dv8)");
  m.def(
      "attention_with_levels(Tensor q, Tensor k, Tensor v, Tensor levels, *, int block_m, int block_n, "
      "float? scale=None, bool causal=False) -> (Tensor out, Tensor lse)");
  m.def(
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor? force_keys=None, Tensor? force_queries=None, "
      "Tensor? q_offsets=None, Tensor? k_offsets=None, *, int block_m, int block_n, str mode, float[] bounds, "
      "str estimator, float min_full, float[]? sim_thresholds, bool causal, bool sink, int stride, "
      "float? scale=None, str precision='full') -> (Tensor out, Tensor lse, Tensor levels)");
}

// The composite ops: stage ops called through the dispatcher, for every backend (ops.h).
TORCH_LIBRARY_IMPL(psa, CompositeImplicitAutograd, m) {
  m.impl("attention_with_levels", &psa::attention_with_levels);
  m.impl("sparse_attention", &psa::sparse_attention);
}
