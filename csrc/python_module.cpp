// The Python module svd_fast._C. It holds no functions: importing it loads this library, whose
// TORCH_LIBRARY registrations make the ops available as torch.ops.svd_fast.*.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
