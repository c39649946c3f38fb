// Deformable convolution math shared by the CPU and CUDA kernels: the sampling position of a kernel point, its
// bilinear taps, the interpolated value and the gradients of that value with respect to the tap values and the
// sampling coordinates.
//
// Semantics are torchvision's: a sample at or beyond one pixel outside the image (y <= -1, y >= H, x <= -1,
// x >= W) is zero and has zero input and mask gradients; inside that band, taps that fall outside the image read
// zero (zero padding, unlike ROIAlign's edge clamping). The coordinate gradient is the derivative of the bilinear
// form on the cell [y_low, y_low + 1] x [x_low, x_low + 1] with those zero taps, also at integer positions, and
// (as torchvision computes it, with no band test) also on row -1 and column -1 exactly: there the cell's far
// side is the image's border, so d value / d y is the border row's value. That is every DCN's state at
// initialisation (zero offsets, padding >= 1), so it decides the offset convolution's first gradients.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace eyecool {

#ifndef __CUDA_ARCH__
using std::floor;
#endif

// Everything a layout-specific kernel needs to read or scatter one bilinear sample. Indices of taps outside
// the image are clamped into it (so addresses stay valid) and their weights are 0; `in1..in4` say which taps
// are real, for the coordinate gradient, which needs the tap values rather than the weights.
template <typename T>
struct DeformTaps {
  int64_t y_low, x_low, y_high, x_high;
  T ly, lx;          // fractional position inside the cell
  T w1, w2, w3, w4;  // (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high); 0 for taps outside
  bool in1, in2, in3, in4;
  bool any;          // strictly inside the band (-1, H) x (-1, W): false means value, input and mask gradients are 0
  bool touches;      // in [-1, H) x [-1, W): the coordinate gradient may be nonzero (any, or row/column -1 exactly)
};

// Sampling position of kernel row i (column j) of output row oy (column ox): the regular convolution grid plus
// the learnt offset. The grid part is an integer, so the order of the additions does not change the result.
template <typename T>
EYECOOL_HD T deform_sampling_position(int64_t out_index, int64_t kernel_index, int64_t stride, int64_t pad,
                                      int64_t dilation, T offset) {
  return static_cast<T>(out_index * stride - pad + kernel_index * dilation) + offset;
}

template <typename T>
EYECOOL_HD DeformTaps<T> deform_bilinear_taps(int64_t height, int64_t width, T y, T x) {
  DeformTaps<T> t;
  // The negated comparison also rejects NaN positions. An empty input (height or width 0) has no tap to read:
  // every sample is outside (value 0, no gradient), and no clamped index can reach row or column -1.
  if (!(y >= (T)-1 && y < (T)height && x >= (T)-1 && x < (T)width) || height <= 0 || width <= 0) {
    t.y_low = t.x_low = t.y_high = t.x_high = 0;
    t.ly = t.lx = (T)0;
    t.w1 = t.w2 = t.w3 = t.w4 = (T)0;
    t.in1 = t.in2 = t.in3 = t.in4 = false;
    t.any = t.touches = false;
    return t;
  }
  const T fy = floor(y), fx = floor(x);
  const int64_t y0 = static_cast<int64_t>(fy), x0 = static_cast<int64_t>(fx);
  const int64_t y1 = y0 + 1, x1 = x0 + 1;
  t.ly = y - fy;
  t.lx = x - fx;
  const T hy = (T)1 - t.ly, hx = (T)1 - t.lx;
  const bool y0_in = y0 >= 0, x0_in = x0 >= 0;
  const bool y1_in = y1 <= height - 1, x1_in = x1 <= width - 1;
  t.in1 = y0_in && x0_in;
  t.in2 = y0_in && x1_in;
  t.in3 = y1_in && x0_in;
  t.in4 = y1_in && x1_in;
  t.w1 = t.in1 ? hy * hx : (T)0;
  t.w2 = t.in2 ? hy * t.lx : (T)0;
  t.w3 = t.in3 ? t.ly * hx : (T)0;
  t.w4 = t.in4 ? t.ly * t.lx : (T)0;
  t.y_low = y0_in ? y0 : 0;
  t.x_low = x0_in ? x0 : 0;
  t.y_high = y1_in ? y1 : height - 1;
  t.x_high = x1_in ? x1 : width - 1;
  t.touches = true;
  // On row -1 or column -1 exactly, the taps inside the image have weight 0 (ly or lx is 0): the value is 0.
  t.any = y > (T)-1 && x > (T)-1;
  return t;
}

// The interpolated value from the four tap values (values of taps outside the image are ignored). Linear in
// the values, so it also turns four channel sums sum_c g_c v_i[c] into sum_c g_c value[c] (the mask gradient).
template <typename T>
EYECOOL_HD T deform_bilinear_value(const DeformTaps<T>& t, T v1, T v2, T v3, T v4) {
  // Exactly 0 off the band, also for infinite values (whose product with a zero weight would be NaN).
  return t.any ? t.w1 * v1 + t.w2 * v2 + t.w3 * v3 + t.w4 * v4 : T(0);
}

// d value / d y and d value / d x from the four tap values. Taps outside the image read 0. Like
// deform_bilinear_value it is linear in the values, so the CPU kernel feeds it channel sums.
template <typename T>
EYECOOL_HD void deform_coordinate_gradient(const DeformTaps<T>& t, T v1, T v2, T v3, T v4, T* grad_y, T* grad_x) {
  if (!t.touches) {
    *grad_y = (T)0;
    *grad_x = (T)0;
    return;
  }
  v1 = t.in1 ? v1 : (T)0;
  v2 = t.in2 ? v2 : (T)0;
  v3 = t.in3 ? v3 : (T)0;
  v4 = t.in4 ? v4 : (T)0;
  *grad_y = ((T)1 - t.lx) * (v3 - v1) + t.lx * (v4 - v2);
  *grad_x = ((T)1 - t.ly) * (v2 - v1) + t.ly * (v4 - v3);
}

// ---- input checks (host only), shared by the CPU and CUDA entry points ----

// The shapes of one call, with the groups inferred as torchvision infers them.
struct DeformConv2dShape {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_h, out_w;
  int64_t groups, offset_groups;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// (size + 2 * pad - (dilation * (kernel - 1) + 1)) / stride + 1 in checked arithmetic: a padding or dilation near
// 2^63 is refused here instead of overflowing (and every sampling position the kernels compute later lies within
// [-pad, size + pad], so it cannot overflow either).
inline int64_t deform_conv2d_output_size(int64_t size, int64_t pad, int64_t dilation, int64_t kernel, int64_t stride,
                                         const char* axis) {
  int64_t padded = 0, span = 0, out = 0;
  const bool overflow = __builtin_mul_overflow(pad, int64_t(2), &padded) ||
                        __builtin_add_overflow(padded, size, &padded) ||
                        __builtin_mul_overflow(dilation, kernel - 1, &span) ||
                        __builtin_add_overflow(span, int64_t(1), &span) || __builtin_sub_overflow(padded, span, &out);
  TORCH_CHECK(!overflow, "deform_conv2d: padding ", pad, " and dilation ", dilation, " along the ", axis,
              " overflow int64 in the output size");
  return out / stride + 1;  // torchvision's formula, truncating division included
}

inline DeformConv2dShape check_deform_conv2d_inputs(const at::Tensor& input, const at::Tensor& offset,
                                                    const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                                                    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_dim(input, 4, "deform_conv2d: input", "[N, C_in, H, W]");
  check_dim(offset, 4, "deform_conv2d: offset", "[N, 2 * offset_groups * kh * kw, H_out, W_out]");
  check_dim(weight, 4, "deform_conv2d: weight", "[C_out, C_in / groups, kh, kw]");
  check_floating(input, "deform_conv2d: input");
  check_same_dtype(input, "input", offset, "offset");
  check_same_dtype(input, "input", weight, "weight");
  check_same_device(input, "input", offset, "offset");
  check_same_device(input, "input", weight, "weight");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "deform_conv2d: stride, padding and dilation must have 2 values each, got ", stride, ", ", padding,
              ", ", dilation);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "deform_conv2d: stride must be >= 1, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "deform_conv2d: padding must be >= 0, got ", padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, "deform_conv2d: dilation must be >= 1, got ", dilation);
  DeformConv2dShape s;
  s.batch = input.size(0);
  s.in_channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.out_channels = weight.size(0);
  s.kernel_h = weight.size(2);
  s.kernel_w = weight.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dilation_h = dilation[0];
  s.dilation_w = dilation[1];
  const int64_t per_group = weight.size(1);
  TORCH_CHECK(s.in_channels > 0, "deform_conv2d: input must have at least one channel, got input ", input.sizes());
  TORCH_CHECK(per_group > 0 && s.kernel_h > 0 && s.kernel_w > 0 && s.in_channels % per_group == 0,
              "deform_conv2d: input channels (", s.in_channels,
              ") must be divisible by weight.shape[1] (input channels per group); got input ", input.sizes(),
              ", weight ", weight.sizes());
  s.groups = s.in_channels / per_group;
  TORCH_CHECK(s.out_channels % s.groups == 0, "deform_conv2d: output channels (weight.shape[0] = ", s.out_channels,
              ") must be divisible by the ", s.groups, " weight groups; got weight ", weight.sizes());
  const int64_t taps = s.kernel_h * s.kernel_w;
  TORCH_CHECK(offset.size(1) > 0 && offset.size(1) % (2 * taps) == 0,
              "deform_conv2d: offset must have 2 * offset_groups * kh * kw = a positive multiple of ", 2 * taps,
              " channels for a ", s.kernel_h, "x", s.kernel_w, " kernel, got offset ", offset.sizes());
  s.offset_groups = offset.size(1) / (2 * taps);
  TORCH_CHECK(s.in_channels % s.offset_groups == 0, "deform_conv2d: input channels (", s.in_channels,
              ") must be divisible by the ", s.offset_groups, " offset groups that offset ", offset.sizes(),
              " implies");
  s.out_h = deform_conv2d_output_size(s.height, s.pad_h, s.dilation_h, s.kernel_h, s.stride_h, "height");
  s.out_w = deform_conv2d_output_size(s.width, s.pad_w, s.dilation_w, s.kernel_w, s.stride_w, "width");
  TORCH_CHECK(s.out_h > 0 && s.out_w > 0, "deform_conv2d: the output would be empty (", s.out_h, "x", s.out_w,
              ") for input ", input.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK(offset.size(0) == s.batch && offset.size(2) == s.out_h && offset.size(3) == s.out_w,
              "deform_conv2d: offset must have shape [", s.batch, ", ", offset.size(1), ", ", s.out_h, ", ", s.out_w,
              "] (batch, 2 * offset_groups * kh * kw, output height, output width), got ", offset.sizes());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_same_dtype(input, "input", m, "mask");
    check_same_device(input, "input", m, "mask");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == s.batch && m.size(1) == s.offset_groups * taps &&
                    m.size(2) == s.out_h && m.size(3) == s.out_w,
                "deform_conv2d: mask must have shape [", s.batch, ", ", s.offset_groups * taps, ", ", s.out_h, ", ",
                s.out_w, "] (batch, offset_groups * kh * kw, output height, output width), got ", m.sizes());
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_same_dtype(input, "input", b, "bias");
    check_same_device(input, "input", b, "bias");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == s.out_channels, "deform_conv2d: bias must have shape [",
                s.out_channels, "], got ", b.sizes());
  }
  return s;
}

inline void check_deform_conv2d_grad(const at::Tensor& grad, const DeformConv2dShape& s, const at::Tensor& input) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == s.batch && grad.size(1) == s.out_channels &&
                  grad.size(2) == s.out_h && grad.size(3) == s.out_w,
              "_deform_conv2d_backward: grad must have shape [", s.batch, ", ", s.out_channels, ", ", s.out_h, ", ",
              s.out_w, "], got ", grad.sizes());
  check_same_dtype(input, "input", grad, "grad");
  check_same_device(input, "input", grad, "grad");
}

}  // namespace eyecool
