// Typed handles of psa's own ops, for the composite ops that call their stages through the dispatcher
// (so that each call goes through autograd, tracing and the backend of its inputs). The signatures are
// the schemas' (registration.cpp), SymInts included.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>

namespace psa {

using KvPyramidCall = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&);
using EstimateImportanceCall = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                          int64_t, int64_t, const std::string&, std::optional<double>, bool, int64_t,
                                          const std::string&);
using AssignLevelsCall = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                    const std::string&, at::ArrayRef<double>, int64_t, int64_t, c10::SymInt,
                                    c10::SymInt, double, bool, bool, std::optional<at::ArrayRef<double>>);
using AttentionOverPyramidCall = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
    std::optional<double>, bool);
using AttentionWithLevelsCall = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&, int64_t,
                                                                   int64_t, std::optional<double>, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> stage_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace psa
