// UPSNet panoptic merge math shared by the CPU and CUDA kernels: the per-pixel decision (the argmax of the
// stuff / instance / unknown logit stack), detectron2's mask pasting convention, and F.interpolate's bilinear
// source taps for semantic logits resized on the fly.
//
// Stack at pixel p (S stuff classes, M instances): X[0..S-1](p); for each instance i, Y_i(p) + M_i(p) with
// Y_i = X[S + class_i] and M_i the pasted mask logit, both 0 outside box i; the unknown logit
// max_{t >= S} X[t](p) - max_i Y_i(p). The label is the first index of the maximum: 0..S-1 stuff, S + i
// instance i, S + M unknown.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace eyecool {

#ifndef __CUDA_ARCH__
using std::floor;
#endif

// The best (value, label) so far under the order of argmax with first-index ties: a larger value wins, an
// equal value wins only with a smaller label. With that order the candidates may be offered in any sequence.
template <typename T>
struct StackArgmax {
  T value;
  int64_t label;  // -1 before the first candidate
};

template <typename T>
EYECOOL_HD void stack_argmax_offer(StackArgmax<T>& best, T value, int64_t label) {
  if (best.label < 0 || value > best.value || (value == best.value && label < best.label)) {
    best.value = value;
    best.label = label;
  }
}

// Pixel index p lies on the box side [low, high) when its centre p + 0.5 does.
template <typename T>
EYECOOL_HD bool box_side_holds(T low, T high, int64_t p) {
  const T centre = static_cast<T>(p) + T(0.5);
  return low <= centre && centre < high;
}

// Pixel (px, py) belongs to box (x1, y1, x2, y2) when its centre lies in [x1, x2) x [y1, y2).
template <typename T>
EYECOOL_HD bool box_holds_pixel(T x1, T y1, T x2, T y2, int64_t px, int64_t py) {
  return box_side_holds(x1, x2, px) && box_side_holds(y1, y2, py);
}

// Source coordinate in a `size`-cell mask of the pixel centre `centre` on the box side [low, high): the box
// maps to the normalised grid [-1, 1] (g = ((centre - low) / (high - low)) * 2 - 1), sampled as grid_sample
// does with align_corners=False: ((g + 1) * size - 1) / 2.
template <typename T>
EYECOOL_HD T mask_source_coord(T centre, T low, T high, int64_t size) {
  // mul_rn: an FMA here (nvcc's default) would move pixels across mask cells at near-ties, changing labels.
  const T g = mul_rn((centre - low) / (high - low), T(2)) - T(1);
  return (mul_rn(g + T(1), static_cast<T>(size)) - T(1)) / T(2);
}

// A mask source coordinate, or -2 (both taps outside the mask: it samples 0) when it is not within [-1, size]: for
// a pixel inside a box it lies in [-0.5, size), unless a side of the box is infinite or NaN, which makes it NaN.
// Moved before any integer conversion (converting NaN is undefined on the host).
template <typename T>
EYECOOL_HD T finite_mask_coord(T coord, int64_t size) {
  return (coord >= T(-1) && coord <= static_cast<T>(size)) ? coord : T(-2);
}

// Bilinear sample of a [height, width] mask at (iy, ix) with zero padding (grid_sample's "zeros").
template <typename T, typename scalar_t>
EYECOOL_HD T mask_bilinear_zeros(const scalar_t* mask, int64_t height, int64_t width, T iy, T ix) {
  iy = finite_mask_coord(iy, height);
  ix = finite_mask_coord(ix, width);
  const T fx = floor(ix), fy = floor(iy);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  const T east = ix - fx, west = T(1) - east;  // weights of x1 and x0
  const T south = iy - fy, north = T(1) - south;
  const bool in_x0 = x0 >= 0 && x0 < width, in_x1 = x1 >= 0 && x1 < width;
  const bool in_y0 = y0 >= 0 && y0 < height, in_y1 = y1 >= 0 && y1 < height;
  T value = T(0);
  if (in_y0 && in_x0) value += mul_rn(static_cast<T>(mask[y0 * width + x0]), north * west);
  if (in_y0 && in_x1) value += mul_rn(static_cast<T>(mask[y0 * width + x1]), north * east);
  if (in_y1 && in_x0) value += mul_rn(static_cast<T>(mask[y1 * width + x0]), south * west);
  if (in_y1 && in_x1) value += mul_rn(static_cast<T>(mask[y1 * width + x1]), south * east);
  return value;
}

// Source taps of output index `dst` when resizing `in_size` cells to `out_size` bilinearly with
// align_corners=False (F.interpolate): src = (dst + 0.5) * in / out - 0.5, clamped at 0.
template <typename T>
struct ResizeTaps {
  int64_t low, high;
  T w_low, w_high;
};

template <typename T>
EYECOOL_HD ResizeTaps<T> resize_taps(int64_t dst, int64_t in_size, int64_t out_size) {
  const T scale = static_cast<T>(in_size) / static_cast<T>(out_size);
  T src = mul_rn(scale, static_cast<T>(dst) + T(0.5)) - T(0.5);
  if (src < T(0)) src = T(0);
  ResizeTaps<T> t;
  t.low = static_cast<int64_t>(src);
  if (t.low > in_size - 1) t.low = in_size - 1;
  t.high = t.low + (t.low < in_size - 1 ? 1 : 0);
  t.w_high = src - static_cast<T>(t.low);
  t.w_low = T(1) - t.w_high;
  return t;
}

// One pixel's view of the semantic logits: [C, h, w] contiguous, read directly or resized on the fly.
template <typename T, typename scalar_t>
struct SemanticPixel {
  const scalar_t* data;
  int64_t plane;  // h * w
  bool resized;
  int64_t o00, o01, o10, o11;  // offsets of the four taps in a channel plane (o00 alone when not resized)
  T w00, w01, w10, w11;

  EYECOOL_HD T operator()(int64_t c) const {
    const scalar_t* p = data + c * plane;
    if (!resized) return static_cast<T>(p[o00]);
    return mul_rn(w00, static_cast<T>(p[o00])) + mul_rn(w01, static_cast<T>(p[o01])) +
           mul_rn(w10, static_cast<T>(p[o10])) + mul_rn(w11, static_cast<T>(p[o11]));
  }
};

template <typename T, typename scalar_t>
EYECOOL_HD SemanticPixel<T, scalar_t> semantic_pixel(const scalar_t* data, int64_t in_h, int64_t in_w,
                                                     int64_t out_h, int64_t out_w, int64_t px, int64_t py) {
  SemanticPixel<T, scalar_t> s;
  s.data = data;
  s.plane = in_h * in_w;
  s.resized = in_h != out_h || in_w != out_w;
  if (!s.resized) {
    s.o00 = s.o01 = s.o10 = s.o11 = py * in_w + px;
    s.w00 = T(1);
    s.w01 = s.w10 = s.w11 = T(0);
    return s;
  }
  const ResizeTaps<T> ty = resize_taps<T>(py, in_h, out_h), tx = resize_taps<T>(px, in_w, out_w);
  s.o00 = ty.low * in_w + tx.low;
  s.o01 = ty.low * in_w + tx.high;
  s.o10 = ty.high * in_w + tx.low;
  s.o11 = ty.high * in_w + tx.high;
  s.w00 = ty.w_low * tx.w_low;
  s.w01 = ty.w_low * tx.w_high;
  s.w10 = ty.w_high * tx.w_low;
  s.w11 = ty.w_high * tx.w_high;
  return s;
}

// The semantic part of the stack at one pixel: offers the stuff logits X[0..S-1] to `best` and returns
// max_{t >= S} X[t]. sem(c) gives the semantic logit of channel c at the pixel.
template <typename T, typename Sem>
EYECOOL_HD T upsnet_semantic_candidates(const Sem& sem, int64_t channels, int64_t num_stuff, StackArgmax<T>& best) {
  for (int64_t c = 0; c < num_stuff; ++c) stack_argmax_offer(best, sem(c), c);
  T thing_max = sem(num_stuff);
  for (int64_t c = num_stuff + 1; c < channels; ++c) {
    const T v = sem(c);
    thing_max = v > thing_max ? v : thing_max;
  }
  return thing_max;
}

// The rest of the stack at pixel (px, py), given `best` over the stuff logits and the pixel's max thing logit:
// the instances and the unknown logit. Returns the label. boxes is [M, 4], classes [M] (a class outside
// [0, K) reads as a 0 semantic logit instead of out of bounds), masks [M, mask_h, mask_w].
template <typename T, typename Sem, typename scalar_t>
EYECOOL_HD int64_t upsnet_instance_candidates(const Sem& sem, StackArgmax<T> best, T thing_max, int64_t channels,
                                              int64_t num_stuff, const scalar_t* boxes, const int64_t* classes,
                                              const scalar_t* masks, int64_t num_instances, int64_t mask_h,
                                              int64_t mask_w, int64_t px, int64_t py) {
  // max_i Y_i counts the zeros of the boxes that do not hold the pixel; with no instance it is 0.
  T max_y = T(0);
  const T cx = static_cast<T>(px) + T(0.5), cy = static_cast<T>(py) + T(0.5);
  for (int64_t i = 0; i < num_instances; ++i) {
    const T x1 = static_cast<T>(boxes[i * 4 + 0]), y1 = static_cast<T>(boxes[i * 4 + 1]);
    const T x2 = static_cast<T>(boxes[i * 4 + 2]), y2 = static_cast<T>(boxes[i * 4 + 3]);
    T y = T(0), value = T(0);
    if (box_holds_pixel(x1, y1, x2, y2, px, py)) {
      const int64_t cls = classes[i];
      y = (cls >= 0 && num_stuff + cls < channels) ? sem(num_stuff + cls) : T(0);
      const T iy = mask_source_coord(cy, y1, y2, mask_h), ix = mask_source_coord(cx, x1, x2, mask_w);
      value = y + mask_bilinear_zeros<T>(masks + i * mask_h * mask_w, mask_h, mask_w, iy, ix);
    }
    max_y = (i == 0 || y > max_y) ? y : max_y;
    stack_argmax_offer(best, value, num_stuff + i);
  }
  stack_argmax_offer(best, thing_max - max_y, num_stuff + num_instances);
  return best.label;
}

// The panoptic label of pixel (px, py): the argmax of the whole stack (what the CUDA kernel runs per thread).
template <typename T, typename Sem, typename scalar_t>
EYECOOL_HD int64_t upsnet_pixel_label(const Sem& sem, int64_t channels, int64_t num_stuff, const scalar_t* boxes,
                                      const int64_t* classes, const scalar_t* masks, int64_t num_instances,
                                      int64_t mask_h, int64_t mask_w, int64_t px, int64_t py) {
  StackArgmax<T> best{T(0), -1};
  const T thing_max = upsnet_semantic_candidates<T>(sem, channels, num_stuff, best);
  return upsnet_instance_candidates<T>(sem, best, thing_max, channels, num_stuff, boxes, classes, masks,
                                       num_instances, mask_h, mask_w, px, py);
}

// ---- input checks (host only), shared by the CPU and CUDA entry points ----

inline void check_panoptic_merge_inputs(const at::Tensor& sem_logits, int64_t num_stuff, const at::Tensor& boxes,
                                        const at::Tensor& classes, const at::Tensor& mask_logits, int64_t height,
                                        int64_t width) {
  check_dim(sem_logits, 3, "sem_logits", "[S + K, H, W]");
  check_floating(sem_logits, "sem_logits");
  TORCH_CHECK(num_stuff >= 0 && num_stuff < sem_logits.size(0), "upsnet_panoptic_merge: num_stuff must be in [0, ",
              sem_logits.size(0), ") (the channels of sem_logits), got ", num_stuff);
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4,
              "upsnet_panoptic_merge: boxes must be a [M, 4] tensor (x1, y1, x2, y2), got shape ", boxes.sizes());
  const int64_t m = boxes.size(0);
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == m && classes.scalar_type() == at::kLong,
              "upsnet_panoptic_merge: classes must be an int64 tensor of shape [", m, "], got ",
              classes.scalar_type(), " of shape ", classes.sizes());
  TORCH_CHECK(mask_logits.dim() == 3 && mask_logits.size(0) == m && mask_logits.size(1) > 0 &&
                  mask_logits.size(2) > 0,
              "upsnet_panoptic_merge: mask_logits must be a [", m, ", s, s] tensor, got shape ", mask_logits.sizes());
  check_same_dtype(sem_logits, "sem_logits", boxes, "boxes");
  check_same_dtype(sem_logits, "sem_logits", mask_logits, "mask_logits");
  check_same_device(sem_logits, "sem_logits", boxes, "boxes");
  check_same_device(sem_logits, "sem_logits", classes, "classes");
  check_same_device(sem_logits, "sem_logits", mask_logits, "mask_logits");
  TORCH_CHECK(height >= 0 && width >= 0, "upsnet_panoptic_merge: the output size must be non-negative, got (",
              height, ", ", width, ")");
  check_allocation({height, width}, sizeof(int64_t), "upsnet_panoptic_merge", "the output labels [height, width]");
  TORCH_CHECK((height == 0 && width == 0) || (sem_logits.size(1) > 0 && sem_logits.size(2) > 0),
              "upsnet_panoptic_merge: sem_logits must not be empty to fill a ", height, "x", width, " output, got ",
              sem_logits.sizes());
}

}  // namespace eyecool
