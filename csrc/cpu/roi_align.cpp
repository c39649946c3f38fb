// ROIAlign on the CPU: single-level (torchvision's op) and multilevel (the FPN pooler in one call).
//
// Both run on channels-last views of the feature maps ([N, H, W, C]) so that every bilinear tap reads a
// contiguous run of channels, which the compiler vectorises; the per-sample arithmetic comes from
// roi_align.h, shared with the CUDA kernels.
//   forward:  parallel over ROIs (each ROI's output block belongs to one thread).
//   backward: parallel over channel blocks; every thread walks all ROIs in the same order and scatters into
//             its own channels only, so the result is race-free and bit-identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "roi_align.h"

namespace eyecool {
namespace {

// Below this many (output element x channel) updates a kernel runs on one thread.
constexpr int64_t kSerialWork = 1 << 16;

// One pyramid level as the kernels see it: a channels-last data pointer, its size and its scale.
template <typename scalar_t>
struct LevelView {
  const scalar_t* data;  // [N, H, W, C] contiguous
  int64_t height, width;
  double scale;
};

// Which level each ROI reads. Single-level ROIAlign has one level and no assignment.
struct LevelAssignment {
  bool multilevel;
  double canonical_box_size;
  int64_t canonical_level, min_level, max_level;

  template <typename acc_t>
  int64_t operator()(acc_t x1, acc_t y1, acc_t x2, acc_t y2) const {
    if (!multilevel) return 0;
    return fpn_level_index<acc_t>(x1, y1, x2, y2, static_cast<acc_t>(canonical_box_size), canonical_level,
                                  min_level, max_level);
  }
};

template <typename scalar_t>
void forward_kernel(const std::vector<LevelView<scalar_t>>& levels, const LevelAssignment& assign,
                    const scalar_t* rois, int64_t num_rois, int64_t channels, int64_t pooled_h,
                    int64_t pooled_w, int64_t sampling_ratio, bool aligned, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bins = pooled_h * pooled_w;
  // Small problems run on one thread: waking a thread team costs more than they do (and far more when the
  // cores are busy).
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, channels * bins));
  at::parallel_for(0, num_rois, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(channels);
    for (int64_t k = begin; k < end; ++k) {
      const scalar_t* r = rois + k * 5;
      const int64_t n = static_cast<int64_t>(r[0]);
      const acc_t x1 = r[1], y1 = r[2], x2 = r[3], y2 = r[4];
      const auto& level = levels[assign(x1, y1, x2, y2)];
      const RoiGeometry<acc_t> g = roi_geometry<acc_t>(x1, y1, x2, y2, static_cast<acc_t>(level.scale),
                                                       pooled_h, pooled_w, sampling_ratio, aligned);
      const int64_t H = level.height, W = level.width;
      const scalar_t* image = level.data + n * H * W * channels;
      scalar_t* out_roi = output + k * channels * bins;
      for (int64_t ph = 0; ph < pooled_h; ++ph) {
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          const SampleRange ry = sample_range(g.start_h, g.bin_h, g.grid_h, ph, H);
          const SampleRange rx = sample_range(g.start_w, g.bin_w, g.grid_w, pw, W);
          for (int64_t iy = ry.lo; iy < ry.hi; ++iy) {
            const acc_t y = sample_y(g, ph, iy);
            for (int64_t ix = rx.lo; ix < rx.hi; ++ix) {
              const acc_t x = sample_x(g, pw, ix);
              const BilinearTaps<acc_t> t = bilinear_taps<acc_t>(H, W, y, x);
              if (!t.valid) continue;
              const scalar_t* p1 = image + (t.y_low * W + t.x_low) * channels;
              const scalar_t* p2 = image + (t.y_low * W + t.x_high) * channels;
              const scalar_t* p3 = image + (t.y_high * W + t.x_low) * channels;
              const scalar_t* p4 = image + (t.y_high * W + t.x_high) * channels;
              acc_t* a = acc.data();
              for (int64_t c = 0; c < channels; ++c) {
                a[c] += t.w1 * static_cast<acc_t>(p1[c]) + t.w2 * static_cast<acc_t>(p2[c]) +
                        t.w3 * static_cast<acc_t>(p3[c]) + t.w4 * static_cast<acc_t>(p4[c]);
              }
            }
          }
          const int64_t bin = ph * pooled_w + pw;
          for (int64_t c = 0; c < channels; ++c) {
            out_roi[c * bins + bin] = static_cast<scalar_t>(acc[c] / g.count);
          }
        }
      }
    }
  });
}

// grad_levels[l] is a zeroed [N, H_l, W_l, C] accumulation buffer (acc_t); grad_cl is [K, ph, pw, C].
template <typename scalar_t, typename acc_t>
void backward_kernel(const std::vector<LevelView<scalar_t>>& levels, const std::vector<acc_t*>& grad_levels,
                     const LevelAssignment& assign, const scalar_t* rois, int64_t num_rois, int64_t channels,
                     int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                     const scalar_t* grad_cl) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // One contiguous channel block per thread, but never blocks so thin that the per-ROI geometry dominates.
  int64_t grain = std::max<int64_t>(16, (channels + threads - 1) / threads);
  if (num_rois * pooled_h * pooled_w * channels < kSerialWork) grain = channels;
  at::parallel_for(0, channels, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t k = 0; k < num_rois; ++k) {
      const scalar_t* r = rois + k * 5;
      const int64_t n = static_cast<int64_t>(r[0]);
      const acc_t x1 = r[1], y1 = r[2], x2 = r[3], y2 = r[4];
      const int64_t lvl = assign(x1, y1, x2, y2);
      const auto& level = levels[lvl];
      const RoiGeometry<acc_t> g = roi_geometry<acc_t>(x1, y1, x2, y2, static_cast<acc_t>(level.scale),
                                                       pooled_h, pooled_w, sampling_ratio, aligned);
      const int64_t H = level.height, W = level.width;
      acc_t* image = grad_levels[lvl] + n * H * W * channels;
      for (int64_t ph = 0; ph < pooled_h; ++ph) {
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
          const scalar_t* go = grad_cl + ((k * pooled_h + ph) * pooled_w + pw) * channels;
          const SampleRange ry = sample_range(g.start_h, g.bin_h, g.grid_h, ph, H);
          const SampleRange rx = sample_range(g.start_w, g.bin_w, g.grid_w, pw, W);
          for (int64_t iy = ry.lo; iy < ry.hi; ++iy) {
            const acc_t y = sample_y(g, ph, iy);
            for (int64_t ix = rx.lo; ix < rx.hi; ++ix) {
              const acc_t x = sample_x(g, pw, ix);
              const BilinearTaps<acc_t> t = bilinear_taps<acc_t>(H, W, y, x);
              if (!t.valid) continue;
              const acc_t w1 = t.w1 / g.count, w2 = t.w2 / g.count, w3 = t.w3 / g.count, w4 = t.w4 / g.count;
              acc_t* p1 = image + (t.y_low * W + t.x_low) * channels;
              acc_t* p2 = image + (t.y_low * W + t.x_high) * channels;
              acc_t* p3 = image + (t.y_high * W + t.x_low) * channels;
              acc_t* p4 = image + (t.y_high * W + t.x_high) * channels;
              // p1..p4 may alias (clamped border taps): separate loops keep each update exact.
              for (int64_t c = c0; c < c1; ++c) p1[c] += static_cast<acc_t>(go[c]) * w1;
              for (int64_t c = c0; c < c1; ++c) p2[c] += static_cast<acc_t>(go[c]) * w2;
              for (int64_t c = c0; c < c1; ++c) p3[c] += static_cast<acc_t>(go[c]) * w3;
              for (int64_t c = c0; c < c1; ++c) p4[c] += static_cast<acc_t>(go[c]) * w4;
            }
          }
        }
      }
    }
  });
}

// [N, C, H, W] (any strides) -> contiguous [N, H, W, C]; free when the input is already channels-last.
at::Tensor to_channels_last_nhwc(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).contiguous(); }

// Batch indices are read on the host anyway, so check them here instead of reading out of bounds.
template <typename scalar_t>
void check_batch_indices(const scalar_t* rois, int64_t num_rois, int64_t batch_size) {
  for (int64_t k = 0; k < num_rois; ++k) {
    const double b = static_cast<double>(rois[k * 5]);
    TORCH_CHECK(b >= 0 && b < static_cast<double>(batch_size), "rois[", k, ", 0] (batch index) must be in [0, ",
                batch_size, "), got ", b);
  }
}

at::Tensor forward_impl(const std::vector<at::Tensor>& features, const at::Tensor& rois_in, int64_t pooled_h,
                        int64_t pooled_w, const std::vector<double>& scales, int64_t sampling_ratio, bool aligned,
                        const LevelAssignment& assign) {
  const at::Tensor rois = rois_in.contiguous();
  const int64_t num_rois = rois.size(0);
  const int64_t batch = features[0].size(0), channels = features[0].size(1);
  at::Tensor output = at::zeros({num_rois, channels, pooled_h, pooled_w}, features[0].options());
  if (num_rois == 0 || channels == 0) return output;
  std::vector<at::Tensor> keep;  // channels-last copies must outlive the kernel
  for (const auto& f : features) keep.push_back(to_channels_last_nhwc(f));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "roi_align_forward_cpu", [&] {
    check_batch_indices(rois.data_ptr<scalar_t>(), num_rois, batch);
    std::vector<LevelView<scalar_t>> levels;
    for (size_t l = 0; l < keep.size(); ++l) {
      levels.push_back({keep[l].data_ptr<scalar_t>(), keep[l].size(1), keep[l].size(2), scales[l]});
    }
    forward_kernel<scalar_t>(levels, assign, rois.data_ptr<scalar_t>(), num_rois, channels, pooled_h, pooled_w,
                             sampling_ratio, aligned, output.data_ptr<scalar_t>());
  });
  return output;
}

std::vector<at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& rois_in, int64_t pooled_h,
                                      int64_t pooled_w, const std::vector<double>& scales, int64_t sampling_ratio,
                                      bool aligned, const LevelAssignment& assign, int64_t batch, int64_t channels,
                                      const std::vector<int64_t>& heights, const std::vector<int64_t>& widths) {
  const at::Tensor rois = rois_in.contiguous();
  const int64_t num_rois = rois.size(0);
  const auto acc_dtype = at::toOpMathType(grad.scalar_type());
  std::vector<at::Tensor> grad_nhwc;
  for (size_t l = 0; l < heights.size(); ++l) {
    grad_nhwc.push_back(at::zeros({batch, heights[l], widths[l], channels}, grad.options().dtype(acc_dtype)));
  }
  if (num_rois > 0 && channels > 0) {
    const at::Tensor grad_cl = grad.permute({0, 2, 3, 1}).contiguous();  // [K, ph, pw, C]
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      check_batch_indices(rois.data_ptr<scalar_t>(), num_rois, batch);
      std::vector<LevelView<scalar_t>> levels;
      std::vector<acc_t*> grad_ptrs;
      for (size_t l = 0; l < heights.size(); ++l) {
        levels.push_back({nullptr, heights[l], widths[l], scales[l]});
        grad_ptrs.push_back(grad_nhwc[l].data_ptr<acc_t>());
      }
      backward_kernel<scalar_t, acc_t>(levels, grad_ptrs, assign, rois.data_ptr<scalar_t>(), num_rois, channels,
                                       pooled_h, pooled_w, sampling_ratio, aligned, grad_cl.data_ptr<scalar_t>());
    });
  }
  std::vector<at::Tensor> result;
  for (auto& g : grad_nhwc) result.push_back(g.permute({0, 3, 1, 2}).to(grad.scalar_type()).contiguous());
  return result;
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  check_roi_align_inputs(input, rois, pooled_height, pooled_width, "roi_align");
  const LevelAssignment single{false, 0.0, 0, 0, 0};
  return forward_impl({input}, rois, pooled_height, pooled_width, {spatial_scale}, sampling_ratio, aligned, single);
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  check_roi_align_backward_inputs(grad, rois, pooled_height, pooled_width, channels, "_roi_align_backward");
  check_roi_align_backward_levels(batch_size, channels, {height}, {width}, 1, "_roi_align_backward");
  const LevelAssignment single{false, 0.0, 0, 0, 0};
  return backward_impl(grad, rois, pooled_height, pooled_width, {spatial_scale}, sampling_ratio, aligned, single,
                       batch_size, channels, {height}, {width})[0];
}

at::Tensor multilevel_roi_align_forward_cpu(at::TensorList features, const at::Tensor& rois, int64_t pooled_height,
                                            int64_t pooled_width, at::ArrayRef<double> scales, int64_t sampling_ratio,
                                            bool aligned, double canonical_box_size, int64_t canonical_level) {
  const auto levels = check_multilevel_inputs(features, rois, pooled_height, pooled_width, scales);
  const LevelAssignment assign{true, canonical_box_size, canonical_level, levels.first, levels.second};
  return forward_impl(features.vec(), rois, pooled_height, pooled_width, scales.vec(), sampling_ratio, aligned,
                      assign);
}

std::vector<at::Tensor> multilevel_roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                                          int64_t pooled_height, int64_t pooled_width,
                                                          at::ArrayRef<double> scales, int64_t sampling_ratio,
                                                          bool aligned, double canonical_box_size,
                                                          int64_t canonical_level, int64_t batch_size,
                                                          int64_t channels, at::IntArrayRef heights,
                                                          at::IntArrayRef widths) {
  check_roi_align_backward_inputs(grad, rois, pooled_height, pooled_width, channels, "_multilevel_roi_align_backward");
  check_roi_align_backward_levels(batch_size, channels, heights, widths, scales.size(),
                                  "_multilevel_roi_align_backward");
  const auto levels = pyramid_levels(scales);
  const LevelAssignment assign{true, canonical_box_size, canonical_level, levels.first, levels.second};
  return backward_impl(grad, rois, pooled_height, pooled_width, scales.vec(), sampling_ratio, aligned, assign,
                       batch_size, channels, heights.vec(), widths.vec());
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) {
  m.impl("roi_align", &eyecool::roi_align_forward_cpu);
  m.impl("_roi_align_backward", &eyecool::roi_align_backward_cpu);
  m.impl("multilevel_roi_align", &eyecool::multilevel_roi_align_forward_cpu);
  m.impl("_multilevel_roi_align_backward", &eyecool::multilevel_roi_align_backward_cpu);
}
