// The (empty) Python module of the extension. The operators' schemas are defined once, in Python
// (esta_kernels/_ext.py, before this library is loaded); kernels register per device in csrc/cpu/ and
// csrc/cuda/ with TORCH_LIBRARY_IMPL; fakes and autograd are registered from Python (esta_kernels/_ops.py,
// esta_kernels/_lstsq_ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing esta_kernels._C loads this library, which runs the TORCH_LIBRARY_IMPL registrations of csrc/cpu and csrc/cuda.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
