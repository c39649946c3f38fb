// RPN-FCN fusion (RFF) math shared by the CPU and CUDA kernels: the softmax-sum of the thing classes, its
// gradient, the adaptive average pooling bins, and the gate applied to the RPN logits.
//
//   fg(p)     = sum_{c >= S} softmax_c(x(p))                       (no softmax stored)
//   fg_l      = adaptive_avg_pool2d(fg, (H_l, W_l))
//   out_l     = gate(r_l) * fg_l,     gate(r) = r ("logit") or sigmoid(r) ("prob")
//   d fg / d x_c = softmax_c * ([c >= S] - fg)
// The forward keeps each pixel's softmax statistics (max, total = sum of exp(x - max), fg) as a second output,
// 3 values per pixel instead of the softmax's S + K, so that the backward needs one sweep over the logits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

#include <ATen/OpMathType.h>

#include "common.h"

namespace eyecool {

#ifndef __CUDA_ARCH__
using std::exp;
#endif

// exp(x) for the x <= 0 of the softmax (x - max). On the GPU it is the CUDA library's exp. On the host, float
// uses a branch-free polynomial, because the library's expf is a call that the compiler cannot vectorise without
// -ffast-math and the softmax loops are bound by it: range reduction by ln 2 as in Cephes' expf, then
// 1 + r + r^2 q(r) with q of degree 4 fitted for near-minimax relative error on [-ln2/2, ln2/2] (one multiply-add
// less than Cephes' degree 5). Checked on every float in [-87.3, 0]: relative error below 9e-8, with or without
// FMA contraction. Inputs below -87.3 (where expf turns denormal), -inf included, return 0; NaN stays NaN.
// Positive inputs are outside the contract (no clamp: its compare and blend would cost every call).
EYECOOL_HD_ALWAYS_INLINE float exp_nonpositive(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  const bool underflow = x < -87.33654f;
  x = underflow ? -87.33654f : x;
  // Round x / ln 2 to the nearest integer n with the 1.5 * 2^23 trick (n ends up in the low mantissa bits).
  const float shifter = 12582912.f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.3814610429e-3f;
  p = p * r + 8.3687100559e-3f;
  p = p * r + 4.1668388993e-2f;
  p = p * r + 1.6666521132e-1f;
  p = p * r + 4.9999994040e-1f;
  p = p * (r * r) + r + 1.f;
  int32_t t_bits, shifter_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  std::memcpy(&shifter_bits, &shifter, sizeof(shifter_bits));
  const int32_t scale_bits = (t_bits - shifter_bits + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return underflow ? 0.f : p * scale;
#endif
}

EYECOOL_HD double exp_nonpositive(double x) { return exp(x); }

// Softmax statistics of one pixel in one pass over the channels (online softmax), folded in groups of G channels:
// the group's max first, then one exp per channel against the new running max, and one more exp to rescale the
// sums so far (by 1 when the max stayed). G + 1 exps per G channels, but the G exps of a group depend only on the
// group's max, not on each other, so many are in flight at once; the per-channel version (a rescale decided at
// every channel) was 25% slower on the CPU. The kernels read each logit once. The result is the softmax's max
// (exactly) and its sums up to the rounding of one rescale per group.
// Special values come out as in torch.softmax without a special case: a NaN logit makes its term NaN, a +inf max
// makes the term of its own channel exp(inf - inf) = NaN. An all -inf group is skipped (its terms are exp(-inf)
// = 0 against a reference of 0 instead of the max, where -inf - -inf would be NaN), so -inf logits are fine as
// long as some channel of the pixel is finite; for an all -inf pixel total is 0 and fg is 0 / 0 = NaN.
template <typename T>
struct ThingSoftmaxSum {
  T max, total, things;
};

template <typename T>
EYECOOL_HD ThingSoftmaxSum<T> thing_softmax_empty() {
  return {-std::numeric_limits<T>::infinity(), T(0), T(0)};
}

// Max of logit(Begin) .. logit(Begin + Count - 1), pairwise (a chain of log2(Count) steps, not Count).
template <int Begin, int Count, typename T, typename Logit>
EYECOOL_HD_ALWAYS_INLINE T group_max(Logit& logit) {
  if constexpr (Count == 1) {
    return logit(Begin);
  } else {
    const T a = group_max<Begin, Count / 2, T>(logit), b = group_max<Begin + Count / 2, Count - Count / 2, T>(logit);
    return b > a ? b : a;
  }
}

// Sums of exp(logit(k) - reference) over k in [Begin, Begin + Count), all and over the thing channels
// (k >= first_thing), pairwise.
template <int Begin, int Count, typename T, typename Logit>
EYECOOL_HD_ALWAYS_INLINE void group_sums(Logit& logit, T reference, int first_thing, T& total, T& things) {
  if constexpr (Count == 1) {
    total = exp_nonpositive(logit(Begin) - reference);
    things = Begin >= first_thing ? total : T(0);
  } else {
    T total_b, things_b;
    group_sums<Begin, Count / 2, T>(logit, reference, first_thing, total, things);
    group_sums<Begin + Count / 2, Count - Count / 2, T>(logit, reference, first_thing, total_b, things_b);
    total += total_b;
    things += things_b;
  }
}

// Folds the G logits of channels c .. c + G - 1 into s: logit(k) returns channel c + k's logit (k < G), and the
// channels k >= first_thing are thing channels (first_thing in [0, G]; pass a constant where it is one, so that
// the compiler drops the selects).
template <int G, typename T, typename Logit>
EYECOOL_HD_ALWAYS_INLINE void thing_softmax_fold(ThingSoftmaxSum<T>& s, Logit logit, int first_thing) {
  const T top = group_max<0, G, T>(logit);
  const T new_max = top > s.max ? top : s.max;
  const T reference = new_max == -std::numeric_limits<T>::infinity() ? T(0) : new_max;
  T total, things;
  group_sums<0, G, T>(logit, reference, first_thing, total, things);
  const T rescale = exp_nonpositive(s.max - reference);  // 1 when the max stayed, 0 for the first group
  s.total = s.total * rescale + total;
  s.things = s.things * rescale + things;
  s.max = new_max;
}

template <typename T>
EYECOOL_HD_ALWAYS_INLINE T thing_softmax_fg(const ThingSoftmaxSum<T>& s) {
  return s.things / s.total;
}

// exp(x - max), the unnormalised softmax term of a channel (the backward's, with the forward's max).
template <typename T>
EYECOOL_HD_ALWAYS_INLINE T softmax_term(T x, T max) {
  return exp_nonpositive(x - max);
}

// d loss / d x_c = exp(x_c - max) * coefficient, with the pixel's coefficient for its thing channels or its stuff
// channels: grad_fg * ([c >= S] - fg) / total (grad_fg = d loss / d fg at the pixel). With the forward's max and
// total at hand, the backward is one exp and one multiply per logit.
template <typename T>
EYECOOL_HD T thing_softmax_grad_coefficient(T total, T fg, T grad_fg, bool is_thing) {
  return grad_fg * ((is_thing ? T(1) : T(0)) - fg) / total;
}

template <typename T>
EYECOOL_HD_ALWAYS_INLINE T thing_softmax_grad(T x, T max, T coefficient) {
  return softmax_term(x, max) * coefficient;
}

// Adaptive average pooling bins (PyTorch's): output cell i of `out` cells over `in` inputs covers
// [floor(i * in / out), ceil((i + 1) * in / out)). Bins overlap when out does not divide in.
EYECOOL_HD int64_t adaptive_bin_start(int64_t i, int64_t in, int64_t out) { return (i * in) / out; }

EYECOOL_HD int64_t adaptive_bin_end(int64_t i, int64_t in, int64_t out) { return ((i + 1) * in + out - 1) / out; }

// The output cells whose bins contain input index p: [first, stop).
//   end_i > p   <=>  i >= floor(p * out / in);     start_i <= p  <=>  i < ceil((p + 1) * out / in).
EYECOOL_HD int64_t adaptive_first_bin(int64_t p, int64_t in, int64_t out) { return (p * out) / in; }

EYECOOL_HD int64_t adaptive_stop_bin(int64_t p, int64_t in, int64_t out) { return ((p + 1) * out + in - 1) / in; }

// Mean of `map` ([height, width], row-major) over output cell (i, j) of an out_h x out_w adaptive pooling.
template <typename T>
EYECOOL_HD T adaptive_bin_mean(const T* map, int64_t height, int64_t width, int64_t i, int64_t j, int64_t out_h,
                               int64_t out_w) {
  const int64_t y0 = adaptive_bin_start(i, height, out_h), y1 = adaptive_bin_end(i, height, out_h);
  const int64_t x0 = adaptive_bin_start(j, width, out_w), x1 = adaptive_bin_end(j, width, out_w);
  T sum = T(0);
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = x0; x < x1; ++x) sum += map[y * width + x];
  }
  return sum / static_cast<T>((y1 - y0) * (x1 - x0));
}

// Number of inputs in output cell i's bin along one axis.
EYECOOL_HD int64_t adaptive_bin_size(int64_t i, int64_t in, int64_t out) {
  return adaptive_bin_end(i, in, out) - adaptive_bin_start(i, in, out);
}

// gate(r) and d gate / d r: the paper multiplies the logit itself; "prob" gates the objectness probability. The
// sigmoid takes exp of -|r| only (no overflow, and the exp above, which vectorises on the host).
template <typename T>
EYECOOL_HD_ALWAYS_INLINE T fusion_gate(T r, bool prob_mode) {
  if (!prob_mode) return r;
  const T e = exp_nonpositive(r < T(0) ? r : -r);  // exp(-|r|); NaN stays NaN
  return (r < T(0) ? e : T(1)) / (T(1) + e);
}

// d gate / d r from the gate's value g = gate(r).
template <typename T>
EYECOOL_HD_ALWAYS_INLINE T fusion_gate_grad(T gate, bool prob_mode) {
  return prob_mode ? gate * (T(1) - gate) : T(1);
}

// ---- input checks (host only), shared by the CPU and CUDA entry points ----

inline bool fg_fusion_prob_mode(std::string_view mode) {
  TORCH_CHECK(mode == "logit" || mode == "prob", "fg_fusion: mode must be \"logit\" or \"prob\", got \"",
              std::string(mode), "\"");
  return mode == "prob";
}

inline void check_fg_fusion_inputs(const at::Tensor& sem_logits, at::TensorList rpn_logits, int64_t num_stuff,
                                   const char* op) {
  check_dim(sem_logits, 4, "sem_logits", "[N, S + K, H, W]");
  check_floating(sem_logits, "sem_logits");
  TORCH_CHECK(num_stuff >= 0 && num_stuff < sem_logits.size(1), op, ": num_stuff must be in [0, ",
              sem_logits.size(1), ") (the channels of sem_logits), got ", num_stuff);
  TORCH_CHECK(!rpn_logits.empty(), op, ": rpn_logits must hold at least one level");
  for (size_t l = 0; l < rpn_logits.size(); ++l) {
    const at::Tensor& r = rpn_logits[l];
    TORCH_CHECK(r.dim() == 4 && r.size(0) == sem_logits.size(0), op, ": rpn_logits[", l,
                "] must be [N, A, H_l, W_l] with the batch size of sem_logits (", sem_logits.size(0), "), got ",
                r.sizes());
    check_same_dtype(sem_logits, "sem_logits", r, "rpn_logits[l]");
    check_same_device(sem_logits, "sem_logits", r, "rpn_logits[l]");
  }
}

inline void check_fg_fusion_grads(at::TensorList grads, at::TensorList rpn_logits) {
  TORCH_CHECK(grads.size() == rpn_logits.size(), "_fg_fusion_backward: got ", grads.size(), " gradients for ",
              rpn_logits.size(), " levels");
  for (size_t l = 0; l < grads.size(); ++l) {
    TORCH_CHECK(grads[l].sizes() == rpn_logits[l].sizes(), "_fg_fusion_backward: grads[", l, "] must have shape ",
                rpn_logits[l].sizes(), ", got ", grads[l].sizes());
    check_same_dtype(grads[l], "grads[l]", rpn_logits[l], "rpn_logits[l]");
    check_same_device(grads[l], "grads[l]", rpn_logits[l], "rpn_logits[l]");
  }
}

// softmax_stats: [3, N, H, W] in the logits' op-math type (float for half and bfloat16): max, total, fg.
inline void check_fg_fusion_stats(const at::Tensor& stats, const at::Tensor& sem_logits) {
  const auto expected_dtype = at::toOpMathType(sem_logits.scalar_type());
  TORCH_CHECK(stats.dim() == 4 && stats.size(0) == 3 && stats.size(1) == sem_logits.size(0) &&
                  stats.size(2) == sem_logits.size(2) && stats.size(3) == sem_logits.size(3),
              "_fg_fusion_backward: softmax_stats must be [3, N, H, W] = [3, ", sem_logits.size(0), ", ",
              sem_logits.size(2), ", ", sem_logits.size(3), "] (the forward's second output), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == expected_dtype, "_fg_fusion_backward: softmax_stats must be ", expected_dtype,
              " for ", sem_logits.scalar_type(), " logits, got ", stats.scalar_type());
  check_same_device(stats, "softmax_stats", sem_logits, "sem_logits");
}

}  // namespace eyecool
