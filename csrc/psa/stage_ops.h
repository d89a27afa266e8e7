// Typed handles of psa's own ops, for the composite ops that call their stages through the dispatcher
// (so that each call goes through autograd, tracing and the backend of its inputs).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace psa {

template <typename Signature>
c10::TypedOperatorHandle<Signature> stage_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace psa
