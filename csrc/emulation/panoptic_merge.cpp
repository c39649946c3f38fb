// The CUDA kernels of csrc/cuda/panoptic_merge.cu, compiled as host C++ and run on the CPU (see cuda_emulation.h):
// registered as torch.ops.eyecool_emu.*, so that the tests run the GPU's launch and indexing code here.
#define EYECOOL_CUDA_EMULATION
#include "cuda/panoptic_merge.cu"
