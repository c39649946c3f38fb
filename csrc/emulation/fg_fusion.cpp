// The CUDA kernels of csrc/cuda/fg_fusion.cu, compiled as host C++ and run on the CPU (see cuda_emulation.h):
// registered as torch.ops.eyecool_emu.*, so that the tests run the GPU's launch and indexing code here.
#define EYECOOL_CUDA_EMULATION
#include "cuda/fg_fusion.cu"
