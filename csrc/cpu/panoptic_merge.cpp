// UPSNet panoptic merge on the CPU, parallel over output rows, nothing materialised: no [S + M + 1, H, W] stack,
// no pasted masks, no resized logits. Per row, every pixel receives the offers of the per-pixel decision
// (panoptic_merge.h, the code the CUDA kernel runs) in the same order and with the same arithmetic, so the labels
// are identical; only the loops are turned around so that they vectorise:
//  * the semantic part (the stuff argmax and the max thing logit) runs with the channel loop outside and the
//    pixel loop inside, reading each channel's row contiguously (or its four resize taps, computed once per row);
//    the stuff channels arrive in increasing label order, so an offer reduces to "strictly larger wins";
//  * the instances run one at a time over the row: the pixels whose centres lie in the box are an interval,
//    found once per (instance, row), where the pasted mask is sampled; every other pixel gets the instance's zero.
// The row loops are compiled for AVX2 (without FMA, which would change the rounding of the resize taps' sums) and
// for the baseline ISA, chosen at run time by cpu_features.h's dispatch_cpu_isa (kMergeIsa, kMergeFma below).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")  // lets the selects of the row loops vectorise (no FP traps in PyTorch)
#endif
#include "panoptic_merge.h"

#include "cpu/cpu_features.h"

namespace eyecool {
namespace {

// The pixels [first, stop) of a row of `size` whose centres lie on the box side [low, high): an interval,
// since the test is monotone on either end. Estimated in double, then settled with the exact test.
template <typename T>
void side_span(T low, T high, int64_t size, int64_t& first, int64_t& stop) {
  const auto clamp_index = [size](double v) -> int64_t {
    if (!(v > 0.0)) return 0;  // also NaN
    return v < static_cast<double>(size) ? static_cast<int64_t>(v) : size;
  };
  first = clamp_index(std::ceil(static_cast<double>(low) - 0.5));
  while (first > 0 && low <= static_cast<T>(first - 1) + T(0.5)) --first;
  while (first < size && !(low <= static_cast<T>(first) + T(0.5))) ++first;
  stop = std::max(first, clamp_index(std::ceil(static_cast<double>(high) - 0.5)));
  while (stop > first && !(static_cast<T>(stop - 1) + T(0.5) < high)) --stop;
  while (stop < size && box_side_holds(low, high, stop)) ++stop;
}

// Per-thread row state: the best (value, label) so far, the max thing logit and max_i Y_i of each pixel, and,
// when the logits are resized, each pixel's view of them (SemanticPixel's taps, as arrays, so that the channel
// sweep vectorises); y holds Y_i of the pixels inside the current instance's box.
template <typename acc_t, typename scalar_t>
struct RowState {
  std::vector<acc_t> best_value, thing_max, max_y, y, w00, w01, w10, w11;
  std::vector<int32_t> o00, o01, o10, o11;  // offsets in a channel plane (callers check that they fit)
  std::vector<int32_t> best_label;
  explicit RowState(int64_t width)
      : best_value(width), thing_max(width), max_y(width), y(width), w00(width), w01(width), w10(width),
        w11(width), o00(width), o01(width), o10(width), o11(width), best_label(width) {}

  void set_pixel(int64_t px, const SemanticPixel<acc_t, scalar_t>& p) {
    o00[px] = static_cast<int32_t>(p.o00), o01[px] = static_cast<int32_t>(p.o01);
    o10[px] = static_cast<int32_t>(p.o10), o11[px] = static_cast<int32_t>(p.o11);
    w00[px] = p.w00, w01[px] = p.w01, w10[px] = p.w10, w11[px] = p.w11;
  }
};

// The semantic candidates of upsnet_semantic_candidates for a whole row: stuff channels 0..S-1 offered in order
// (so the first offer sets, and a later one wins only when strictly larger, as stack_argmax_offer decides), and
// the max over the thing channels. sem_row(c, px) is the logit of channel c at pixel px.
template <typename acc_t, typename SemRow>
EYECOOL_ALWAYS_INLINE inline void semantic_row_body(const SemRow& sem_row, int64_t channels,
                                                    int64_t num_stuff, int64_t width, acc_t* best_value,
                                                    int32_t* best_label, acc_t* thing_max) {
  for (int64_t px = 0; px < width; ++px) best_label[px] = -1;
  if (num_stuff > 0) {
    for (int64_t px = 0; px < width; ++px) {
      best_value[px] = sem_row(0, px);
      best_label[px] = 0;
    }
  }
  for (int64_t c = 1; c < num_stuff; ++c) {
    const int32_t label = static_cast<int32_t>(c);
#pragma omp simd
    for (int64_t px = 0; px < width; ++px) {
      const acc_t v = sem_row(c, px);
      const bool wins = v > best_value[px];
      best_value[px] = wins ? v : best_value[px];
      best_label[px] = wins ? label : best_label[px];
    }
  }
  for (int64_t px = 0; px < width; ++px) thing_max[px] = sem_row(num_stuff, px);
  for (int64_t c = num_stuff + 1; c < channels; ++c) {
#pragma omp simd
    for (int64_t px = 0; px < width; ++px) {
      const acc_t v = sem_row(c, px);
      thing_max[px] = v > thing_max[px] ? v : thing_max[px];
    }
  }
}

template <typename acc_t, typename scalar_t>
struct DirectRow {
  const scalar_t* row;  // channel 0 of the output row
  int64_t plane;
  acc_t operator()(int64_t c, int64_t px) const { return static_cast<acc_t>(row[c * plane + px]); }
};

// SemanticPixel::operator() of every pixel of the row, from its taps stored as arrays (same arithmetic).
template <typename acc_t, typename scalar_t>
struct ResizedRow {
  const scalar_t* data;
  int64_t plane;
  const int32_t *o00, *o01, *o10, *o11;
  const acc_t *w00, *w01, *w10, *w11;
  acc_t operator()(int64_t c, int64_t px) const {
    const scalar_t* p = data + c * plane;
    return w00[px] * static_cast<acc_t>(p[o00[px]]) + w01[px] * static_cast<acc_t>(p[o01[px]]) +
           w10[px] * static_cast<acc_t>(p[o10[px]]) + w11[px] * static_cast<acc_t>(p[o11[px]]);
  }
};

// The resized logits of the row whose taps `row` holds.
template <typename acc_t, typename scalar_t>
ResizedRow<acc_t, scalar_t> resized_row(const RowState<acc_t, scalar_t>& row, const scalar_t* data, int64_t plane) {
  return {data, plane, row.o00.data(), row.o01.data(), row.o10.data(), row.o11.data(),
          row.w00.data(), row.w01.data(), row.w10.data(), row.w11.data()};
}

// The row loops' variants: baseline and AVX2 (an AVX-512 CPU runs the AVX2 one), FMA left out so that every sum
// rounds as panoptic_merge.h's (the labels must equal the CUDA kernel's and the reference's). An AVX-512 build
// cannot leave FMA out (benchmarks/results/cpu_isa_dispatch.md: it was 16% faster on full-size logits, 55% slower
// on resized ones, and contracted the taps' sums).
constexpr CpuIsa kMergeIsa = CpuIsa::kAvx2;
constexpr FmaPolicy kMergeFma = FmaPolicy::kUnfused;

template <typename acc_t, typename SemRow>
void semantic_row(CpuIsa isa, const SemRow& sem_row, int64_t channels, int64_t num_stuff, int64_t width,
                  acc_t* best_value, int32_t* best_label, acc_t* thing_max) {
  dispatch_cpu_isa<kMergeIsa, kMergeFma>(isa, [&]() EYECOOL_ALWAYS_INLINE {
    semantic_row_body<acc_t>(sem_row, channels, num_stuff, width, best_value, best_label, thing_max);
  });
}

// Instance i's offers to the pixels [first, stop) of the row outside its box: Y_i = 0 and Y_i + M_i = 0. Label
// S + i is larger than every label offered before it, so 0 wins only when strictly larger (or first). Written
// without short-circuits so that it vectorises.
template <typename acc_t>
EYECOOL_ALWAYS_INLINE inline void offer_zero_span_body(int64_t first, int64_t stop, bool first_instance,
                                                       int32_t label, acc_t* best_value, int32_t* best_label,
                                                       acc_t* max_y) {
  if (first_instance) {
    for (int64_t px = first; px < stop; ++px) max_y[px] = acc_t(0);
  } else {
#pragma omp simd
    for (int64_t px = first; px < stop; ++px) max_y[px] = acc_t(0) > max_y[px] ? acc_t(0) : max_y[px];
  }
#pragma omp simd
  for (int64_t px = first; px < stop; ++px) {
    const bool wins = (best_label[px] < 0) | (acc_t(0) > best_value[px]);
    best_value[px] = wins ? acc_t(0) : best_value[px];
    best_label[px] = wins ? label : best_label[px];
  }
}

template <typename acc_t>
void offer_zero_span(CpuIsa isa, int64_t first, int64_t stop, bool first_instance, int32_t label, acc_t* best_value,
                     int32_t* best_label, acc_t* max_y) {
  dispatch_cpu_isa<kMergeIsa, kMergeFma>(isa, [&]() EYECOOL_ALWAYS_INLINE {
    offer_zero_span_body<acc_t>(first, stop, first_instance, label, best_value, best_label, max_y);
  });
}

// Instance i's offers to the pixels [first, stop) of row py inside its box: Y_i + M_i, and Y_i into max_i Y_i.
// y holds Y_i = X[S + class_i] of those pixels. M_i is mask_bilinear_zeros (panoptic_merge.h) at the pixel's
// mask coordinates, evaluated with the same products and the same order of additions; a tap outside the mask
// adds +0 instead of being skipped, which leaves the sum unchanged (the sum starts at +0 and so is never -0), and
// the mask row of the taps is fixed for the whole span.
template <typename acc_t, typename scalar_t>
EYECOOL_ALWAYS_INLINE inline void instance_span_body(int64_t first, int64_t stop, bool first_instance,
                                                     int32_t label, const acc_t* y, acc_t x1, acc_t x2,
                                                     acc_t iy, const scalar_t* mask, int64_t mask_h,
                                                     int64_t mask_w, acc_t* best_value, int32_t* best_label,
                                                     acc_t* max_y) {
  iy = finite_mask_coord(iy, mask_h);
  const acc_t fy = std::floor(iy);
  const int64_t y0 = static_cast<int64_t>(fy), y1 = y0 + 1;
  const acc_t south = iy - fy, north = acc_t(1) - south;
  const bool in_y0 = y0 >= 0 && y0 < mask_h, in_y1 = y1 >= 0 && y1 < mask_h;
  const scalar_t* row0 = mask + (in_y0 ? y0 : 0) * mask_w;
  const scalar_t* row1 = mask + (in_y1 ? y1 : 0) * mask_w;
  const int32_t last = static_cast<int32_t>(mask_w - 1), width = static_cast<int32_t>(mask_w);
#pragma omp simd
  for (int64_t px = first; px < stop; ++px) {
    const acc_t cx = static_cast<acc_t>(px) + acc_t(0.5);
    const acc_t ix = finite_mask_coord(mask_source_coord(cx, x1, x2, mask_w), mask_w);
    // floor(ix) without a library call, so that the loop vectorises: exact, since ix lies in [-0.5, mask_w)
    // for a pixel inside the box.
    const acc_t truncated = static_cast<acc_t>(static_cast<int32_t>(ix));
    const acc_t fx = truncated > ix ? truncated - acc_t(1) : truncated;
    const int32_t x0 = static_cast<int32_t>(fx), x1i = x0 + 1;
    const acc_t east = ix - fx, west = acc_t(1) - east;
    const bool in_x0 = (x0 >= 0) & (x0 < width), in_x1 = (x1i >= 0) & (x1i < width);
    const int32_t c0 = x0 < 0 ? 0 : (x0 > last ? last : x0), c1 = x1i < 0 ? 0 : (x1i > last ? last : x1i);
    const acc_t t00 = static_cast<acc_t>(row0[c0]) * (north * west);
    const acc_t t01 = static_cast<acc_t>(row0[c1]) * (north * east);
    const acc_t t10 = static_cast<acc_t>(row1[c0]) * (south * west);
    const acc_t t11 = static_cast<acc_t>(row1[c1]) * (south * east);
    acc_t m = acc_t(0);
    m += (in_y0 & in_x0) ? t00 : acc_t(0);
    m += (in_y0 & in_x1) ? t01 : acc_t(0);
    m += (in_y1 & in_x0) ? t10 : acc_t(0);
    m += (in_y1 & in_x1) ? t11 : acc_t(0);
    const acc_t value = y[px] + m;
    max_y[px] = (first_instance | (y[px] > max_y[px])) ? y[px] : max_y[px];
    const bool wins = (best_label[px] < 0) | (value > best_value[px]);
    best_value[px] = wins ? value : best_value[px];
    best_label[px] = wins ? label : best_label[px];
  }
}

template <typename acc_t, typename scalar_t>
void instance_span(CpuIsa isa, int64_t first, int64_t stop, bool first_instance, int32_t label, const acc_t* y,
                   acc_t x1, acc_t x2, acc_t iy, const scalar_t* mask, int64_t mask_h, int64_t mask_w,
                   acc_t* best_value, int32_t* best_label, acc_t* max_y) {
  dispatch_cpu_isa<kMergeIsa, kMergeFma>(isa, [&]() EYECOOL_ALWAYS_INLINE {
    instance_span_body<acc_t, scalar_t>(first, stop, first_instance, label, y, x1, x2, iy, mask, mask_h, mask_w,
                                        best_value, best_label, max_y);
  });
}

at::Tensor upsnet_panoptic_merge_cpu(const at::Tensor& sem_logits, int64_t num_stuff, const at::Tensor& boxes_in,
                                     const at::Tensor& classes_in, const at::Tensor& mask_logits_in, int64_t height,
                                     int64_t width) {
  check_panoptic_merge_inputs(sem_logits, num_stuff, boxes_in, classes_in, mask_logits_in, height, width);
  at::Tensor labels = at::empty({height, width}, sem_logits.options().dtype(at::kLong));
  if (labels.numel() == 0) return labels;
  const at::Tensor sem = sem_logits.contiguous();
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor classes = classes_in.contiguous();
  const at::Tensor masks = mask_logits_in.contiguous();
  const int64_t channels = sem.size(0), in_h = sem.size(1), in_w = sem.size(2);
  const int64_t num_instances = boxes.size(0), mask_h = masks.size(1), mask_w = masks.size(2);
  const int64_t num_things = channels - num_stuff;
  TORCH_CHECK(num_stuff + num_instances < (int64_t(1) << 31), "upsnet_panoptic_merge: at most 2^31 - 1 - num_stuff ",
              "instances, got ", num_instances);
  TORCH_CHECK(in_h * in_w < (int64_t(1) << 31), "upsnet_panoptic_merge: sem_logits planes of at most 2^31 - 1 ",
              "pixels are supported on the CPU, got ", in_h, "x", in_w);
  const int64_t* cls = classes.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_instances; ++i) {
    TORCH_CHECK(cls[i] >= 0 && cls[i] < num_things, "upsnet_panoptic_merge: classes[", i,
                "] must be a thing index in [0, ", num_things, "), got ", cls[i]);
  }
  int64_t* out = labels.data_ptr<int64_t>();
  const CpuIsa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sem.scalar_type(), "upsnet_panoptic_merge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sem_ptr = sem.data_ptr<scalar_t>();
    const scalar_t* box_ptr = boxes.data_ptr<scalar_t>();
    const scalar_t* mask_ptr = masks.data_ptr<scalar_t>();
    const bool resized = in_h != height || in_w != width;
    const int64_t plane = in_h * in_w;
    at::parallel_for(0, height, 1, [&](int64_t begin, int64_t end) {
      RowState<acc_t, scalar_t> row(width);
      acc_t* best_value = row.best_value.data();
      int32_t* best_label = row.best_label.data();
      acc_t* max_y = row.max_y.data();
      for (int64_t py = begin; py < end; ++py) {
        if (resized) {
          for (int64_t px = 0; px < width; ++px) {
            row.set_pixel(px, semantic_pixel<acc_t, scalar_t>(sem_ptr, in_h, in_w, height, width, px, py));
          }
          semantic_row<acc_t>(isa, resized_row(row, sem_ptr, plane), channels, num_stuff, width, best_value,
                              best_label, row.thing_max.data());
        } else {
          semantic_row<acc_t>(isa, DirectRow<acc_t, scalar_t>{sem_ptr + py * in_w, plane}, channels, num_stuff,
                              width, best_value, best_label, row.thing_max.data());
        }
        // upsnet_instance_candidates, instance by instance over the row.
        const acc_t cy = static_cast<acc_t>(py) + acc_t(0.5);
        for (int64_t i = 0; i < num_instances; ++i) {
          const acc_t x1 = static_cast<acc_t>(box_ptr[i * 4 + 0]), y1 = static_cast<acc_t>(box_ptr[i * 4 + 1]);
          const acc_t x2 = static_cast<acc_t>(box_ptr[i * 4 + 2]), y2 = static_cast<acc_t>(box_ptr[i * 4 + 3]);
          const int32_t label = static_cast<int32_t>(num_stuff + i);
          int64_t first = 0, stop = 0;  // empty unless the row crosses the box
          if (box_side_holds(y1, y2, py)) side_span(x1, x2, width, first, stop);
          offer_zero_span<acc_t>(isa, 0, first, i == 0, label, best_value, best_label, max_y);
          offer_zero_span<acc_t>(isa, stop, width, i == 0, label, best_value, best_label, max_y);
          if (first == stop) continue;
          const int64_t channel = num_stuff + cls[i];
          const scalar_t* mask = mask_ptr + i * mask_h * mask_w;
          const acc_t iy = mask_source_coord(cy, y1, y2, mask_h);
          acc_t* y = row.y.data();
          if (resized) {
            const ResizedRow<acc_t, scalar_t> sem_row = resized_row(row, sem_ptr, plane);
            for (int64_t px = first; px < stop; ++px) y[px] = sem_row(channel, px);
          } else {
            const scalar_t* channel_row = sem_ptr + channel * plane + py * in_w;
            for (int64_t px = first; px < stop; ++px) y[px] = static_cast<acc_t>(channel_row[px]);
          }
          instance_span<acc_t, scalar_t>(isa, first, stop, i == 0, label, y, x1, x2, iy, mask, mask_h, mask_w,
                                         best_value, best_label, max_y);
        }
        // The unknown logit, max_{t >= S} X[t] - max_i Y_i (max_i Y_i = 0 without instances).
        const int32_t unknown = static_cast<int32_t>(num_stuff + num_instances);
        int64_t* out_row = out + py * width;
        for (int64_t px = 0; px < width; ++px) {
          const acc_t value = row.thing_max[px] - (num_instances > 0 ? max_y[px] : acc_t(0));
          const bool wins = best_label[px] < 0 || value > best_value[px];
          out_row[px] = wins ? unknown : best_label[px];
        }
      }
    });
  });
  return labels;
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) { m.impl("upsnet_panoptic_merge", &eyecool::upsnet_panoptic_merge_cpu); }
