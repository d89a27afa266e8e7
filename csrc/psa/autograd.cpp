// Autograd for the stages that decide the level map (estimate_importance, assign_levels): their outputs
// have no gradient, as torch.argmax's. The kernel runs the op below autograd, so its outputs never
// require grad and backward through them raises PyTorch's "does not require grad".
//
// This is C++ rather than torch.library.register_autograd because each call of these ops (sparse_attention
// makes both) would otherwise cross into Python and back: ~20 us of host time a call on a 2-core CPU,
// which shows in the wall time of a stage whose GPU work is tens of microseconds (the pooled estimate).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace psa {
namespace {

void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace
}  // namespace psa

TORCH_LIBRARY_IMPL(psa, Autograd, m) {
  m.impl("estimate_importance", torch::CppFunction::makeFromBoxedFunction<&psa::below_autograd>());
  m.impl("assign_levels", torch::CppFunction::makeFromBoxedFunction<&psa::below_autograd>());
}
