// ROIAlign math shared by the CPU and CUDA kernels: box geometry, sampling positions and bilinear taps.
//
// The expressions and their evaluation order follow torchvision's kernels exactly so that results match it
// bit for bit in float and double; do not "simplify" them (e.g. hoisting bin_size / grid out of the sample
// position changes the rounding).
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "common.h"

namespace eyecool {

#ifndef __CUDA_ARCH__
// Host code calls the std overloads (float stays float); device code gets CUDA's global overloads.
using std::ceil;
using std::floor;
using std::log2;
using std::sqrt;
#endif

// One ROI's sampling layout on its feature map (all coordinates already scaled to the map).
template <typename T>
struct RoiGeometry {
  T start_h, start_w;      // top-left corner of the ROI on the map
  T bin_h, bin_w;          // size of one output bin
  int64_t grid_h, grid_w;  // sampling points per bin along each axis (0 for an empty/inverted adaptive ROI)
  T count;                 // divisor of the average: max(grid_h * grid_w, 1)
};

// box = (x1, y1, x2, y2) in input-image coordinates.
// aligned=True shifts by half a pixel (pixel centres at +0.5, the "correct" convention); aligned=False is
// the legacy Mask R-CNN convention, which also forces the ROI to be at least 1x1.
// An inverted box (x2 < x1) in aligned mode has a negative extent: with adaptive sampling its grid is
// ceil(negative) <= 0 and is clamped to 0, so the ROI has no samples and pools to 0 (torchvision's CUDA
// kernel gives the same; its CPU kernel can abort on a negative grid size). With a fixed sampling_ratio the
// samples are taken exactly as torchvision does, walking backwards from the start corner.
template <typename T>
EYECOOL_HD RoiGeometry<T> roi_geometry(T x1, T y1, T x2, T y2, T spatial_scale, int64_t pooled_h,
                                       int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  RoiGeometry<T> g;
  const T offset = aligned ? (T)0.5 : (T)0.0;
  g.start_w = x1 * spatial_scale - offset;
  g.start_h = y1 * spatial_scale - offset;
  const T end_w = x2 * spatial_scale - offset;
  const T end_h = y2 * spatial_scale - offset;
  T roi_w = end_w - g.start_w;
  T roi_h = end_h - g.start_h;
  if (!aligned) {
    roi_w = roi_w > (T)1. ? roi_w : (T)1.;
    roi_h = roi_h > (T)1. ? roi_h : (T)1.;
  }
  g.bin_h = static_cast<T>(roi_h) / static_cast<T>(pooled_h);
  g.bin_w = static_cast<T>(roi_w) / static_cast<T>(pooled_w);
  if (sampling_ratio > 0) {
    g.grid_h = sampling_ratio;
    g.grid_w = sampling_ratio;
  } else {
    const T gh = ceil(roi_h / static_cast<T>(pooled_h));
    const T gw = ceil(roi_w / static_cast<T>(pooled_w));
    // NaN or negative extents give no samples. The cap only keeps the integer conversion defined; points
    // off the map are skipped by sample_range, so even a capped grid costs no more than the map.
    g.grid_h = (gh > (T)0) ? (gh < (T)1e9 ? static_cast<int64_t>(gh) : (int64_t)1000000000) : 0;
    g.grid_w = (gw > (T)0) ? (gw < (T)1e9 ? static_cast<int64_t>(gw) : (int64_t)1000000000) : 0;
  }
  const double n = static_cast<double>(g.grid_h) * static_cast<double>(g.grid_w);
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

template <typename T>
EYECOOL_HD T sample_y(const RoiGeometry<T>& g, int64_t ph, int64_t iy) {
  return g.start_h + ph * g.bin_h + static_cast<T>(iy + .5f) * g.bin_h / static_cast<T>(g.grid_h);
}

template <typename T>
EYECOOL_HD T sample_x(const RoiGeometry<T>& g, int64_t pw, int64_t ix) {
  return g.start_w + pw * g.bin_w + static_cast<T>(ix + .5f) * g.bin_w / static_cast<T>(g.grid_w);
}

// The sampling indices [lo, hi) along one axis that can land within [-1, size] (the only ones that
// contribute). Points outside contribute exactly 0 but still count in the average, so skipping them changes
// nothing, and it bounds the work of a huge box (an adaptive grid of 10^6 x 10^6 points) by the size of the map.
// The range is widened by a margin that covers the rounding of the coordinates in T (relative error well under
// 1e-6) plus two points, and every point is still checked, so no contributing sample can be dropped.
struct SampleRange {
  int64_t lo, hi;
};

template <typename T>
EYECOOL_HD SampleRange sample_range(T start, T bin, int64_t grid, int64_t p, int64_t size) {
  SampleRange r{0, grid};
  if (grid <= 0) return {0, 0};
  const double step = static_cast<double>(bin) / static_cast<double>(grid);
  const double origin = static_cast<double>(start) + static_cast<double>(p) * static_cast<double>(bin);
  // A NaN or infinite origin or step puts every point at NaN or +-inf: none is valid.
  if (!(step < 1e300 && step > -1e300) || !(origin < 1e300 && origin > -1e300)) return {0, 0};
  if (step == 0.0) return r;  // every point at the same coordinate (only with a small fixed grid)
  // coordinate(i) = origin + (i + 0.5) * step, for i in [0, grid)
  double a = (-1.0 - origin) / step - 0.5;
  double b = (static_cast<double>(size) - origin) / step - 0.5;
  if (a > b) {
    const double t = a;
    a = b;
    b = t;
  }
  const double abs_step = step < 0 ? -step : step;
  const double magnitude = (origin < 0 ? -origin : origin) + (bin < 0 ? -(double)bin : (double)bin) + size + 1.0;
  const double margin = magnitude * 1e-6 / abs_step + 2.0;
  const double lo = floor(a - margin), hi = ceil(b + margin) + 1.0;
  if (lo > static_cast<double>(grid) || hi < 0.0) return {0, 0};
  r.lo = lo > 0.0 ? static_cast<int64_t>(lo) : 0;
  r.hi = hi < static_cast<double>(grid) ? static_cast<int64_t>(hi) : grid;
  if (r.hi < r.lo) r.hi = r.lo;
  return r;
}

// The four neighbours of a sampling point and their bilinear weights. A point more than one pixel outside
// the map contributes nothing (valid=false, all weights 0); a point in the border strip is clamped onto the
// edge, as in Detectron and torchvision.
template <typename T>
struct BilinearTaps {
  int64_t y_low, x_low, y_high, x_high;
  T w1, w2, w3, w4;  // (y_low,x_low), (y_low,x_high), (y_high,x_low), (y_high,x_high)
  bool valid;
};

template <typename T>
EYECOOL_HD BilinearTaps<T> bilinear_taps(int64_t height, int64_t width, T y, T x) {
  BilinearTaps<T> t;
  // The negated comparisons also reject NaN coordinates. An empty map (height or width 0) has no pixel to clamp
  // onto: every point is outside, so the ROI pools to 0 and has no gradient.
  if (!(y >= (T)-1.0 && y <= (T)height && x >= (T)-1.0 && x <= (T)width) || height <= 0 || width <= 0) {
    t.y_low = t.x_low = t.y_high = t.x_high = 0;
    t.w1 = t.w2 = t.w3 = t.w4 = (T)0;
    t.valid = false;
    return t;
  }
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  t.y_low = static_cast<int64_t>(y);
  t.x_low = static_cast<int64_t>(x);
  if (t.y_low >= height - 1) {
    t.y_high = t.y_low = height - 1;
    y = (T)t.y_low;
  } else {
    t.y_high = t.y_low + 1;
  }
  if (t.x_low >= width - 1) {
    t.x_high = t.x_low = width - 1;
    x = (T)t.x_low;
  } else {
    t.x_high = t.x_low + 1;
  }
  const T ly = y - t.y_low;
  const T lx = x - t.x_low;
  const T hy = (T)1. - ly, hx = (T)1. - lx;
  t.w1 = hy * hx;
  t.w2 = hy * lx;
  t.w3 = ly * hx;
  t.w4 = ly * lx;
  t.valid = true;
  return t;
}

// FPN level of a box (detectron2's assign_boxes_to_levels), as an index into the pooler's levels:
// floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)) clamped to [min_level, max_level],
// minus min_level. A NaN area goes to the finest level.
template <typename T>
EYECOOL_HD int64_t fpn_level_index(T x1, T y1, T x2, T y2, T canonical_box_size, int64_t canonical_level,
                                   int64_t min_level, int64_t max_level) {
  const T area = (x2 - x1) * (y2 - y1);
  const T lvl = floor(static_cast<T>(canonical_level) + log2(sqrt(area) / canonical_box_size + (T)1e-8));
  int64_t level;
  if (!(lvl >= static_cast<T>(min_level))) {
    level = min_level;
  } else if (lvl > static_cast<T>(max_level)) {
    level = max_level;
  } else {
    level = static_cast<int64_t>(lvl);
  }
  return level - min_level;
}

// ---- input checks (host only), shared by the CPU and CUDA entry points ----

inline void check_roi_align_inputs(const at::Tensor& input, const at::Tensor& rois, int64_t pooled_h,
                                   int64_t pooled_w, const char* op) {
  check_dim(input, 4, "input", "[N, C, H, W]");
  check_floating(input, "input");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois must be a [K, 5] tensor (batch index, x1, y1, x2, y2), got shape ", rois.sizes());
  check_same_dtype(input, "input", rois, "rois");
  check_same_device(input, "input", rois, "rois");
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op, ": output_size must be positive, got (", pooled_h, ", ", pooled_w, ")");
  check_allocation({rois.size(0), input.size(1), pooled_h, pooled_w}, input.element_size(), op,
                   "the output [K, C, output_size[0], output_size[1]]");
}

// The gradient maps a backward writes: one [batch, channels, height, width] map per level, as many as there are
// scales. Checked before anything is allocated or launched: a missing height would read past the caller's list.
inline void check_roi_align_backward_levels(int64_t batch, int64_t channels, at::IntArrayRef heights,
                                            at::IntArrayRef widths, size_t num_levels, const char* op) {
  TORCH_CHECK(heights.size() == num_levels && widths.size() == num_levels, op,
              ": heights and widths must hold one size per level (", num_levels, " scales), got ", heights.size(),
              " heights and ", widths.size(), " widths");
  TORCH_CHECK(num_levels >= 1 && num_levels <= 8, op, ": 1 to 8 levels are supported, got ", num_levels);
  TORCH_CHECK(batch >= 0 && channels >= 0, op, ": batch_size and channels must be non-negative, got ", batch, " and ",
              channels);
  for (size_t l = 0; l < num_levels; ++l) {
    TORCH_CHECK(heights[l] >= 0 && widths[l] >= 0, op, ": level ", l, " must have a non-negative size, got ",
                heights[l], "x", widths[l]);
    check_allocation({batch, channels, heights[l], widths[l]}, 8, op, "the input gradient [N, C, H, W]");
  }
}

inline void check_roi_align_backward_inputs(const at::Tensor& grad, const at::Tensor& rois, int64_t pooled_h,
                                            int64_t pooled_w, int64_t channels, const char* op) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              op, ": grad must have shape [", rois.size(0), ", ", channels, ", ", pooled_h, ", ", pooled_w,
              "], got ", grad.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be a [K, 5] tensor, got shape ", rois.sizes());
  check_same_dtype(grad, "grad", rois, "rois");
  check_same_device(grad, "grad", rois, "rois");
}

// FPN levels (min_level, max_level) named by the pooler's scales, which must be 2^-min_level, 2^-(min_level+1), ...
inline std::pair<int64_t, int64_t> pyramid_levels(at::ArrayRef<double> scales) {
  TORCH_CHECK(!scales.empty(), "multilevel_roi_align: scales must name at least one level");
  TORCH_CHECK(scales.size() <= 8, "multilevel_roi_align: at most 8 levels are supported, got ", scales.size());
  int64_t min_level = 0;
  for (size_t l = 0; l < scales.size(); ++l) {
    TORCH_CHECK(scales[l] > 0, "multilevel_roi_align: scales must be positive, got ", scales[l], " at level ", l);
    const double lvl = -std::log2(scales[l]);
    const int64_t rounded = static_cast<int64_t>(std::llround(lvl));
    TORCH_CHECK(std::abs(lvl - static_cast<double>(rounded)) < 1e-6,
                "multilevel_roi_align: scales must be powers of 2, got ", scales[l]);
    if (l == 0) min_level = rounded;
    TORCH_CHECK(rounded == min_level + static_cast<int64_t>(l),
                "multilevel_roi_align: scales must halve from one level to the next (finest first), got ", scales);
  }
  return {min_level, min_level + static_cast<int64_t>(scales.size()) - 1};
}

inline std::pair<int64_t, int64_t> check_multilevel_inputs(at::TensorList features, const at::Tensor& rois,
                                                           int64_t pooled_h, int64_t pooled_w,
                                                           at::ArrayRef<double> scales) {
  TORCH_CHECK(!features.empty(), "multilevel_roi_align: features must hold at least one level");
  TORCH_CHECK(features.size() == scales.size(), "multilevel_roi_align: got ", features.size(),
              " feature levels but ", scales.size(), " scales");
  for (size_t l = 0; l < features.size(); ++l) {
    const auto& f = features[l];
    TORCH_CHECK(f.dim() == 4, "multilevel_roi_align: features[", l, "] must be [N, C, H, W], got shape ", f.sizes());
    TORCH_CHECK(f.size(0) == features[0].size(0) && f.size(1) == features[0].size(1),
                "multilevel_roi_align: every level must have the same batch size and channels; features[0] is ",
                features[0].sizes(), " but features[", l, "] is ", f.sizes());
    check_same_dtype(f, "features[l]", features[0], "features[0]");
    check_same_device(f, "features[l]", features[0], "features[0]");
  }
  check_roi_align_inputs(features[0], rois, pooled_h, pooled_w, "multilevel_roi_align");
  return pyramid_levels(scales);
}

}  // namespace eyecool
