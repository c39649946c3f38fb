// The Python module eyecool_ext._C. Importing it runs the TORCH_LIBRARY registrations of every other file;
// it also reports how it was built and which CPU ISA variant the kernels run (for eyecool_ext.collect_env and
// eyecool_ext.cpu_isa). The one file that includes Python.h.
#include <Python.h>

#include <exception>

#include "cpu/cpu_features.h"

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

// The CPU ISA the kernels' dispatch picks (cpu_features.h), as a name; a bad EYECOOL_CPU_ISA becomes ValueError.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(eyecool::cpu_isa_name(eyecool::cpu_isa()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* cpu_isa_supported(PyObject*, PyObject*) {
  return PyUnicode_FromString(eyecool::cpu_isa_name(eyecool::cpu_isa_supported()));
}

PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the extension was compiled with CUDA kernels."},
    {"cuda_version", cuda_version, METH_NOARGS, "CUDART_VERSION the extension was compiled against, or None."},
    {"cuda_arch_list", cuda_arch_list, METH_NOARGS, "TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for."},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The ISA variant the CPU kernels run: 'baseline', 'avx2' or 'avx512' (the CPU's best, capped by "
     "EYECOOL_CPU_ISA)."},
    {"cpu_isa_supported", cpu_isa_supported, METH_NOARGS,
     "The widest ISA variant this CPU can run, ignoring EYECOOL_CPU_ISA."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "eyecool's compiled kernels (registered as torch.ops.eyecool)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
