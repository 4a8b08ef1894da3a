// Python module object for flash_quant._C. Importing it runs the static registrations
// (TORCH_LIBRARY in schema.cpp, TORCH_LIBRARY_IMPL in the backend files); the module
// itself exports nothing.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "flash_quant native kernels (registered as torch ops)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
