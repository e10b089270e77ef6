// Python module entry for moe_kernels._C; the ops register themselves with the dispatcher
// (torch.ops.moe_kernels_C.*) when this library is loaded.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "moe_kernels native CPU ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
