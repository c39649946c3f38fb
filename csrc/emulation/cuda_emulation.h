// The CUDA runtime as host C++, so that the very source of csrc/cuda/*.cu runs on the CPU (csrc/emulation/*.cpp
// include those files with EYECOOL_CUDA_EMULATION defined). A launch runs every (block, thread) of the grid in
// turn on the calling thread, with threadIdx / blockIdx / blockDim / gridDim set as the GPU would set them.
//
// This is exact for the kernels of this project, which are grid-stride loops without shared memory, barriers or
// warp intrinsics: no thread can observe another, so any serial order of threads computes what some GPU
// schedule computes. What it cannot reproduce: the order of atomic adds (here always block by block, thread by
// thread), device math (CUDA's expf and friends; the host functions run instead), FMA contraction by nvcc (the
// host build has none), and timing. A kernel that starts using shared memory, __syncthreads or warp shuffles
// must extend this file (run each block's threads as fibers between barriers) before its emulated tests mean
// anything.
//
// Tensors are CPU tensors throughout: "device memory" is host memory, so AddressSanitizer (make sanitize) sees
// every out-of-bounds access a kernel makes, as compute-sanitizer's memcheck would on a GPU.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

// The stream type the kernel files name; there is one (serial) stream.
using cudaStream_t = struct EyecoolEmulatedStream*;

namespace at {
namespace cuda {
// An inline namespace of our own keeps these apart from the real at::cuda symbols when a CUDA build links both.
inline namespace eyecool_emulation {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace eyecool_emulation
}  // namespace cuda
}  // namespace at

namespace eyecool {
namespace emulation {

struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// Test settings: a cap on the grid (0: the real one) and on the deformable convolution's column buffer (0: the
// real one), so that small tensors take the grid-stride rounds and batch chunks of real sizes; and the 64-bit
// index path of the kernels that have a 32-bit one (deform_conv2d's sampling), which only tensors of 2^31
// elements or more take otherwise. Settable from Python through torch.ops.eyecool_emu._set_launch_limits.
struct LaunchLimits {
  int64_t max_blocks = 0;
  int64_t max_column_elements = 0;
  bool force_64bit_index = false;
};

inline LaunchLimits& launch_limits() {
  static LaunchLimits limits;
  return limits;
}

// Launches made since the library was loaded (torch.ops.eyecool_emu._launch_count): lets a test check that an op
// launched kernels at all, and how many (one per batch chunk, say).
inline int64_t& launch_count() {
  static int64_t count = 0;
  return count;
}

}  // namespace emulation

// The built-in variables, visible to the kernels (namespace eyecool) by their CUDA names.
inline thread_local emulation::Dim3 threadIdx, blockIdx, blockDim, gridDim;

// atomicAdd as ATen's gpuAtomicAdd: one read-modify-write in the pointee's type, so half and bfloat16 sums round
// at every add, as they do on the GPU.
template <typename T, typename V>
inline T gpuAtomicAdd(T* address, V value) {
  const T old = *address;
  *address = static_cast<T>(old + static_cast<T>(value));
  return old;
}

namespace emulation {

// One kernel launch: its arguments are converted to the kernel's parameter types once and copied to every
// thread, as the CUDA runtime passes them.
template <typename... Params>
class Launch {
 public:
  Launch(int64_t grid, int64_t block, void (*kernel)(Params...)) : grid_(grid), block_(block), kernel_(kernel) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    // The limits a GPU enforces at launch (compute capability >= 3.0).
    TORCH_CHECK(grid_ >= 1 && grid_ <= std::numeric_limits<int32_t>::max(), "emulated CUDA launch: grid of ",
                grid_, " blocks is outside [1, 2^31 - 1]");
    TORCH_CHECK(block_ >= 1 && block_ <= 1024, "emulated CUDA launch: ", block_,
                " threads per block is outside [1, 1024]");
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    gridDim = Dim3{static_cast<unsigned int>(grid_), 1, 1};
    blockDim = Dim3{static_cast<unsigned int>(block_), 1, 1};
    for (int64_t b = 0; b < grid_; ++b) {
      blockIdx = Dim3{static_cast<unsigned int>(b), 0, 0};
      for (int64_t t = 0; t < block_; ++t) {
        threadIdx = Dim3{static_cast<unsigned int>(t), 0, 0};
        std::apply(kernel_, params);
      }
    }
    ++launch_count();
  }

 private:
  int64_t grid_, block_;
  void (*kernel_)(Params...);
};

template <typename... Params>
Launch<Params...> launch(int64_t grid, int64_t block, void (*kernel)(Params...)) {
  return Launch<Params...>(grid, block, kernel);
}

}  // namespace emulation
}  // namespace eyecool

// kernel<<<grid, block, 0, stream>>>(args...) on the host. The stream is not evaluated: there is one.
#define EYECOOL_LAUNCH(grid, block, stream, ...) ::eyecool::emulation::launch((grid), (block), __VA_ARGS__)
// The emulated kernels register under their own namespace, on the CPU key: torch.ops.eyecool_emu.<op>.
#define EYECOOL_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(eyecool_emu, CPU, m)
