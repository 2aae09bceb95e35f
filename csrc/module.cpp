// The Python module `fusedemb._C`. It has no Python functions of its own: importing it loads
// this shared library, whose static initialisers register the operators in fused_embedding.cpp
// with the PyTorch dispatcher (torch.ops.fusedemb.*).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
