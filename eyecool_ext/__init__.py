"""eyecool's C++/CUDA ops for PyTorch.

``eyecool_ext.ops`` holds the typed Python API of every op (drop-in for torchvision's where they overlap);
``eyecool_ext.reference`` holds a plain PyTorch implementation of each, with the same signature, used as the
test oracle and as the fallback when the compiled extension is missing.
"""
from eyecool_ext._extension import (compiled, compiled_with_cuda, compiled_with_cuda_emulation, cpu_isa,
                                    cpu_isa_supported, load_error)
from eyecool_ext import ops, reference

__all__ = ["ops", "reference", "compiled", "compiled_with_cuda", "compiled_with_cuda_emulation", "cpu_isa",
           "cpu_isa_supported", "load_error"]
