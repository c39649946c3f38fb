// UPSNet panoptic merge on CUDA: one thread per output pixel runs the shared per-pixel decision
// (panoptic_merge.h, the code the CPU tests exercise), reading the semantic logits directly or resizing them on
// the fly; nothing but the [H, W] label map is written.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "panoptic_merge.h"
#include "cuda/launch.cuh"

namespace eyecool {
namespace {

template <typename scalar_t>
__global__ void upsnet_merge_kernel(int64_t pixels, const scalar_t* __restrict__ sem, int64_t channels, int64_t in_h,
                                    int64_t in_w, int64_t height, int64_t width, int64_t num_stuff,
                                    const scalar_t* __restrict__ boxes, const int64_t* __restrict__ classes,
                                    const scalar_t* __restrict__ masks, int64_t num_instances, int64_t mask_h,
                                    int64_t mask_w, int64_t* __restrict__ labels) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pixels; p += (int64_t)blockDim.x * gridDim.x) {
    const int64_t px = p % width, py = p / width;
    const auto pixel = semantic_pixel<acc_t, scalar_t>(sem, in_h, in_w, height, width, px, py);
    labels[p] = upsnet_pixel_label<acc_t>(pixel, channels, num_stuff, boxes, classes, masks, num_instances, mask_h,
                                          mask_w, px, py);
  }
}

at::Tensor upsnet_panoptic_merge_cuda(const at::Tensor& sem_logits, int64_t num_stuff, const at::Tensor& boxes_in,
                                      const at::Tensor& classes_in, const at::Tensor& mask_logits_in, int64_t height,
                                      int64_t width) {
  check_panoptic_merge_inputs(sem_logits, num_stuff, boxes_in, classes_in, mask_logits_in, height, width);
  at::cuda::CUDAGuard guard(sem_logits.device());
  at::Tensor labels = at::empty({height, width}, sem_logits.options().dtype(at::kLong));
  const int64_t pixels = labels.numel();
  if (pixels == 0) return labels;
  // Classes are not range-checked here (that would synchronise); the shared decision reads an out-of-range class
  // as a 0 logit instead of reading out of bounds, and the Python wrapper checks them.
  const at::Tensor sem = sem_logits.contiguous();
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor classes = classes_in.contiguous();
  const at::Tensor masks = mask_logits_in.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sem.scalar_type(), "upsnet_panoptic_merge_cuda", [&] {
    EYECOOL_LAUNCH(num_blocks(pixels), kThreads, stream, upsnet_merge_kernel<scalar_t>)(
        pixels, sem.data_ptr<scalar_t>(), sem.size(0), sem.size(1), sem.size(2), height, width, num_stuff,
        boxes.data_ptr<scalar_t>(), classes.data_ptr<int64_t>(), masks.data_ptr<scalar_t>(), boxes.size(0),
        masks.size(1), masks.size(2), labels.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return labels;
}

}  // namespace
}  // namespace eyecool

EYECOOL_CUDA_LIBRARY_IMPL(m) { m.impl("upsnet_panoptic_merge", &eyecool::upsnet_panoptic_merge_cuda); }
