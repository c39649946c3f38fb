// What every CUDA kernel file shares: the runtime headers, the launch geometry and the launch macro.
//
// Every kernel here is a 1-D grid-stride loop over n elements with no shared memory, barriers or warp
// intrinsics, so the grid can be capped (past the cap each thread handles several elements), and the same source
// can run on the CPU: with EYECOOL_CUDA_EMULATION defined (csrc/emulation/*.cpp), these headers come from
// emulation/cuda_emulation.h instead, and a launch runs every (block, thread) in turn on the host. Kernels are
// therefore launched with EYECOOL_LAUNCH(grid, block, stream, kernel<...>)(args...), never with <<<...>>>, and
// their ops registered with EYECOOL_CUDA_LIBRARY_IMPL(m).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef EYECOOL_CUDA_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define EYECOOL_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#define EYECOOL_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(eyecool, CUDA, m)
#endif

namespace eyecool {

constexpr int kThreads = 256;
// 524,280 blocks of 256 threads: enough to fill any current GPU many times over.
constexpr int64_t kMaxBlocks = 65535LL * 8;

// The grid cap in force: kMaxBlocks, or the emulation's test setting (a tiny grid forces the grid-stride rounds
// that real sizes take, with small tensors).
inline int64_t max_blocks() {
#ifdef EYECOOL_CUDA_EMULATION
  const int64_t cap = emulation::launch_limits().max_blocks;
  if (cap > 0) return cap;
#endif
  return kMaxBlocks;
}

inline int64_t num_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return std::min<int64_t>(std::max<int64_t>(blocks, 1), max_blocks());
}

}  // namespace eyecool
