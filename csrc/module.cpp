// The Python module eyecool_ext._C. Importing it runs the TORCH_LIBRARY registrations of every other file;
// it also reports how it was built (for eyecool_ext.collect_env). The one file that includes Python.h.
#include <Python.h>

#ifndef EYECOOL_CUDA_ARCHS
#define EYECOOL_CUDA_ARCHS ""
#endif

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cuda_version(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  return PyLong_FromLong(CUDART_VERSION);
#else
  Py_RETURN_NONE;
#endif
}

PyObject* cuda_arch_list(PyObject*, PyObject*) { return PyUnicode_FromString(EYECOOL_CUDA_ARCHS); }

PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the extension was compiled with CUDA kernels."},
    {"cuda_version", cuda_version, METH_NOARGS, "CUDART_VERSION the extension was compiled against, or None."},
    {"cuda_arch_list", cuda_arch_list, METH_NOARGS, "TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "eyecool's compiled kernels (registered as torch.ops.eyecool)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
