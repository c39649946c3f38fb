// ROIAlign on CUDA: single-level (torchvision's op) and multilevel (the FPN pooler in one launch, the level of
// each ROI chosen on the device, so no host synchronisation). One thread per output element; the geometry and
// bilinear arithmetic come from roi_align.h, the code the CPU tests exercise.
// Backward scatters with atomics (as torchvision does) into float accumulators for half and bfloat16 (a half
// running sum stops growing at 2048), so it reports itself to torch.use_deterministic_algorithms.
// A batch index outside [0, N) (or NaN) pools to 0 here, where the CPU op raises: checking would cost a host
// synchronisation per call, which the FPN pooler exists to avoid (documented in the op's docstring).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "roi_align.h"
#include "cuda/launch.cuh"

namespace eyecool {
namespace {

constexpr int kMaxLevels = 8;

// The pyramid passed to the kernels by value (no device-side table to copy). The scales and the canonical box
// size stay double, as on the CPU, and are cast to the op-math type where used: a float copy would move float64
// results (a scale of 0.3 by 2.4e-6).
template <typename ptr_t>
struct Pyramid {
  ptr_t data[kMaxLevels];  // [N, C, H, W] contiguous per level
  int64_t height[kMaxLevels], width[kMaxLevels];
  double scale[kMaxLevels];
  int num_levels;
  bool multilevel;
  double canonical_box_size;
  int64_t canonical_level, min_level, max_level;
};

// The batch index of a ROI row, or -1 when it is outside [0, batch) or NaN (compared as a float first: converting
// a NaN or huge float to an integer is undefined).
template <typename acc_t>
__device__ __forceinline__ int64_t roi_batch_index(acc_t b, int64_t batch) {
  return (b >= acc_t(0) && b < static_cast<acc_t>(batch)) ? static_cast<int64_t>(b) : -1;
}

template <typename ptr_t, typename acc_t>
__device__ __forceinline__ int64_t level_of(const Pyramid<ptr_t>& p, acc_t x1, acc_t y1, acc_t x2, acc_t y2) {
  if (!p.multilevel) return 0;
  return fpn_level_index<acc_t>(x1, y1, x2, y2, static_cast<acc_t>(p.canonical_box_size), p.canonical_level,
                                p.min_level, p.max_level);
}

template <typename scalar_t>
__global__ void forward_kernel(int64_t total, Pyramid<const scalar_t*> pyr, const scalar_t* __restrict__ rois,
                               int64_t batch, int64_t channels, int64_t pooled_h, int64_t pooled_w,
                               int64_t sampling_ratio, bool aligned, scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int64_t pw = index % pooled_w;
    const int64_t ph = (index / pooled_w) % pooled_h;
    const int64_t c = (index / pooled_w / pooled_h) % channels;
    const int64_t k = index / pooled_w / pooled_h / channels;
    const scalar_t* r = rois + k * 5;
    const int64_t n = roi_batch_index(static_cast<acc_t>(r[0]), batch);
    const acc_t x1 = r[1], y1 = r[2], x2 = r[3], y2 = r[4];
    acc_t value = 0;
    if (n >= 0) {  // an invalid batch index pools to 0 instead of reading out of bounds
      const int64_t lvl = level_of(pyr, x1, y1, x2, y2);
      const int64_t H = pyr.height[lvl], W = pyr.width[lvl];
      const RoiGeometry<acc_t> g = roi_geometry<acc_t>(x1, y1, x2, y2, static_cast<acc_t>(pyr.scale[lvl]),
                                                       pooled_h, pooled_w, sampling_ratio, aligned);
      const scalar_t* plane = pyr.data[lvl] + (n * channels + c) * H * W;
      const SampleRange ry = sample_range(g.start_h, g.bin_h, g.grid_h, ph, H);
      const SampleRange rx = sample_range(g.start_w, g.bin_w, g.grid_w, pw, W);
      for (int64_t iy = ry.lo; iy < ry.hi; ++iy) {
        const acc_t y = sample_y(g, ph, iy);
        for (int64_t ix = rx.lo; ix < rx.hi; ++ix) {
          const acc_t x = sample_x(g, pw, ix);
          const BilinearTaps<acc_t> t = bilinear_taps<acc_t>(H, W, y, x);
          if (!t.valid) continue;
          value += t.w1 * static_cast<acc_t>(plane[t.y_low * W + t.x_low]) +
                   t.w2 * static_cast<acc_t>(plane[t.y_low * W + t.x_high]) +
                   t.w3 * static_cast<acc_t>(plane[t.y_high * W + t.x_low]) +
                   t.w4 * static_cast<acc_t>(plane[t.y_high * W + t.x_high]);
        }
      }
      value /= g.count;
    }
    output[index] = static_cast<scalar_t>(value);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(int64_t total, Pyramid<at::opmath_type<scalar_t>*> pyr,
                                const scalar_t* __restrict__ rois,
                                int64_t batch, int64_t channels, int64_t pooled_h, int64_t pooled_w,
                                int64_t sampling_ratio, bool aligned, const scalar_t* __restrict__ grad,
                                int64_t gs0, int64_t gs1, int64_t gs2, int64_t gs3) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int64_t pw = index % pooled_w;
    const int64_t ph = (index / pooled_w) % pooled_h;
    const int64_t c = (index / pooled_w / pooled_h) % channels;
    const int64_t k = index / pooled_w / pooled_h / channels;
    const scalar_t* r = rois + k * 5;
    const int64_t n = roi_batch_index(static_cast<acc_t>(r[0]), batch);
    if (n < 0) continue;
    const acc_t x1 = r[1], y1 = r[2], x2 = r[3], y2 = r[4];
    const int64_t lvl = level_of(pyr, x1, y1, x2, y2);
    const int64_t H = pyr.height[lvl], W = pyr.width[lvl];
    const RoiGeometry<acc_t> g = roi_geometry<acc_t>(x1, y1, x2, y2, static_cast<acc_t>(pyr.scale[lvl]), pooled_h,
                                                     pooled_w, sampling_ratio, aligned);
    const acc_t go = static_cast<acc_t>(grad[k * gs0 + c * gs1 + ph * gs2 + pw * gs3]);
    acc_t* plane = pyr.data[lvl] + (n * channels + c) * H * W;
    const SampleRange ry = sample_range(g.start_h, g.bin_h, g.grid_h, ph, H);
    const SampleRange rx = sample_range(g.start_w, g.bin_w, g.grid_w, pw, W);
    for (int64_t iy = ry.lo; iy < ry.hi; ++iy) {
      const acc_t y = sample_y(g, ph, iy);
      for (int64_t ix = rx.lo; ix < rx.hi; ++ix) {
        const acc_t x = sample_x(g, pw, ix);
        const BilinearTaps<acc_t> t = bilinear_taps<acc_t>(H, W, y, x);
        if (!t.valid) continue;
        gpuAtomicAdd(plane + t.y_low * W + t.x_low, go * t.w1 / g.count);
        gpuAtomicAdd(plane + t.y_low * W + t.x_high, go * t.w2 / g.count);
        gpuAtomicAdd(plane + t.y_high * W + t.x_low, go * t.w3 / g.count);
        gpuAtomicAdd(plane + t.y_high * W + t.x_high, go * t.w4 / g.count);
      }
    }
  }
}

template <typename ptr_t>
Pyramid<ptr_t> make_pyramid(at::ArrayRef<double> scales, bool multilevel, double canonical_box_size,
                            int64_t canonical_level) {
  Pyramid<ptr_t> p{};
  p.num_levels = static_cast<int>(scales.size());
  p.multilevel = multilevel;
  p.canonical_box_size = canonical_box_size;
  p.canonical_level = canonical_level;
  if (multilevel) {
    const auto levels = pyramid_levels(scales);
    p.min_level = levels.first;
    p.max_level = levels.second;
  }
  for (size_t l = 0; l < scales.size(); ++l) p.scale[l] = scales[l];
  return p;
}

at::Tensor forward_impl(at::TensorList features_in, const at::Tensor& rois_in, int64_t pooled_h, int64_t pooled_w,
                        at::ArrayRef<double> scales, int64_t sampling_ratio, bool aligned, bool multilevel,
                        double canonical_box_size, int64_t canonical_level) {
  at::cuda::CUDAGuard guard(features_in[0].device());
  const at::Tensor rois = rois_in.contiguous();
  std::vector<at::Tensor> features;
  for (const auto& f : features_in) features.push_back(f.contiguous());
  const int64_t num_rois = rois.size(0), batch = features[0].size(0), channels = features[0].size(1);
  at::Tensor output = at::empty({num_rois, channels, pooled_h, pooled_w}, features[0].options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "roi_align_forward_cuda", [&] {
    auto pyr = make_pyramid<const scalar_t*>(scales, multilevel, canonical_box_size, canonical_level);
    for (size_t l = 0; l < features.size(); ++l) {
      pyr.data[l] = features[l].data_ptr<scalar_t>();
      pyr.height[l] = features[l].size(2);
      pyr.width[l] = features[l].size(3);
    }
    EYECOOL_LAUNCH(num_blocks(total), kThreads, at::cuda::getCurrentCUDAStream(), forward_kernel<scalar_t>)(
        total, pyr, rois.data_ptr<scalar_t>(), batch, channels, pooled_h, pooled_w, sampling_ratio, aligned,
        output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::vector<at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& rois_in, int64_t pooled_h,
                                      int64_t pooled_w, at::ArrayRef<double> scales, int64_t sampling_ratio,
                                      bool aligned, bool multilevel, double canonical_box_size,
                                      int64_t canonical_level, int64_t batch, int64_t channels,
                                      at::IntArrayRef heights, at::IntArrayRef widths) {
  at::cuda::CUDAGuard guard(grad.device());
  const at::Tensor rois = rois_in.contiguous();
  // Accumulated in the op-math type (float for half and bfloat16), cast once at the end, as on the CPU.
  const auto acc_options = grad.options().dtype(at::toOpMathType(grad.scalar_type()));
  std::vector<at::Tensor> grads_acc;
  for (size_t l = 0; l < heights.size(); ++l) {
    grads_acc.push_back(at::zeros({batch, channels, heights[l], widths[l]}, acc_options));
  }
  const int64_t total = grad.numel();
  if (total > 0) {
    at::globalContext().alertNotDeterministic("eyecool::roi_align backward on CUDA (atomic adds)");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto pyr = make_pyramid<acc_t*>(scales, multilevel, canonical_box_size, canonical_level);
      for (size_t l = 0; l < grads_acc.size(); ++l) {
        pyr.data[l] = grads_acc[l].data_ptr<acc_t>();
        pyr.height[l] = heights[l];
        pyr.width[l] = widths[l];
      }
      EYECOOL_LAUNCH(num_blocks(total), kThreads, at::cuda::getCurrentCUDAStream(), backward_kernel<scalar_t>)(
          total, pyr, rois.data_ptr<scalar_t>(), batch, channels, pooled_h, pooled_w, sampling_ratio, aligned,
          grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  std::vector<at::Tensor> grads;
  for (const auto& g : grads_acc) grads.push_back(g.to(grad.scalar_type()));
  return grads;
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  check_roi_align_inputs(input, rois, pooled_height, pooled_width, "roi_align");
  return forward_impl({input}, rois, pooled_height, pooled_width, {spatial_scale}, sampling_ratio, aligned, false,
                      0.0, 0);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  check_roi_align_backward_inputs(grad, rois, pooled_height, pooled_width, channels, "_roi_align_backward");
  check_roi_align_backward_levels(batch_size, channels, {height}, {width}, 1, "_roi_align_backward");
  return backward_impl(grad, rois, pooled_height, pooled_width, {spatial_scale}, sampling_ratio, aligned, false, 0.0,
                       0, batch_size, channels, {height}, {width})[0];
}

at::Tensor multilevel_roi_align_forward_cuda(at::TensorList features, const at::Tensor& rois, int64_t pooled_height,
                                             int64_t pooled_width, at::ArrayRef<double> scales,
                                             int64_t sampling_ratio, bool aligned, double canonical_box_size,
                                             int64_t canonical_level) {
  check_multilevel_inputs(features, rois, pooled_height, pooled_width, scales);
  return forward_impl(features, rois, pooled_height, pooled_width, scales, sampling_ratio, aligned, true,
                      canonical_box_size, canonical_level);
}

std::vector<at::Tensor> multilevel_roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                                           int64_t pooled_height, int64_t pooled_width,
                                                           at::ArrayRef<double> scales, int64_t sampling_ratio,
                                                           bool aligned, double canonical_box_size,
                                                           int64_t canonical_level, int64_t batch_size,
                                                           int64_t channels, at::IntArrayRef heights,
                                                           at::IntArrayRef widths) {
  check_roi_align_backward_inputs(grad, rois, pooled_height, pooled_width, channels,
                                  "_multilevel_roi_align_backward");
  check_roi_align_backward_levels(batch_size, channels, heights, widths, scales.size(),
                                  "_multilevel_roi_align_backward");
  return backward_impl(grad, rois, pooled_height, pooled_width, scales, sampling_ratio, aligned, true,
                       canonical_box_size, canonical_level, batch_size, channels, heights, widths);
}

}  // namespace
}  // namespace eyecool

EYECOOL_CUDA_LIBRARY_IMPL(m) {
  m.impl("roi_align", &eyecool::roi_align_forward_cuda);
  m.impl("_roi_align_backward", &eyecool::roi_align_backward_cuda);
  m.impl("multilevel_roi_align", &eyecool::multilevel_roi_align_forward_cuda);
  m.impl("_multilevel_roi_align_backward", &eyecool::multilevel_roi_align_backward_cuda);
}
