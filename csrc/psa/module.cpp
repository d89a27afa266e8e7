// `import psa._C` loads this library, which runs the static TORCH_LIBRARY registrations. The ops are
// reached through torch.ops.psa, never through Python bindings (they would break torch.compile).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "psa operator library", -1, nullptr};
  return PyModule_Create(&module);
}
