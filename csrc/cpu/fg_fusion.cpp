// RPN-FCN fusion on the CPU.
//
// Both passes work on a band of image rows at a time (channels x ~1024 pixels, a few hundred KB that stay in
// cache), parallel over bands, with the pixel loop innermost (contiguous, vectorised) and the softmax in two sweeps over
// the row's channels: the max, then the sums of exp(x - max).
// Forward: only the one-channel foreground map is written; the levels are then pooled from that map.
// Backward: d loss / d pooled cell does not depend on fg, so it is computed first; then one sweep per band
// recomputes the statistics (keeping each channel's exp term in a row buffer, so the gradient needs no second
// exp), gathers d loss / d fg from every level's bins and writes the logits' gradient; the RPN logits' gradient
// comes last, from the fg map that sweep wrote.
// Every output element is owned by one thread, so results do not depend on the thread count. The row loops are
// compiled twice, for AVX2+FMA and for the baseline ISA, and chosen at run time (8 lanes instead of 4).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

// The softmax loops vectorise only when the compiler may evaluate both sides of a floating-point select, i.e.
// without trapping math (PyTorch never enables floating-point traps), so this file and the shared math it
// inlines are compiled that way.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "fg_fusion.h"

#include "cpu/cpu_features.h"

#if EYECOOL_X86
#define EYECOOL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define EYECOOL_TARGET_AVX2
#endif

namespace eyecool {
namespace {

// Softmax statistics of one row of pixels (base points at channel 0 of the row; channels are `plane` apart):
// channel loop outside, pixel loop inside; writes the row's max, total and fg, and leaves each channel's
// exp(x - max) in `terms` (channels x width, contiguous) for the gradient. The first sweep copies the row into
// `terms`: the channel rows of the input lie a plane apart, a stride that maps them all to the same cache sets,
// so the second sweep would otherwise read them from memory again.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void row_statistics_body(const scalar_t* base, int64_t plane, int64_t channels,
                                                               int64_t num_stuff, int64_t width, acc_t* row_max,
                                                               acc_t* row_total, acc_t* fg, acc_t* terms) {
  for (int64_t x = 0; x < width; ++x) row_max[x] = terms[x] = static_cast<acc_t>(base[x]);
  for (int64_t c = 1; c < channels; ++c) {
    const scalar_t* channel_row = base + c * plane;
    acc_t* channel_terms = terms + c * width;
#pragma omp simd
    for (int64_t x = 0; x < width; ++x) {
      const acc_t v = static_cast<acc_t>(channel_row[x]);
      channel_terms[x] = v;
      row_max[x] = softmax_max_update<acc_t>(row_max[x], v);
    }
  }
  for (int64_t x = 0; x < width; ++x) row_total[x] = fg[x] = acc_t(0);  // fg: the running thing sum until the end
  for (int64_t c = 0; c < channels; ++c) {
    const bool is_thing = c >= num_stuff;
    acc_t* channel_terms = terms + c * width;
#pragma omp simd
    for (int64_t x = 0; x < width; ++x) {
      ThingSoftmaxSum<acc_t> s{row_max[x], row_total[x], fg[x]};
      const acc_t term = softmax_term<acc_t>(channel_terms[x], s.max);
      thing_softmax_accumulate<acc_t>(s, term, is_thing);
      row_total[x] = s.total;
      fg[x] = s.things;
      channel_terms[x] = term;
    }
  }
  for (int64_t x = 0; x < width; ++x) {
    fg[x] = thing_softmax_fg(ThingSoftmaxSum<acc_t>{row_max[x], row_total[x], fg[x]});
  }
}

// d loss / d logits of one row of pixels, from the row's exp terms, statistics and d loss / d fg.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void row_gradient_body(const acc_t* terms, scalar_t* grad_base, int64_t plane,
                                                             int64_t channels, int64_t num_stuff, int64_t width,
                                                             const acc_t* total, const acc_t* fg,
                                                             const acc_t* grad_fg) {
  for (int64_t c = 0; c < channels; ++c) {
    const bool is_thing = c >= num_stuff;
    const acc_t* src = terms + c * width;
    scalar_t* dst = grad_base + c * plane;
#pragma omp simd
    for (int64_t x = 0; x < width; ++x) {
      dst[x] = static_cast<scalar_t>(
          thing_softmax_grad_from_term<acc_t>(src[x], total[x], fg[x], grad_fg[x], is_thing));
    }
  }
}

template <typename scalar_t, typename acc_t>
EYECOOL_TARGET_AVX2 void row_statistics_avx2(const scalar_t* base, int64_t plane, int64_t channels, int64_t num_stuff,
                                             int64_t width, acc_t* row_max, acc_t* row_total, acc_t* fg,
                                             acc_t* terms) {
  row_statistics_body<scalar_t, acc_t>(base, plane, channels, num_stuff, width, row_max, row_total, fg, terms);
}

template <typename scalar_t, typename acc_t>
void row_statistics_baseline(const scalar_t* base, int64_t plane, int64_t channels, int64_t num_stuff, int64_t width,
                             acc_t* row_max, acc_t* row_total, acc_t* fg, acc_t* terms) {
  row_statistics_body<scalar_t, acc_t>(base, plane, channels, num_stuff, width, row_max, row_total, fg, terms);
}

template <typename scalar_t, typename acc_t>
void row_statistics(bool avx2, const scalar_t* base, int64_t plane, int64_t channels, int64_t num_stuff,
                    int64_t width, acc_t* row_max, acc_t* row_total, acc_t* fg, acc_t* terms) {
  if (avx2) {
    row_statistics_avx2<scalar_t, acc_t>(base, plane, channels, num_stuff, width, row_max, row_total, fg, terms);
  } else {
    row_statistics_baseline<scalar_t, acc_t>(base, plane, channels, num_stuff, width, row_max, row_total, fg, terms);
  }
}

template <typename scalar_t, typename acc_t>
EYECOOL_TARGET_AVX2 void row_gradient_avx2(const acc_t* terms, scalar_t* grad_base, int64_t plane, int64_t channels,
                                           int64_t num_stuff, int64_t width, const acc_t* total, const acc_t* fg,
                                           const acc_t* grad_fg) {
  row_gradient_body<scalar_t, acc_t>(terms, grad_base, plane, channels, num_stuff, width, total, fg, grad_fg);
}

template <typename scalar_t, typename acc_t>
void row_gradient_baseline(const acc_t* terms, scalar_t* grad_base, int64_t plane, int64_t channels,
                           int64_t num_stuff, int64_t width, const acc_t* total, const acc_t* fg,
                           const acc_t* grad_fg) {
  row_gradient_body<scalar_t, acc_t>(terms, grad_base, plane, channels, num_stuff, width, total, fg, grad_fg);
}

template <typename scalar_t, typename acc_t>
void row_gradient(bool avx2, const acc_t* terms, scalar_t* grad_base, int64_t plane, int64_t channels,
                  int64_t num_stuff, int64_t width, const acc_t* total, const acc_t* fg, const acc_t* grad_fg) {
  if (avx2) {
    row_gradient_avx2<scalar_t, acc_t>(terms, grad_base, plane, channels, num_stuff, width, total, fg, grad_fg);
  } else {
    row_gradient_baseline<scalar_t, acc_t>(terms, grad_base, plane, channels, num_stuff, width, total, fg, grad_fg);
  }
}

// The kernels sweep bands of whole rows, which are contiguous runs of pixels in every channel plane: about 1024
// pixels, so that each channel contributes a few KB of consecutive memory (the prefetchers follow that; with one
// 128-pixel row per channel they would not) and the band's terms still fit in the L2 cache.
int64_t band_rows(int64_t height, int64_t width) {
  return std::max<int64_t>(1, std::min<int64_t>(height, 1024 / std::max<int64_t>(width, 1)));
}

// The foreground map [N, H, W] (acc_t) of every image.
template <typename scalar_t, typename acc_t>
at::Tensor foreground_map(const at::Tensor& sem, int64_t num_stuff) {
  const int64_t batch = sem.size(0), channels = sem.size(1), height = sem.size(2), width = sem.size(3);
  at::Tensor fg_map = at::empty({batch, height, width}, sem.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* in = sem.data_ptr<scalar_t>();
  acc_t* fg = fg_map.data_ptr<acc_t>();
  const int64_t plane = height * width;
  const bool avx2 = cpu_has_avx2();
  const int64_t rows_per_band = band_rows(height, width), bands = (height + rows_per_band - 1) / rows_per_band;
  at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
    const int64_t band_pixels = rows_per_band * width;
    std::vector<acc_t> row_max(band_pixels), row_total(band_pixels), terms(channels * band_pixels);
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n = nb / bands, y = (nb % bands) * rows_per_band;
      const int64_t pixels = (std::min(height, y + rows_per_band) - y) * width;
      row_statistics<scalar_t, acc_t>(avx2, in + n * channels * plane + y * width, plane, channels, num_stuff,
                                      pixels, row_max.data(), row_total.data(), fg + n * plane + y * width,
                                      terms.data());
    }
  });
  return fg_map;
}

// The rows of every level's output grid, numbered across levels, so that one parallel region covers all levels
// (each region costs a barrier, and the small levels would not fill the threads on their own).
struct LevelRows {
  std::vector<int64_t> first_row;  // per level: its first global row; then the total
  int64_t batch;

  LevelRows(at::TensorList levels, int64_t batch) : batch(batch) {
    int64_t rows = 0;
    for (const auto& level : levels) {
      first_row.push_back(rows);
      rows += batch * level.size(2);
    }
    first_row.push_back(rows);
  }
  int64_t total() const { return first_row.back(); }
  // global row -> (level, image, row in the level)
  std::tuple<size_t, int64_t, int64_t> locate(int64_t row, at::TensorList levels) const {
    size_t l = 0;
    while (row >= first_row[l + 1]) ++l;
    const int64_t local = row - first_row[l], out_h = levels[l].size(2);
    return {l, local / out_h, local % out_h};
  }
};

std::vector<at::Tensor> fg_fusion_forward_cpu(const at::Tensor& sem_logits, at::TensorList rpn_logits,
                                              int64_t num_stuff, c10::string_view mode) {
  check_fg_fusion_inputs(sem_logits, rpn_logits, num_stuff, "fg_fusion");
  const bool prob_mode = fg_fusion_prob_mode(mode);
  std::vector<at::Tensor> outputs;
  for (const auto& r : rpn_logits) outputs.push_back(at::empty(r.sizes(), r.options()));
  if (sem_logits.numel() == 0) {
    for (auto& o : outputs) o.zero_();
    return outputs;
  }
  const at::Tensor sem = sem_logits.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sem.scalar_type(), "fg_fusion_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor fg_map = foreground_map<scalar_t, acc_t>(sem, num_stuff);
    std::vector<at::Tensor> levels;
    for (const auto& r : rpn_logits) levels.push_back(r.contiguous());
    const LevelRows rows(levels, sem.size(0));
    const int64_t height = sem.size(2), width = sem.size(3);
    const acc_t* fg = fg_map.data_ptr<acc_t>();
    at::parallel_for(0, rows.total(), 8, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const auto [l, n, i] = rows.locate(row, levels);
        const int64_t anchors = levels[l].size(1), out_h = levels[l].size(2), out_w = levels[l].size(3);
        const scalar_t* src = levels[l].data_ptr<scalar_t>();
        scalar_t* dst = outputs[l].data_ptr<scalar_t>();
        for (int64_t j = 0; j < out_w; ++j) {
          const acc_t fg_cell = adaptive_bin_mean(fg + n * height * width, height, width, i, j, out_h, out_w);
          for (int64_t a = 0; a < anchors; ++a) {
            const int64_t idx = ((n * anchors + a) * out_h + i) * out_w + j;
            dst[idx] = static_cast<scalar_t>(fusion_gate<acc_t>(static_cast<acc_t>(src[idx]), prob_mode) * fg_cell);
          }
        }
      }
    });
  });
  return outputs;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fg_fusion_backward_cpu(at::TensorList grads,
                                                                       const at::Tensor& sem_logits,
                                                                       at::TensorList rpn_logits, int64_t num_stuff,
                                                                       c10::string_view mode) {
  check_fg_fusion_inputs(sem_logits, rpn_logits, num_stuff, "_fg_fusion_backward");
  check_fg_fusion_grads(grads, rpn_logits);
  const bool prob_mode = fg_fusion_prob_mode(mode);
  const int64_t batch = sem_logits.size(0), channels = sem_logits.size(1), height = sem_logits.size(2),
                width = sem_logits.size(3);
  at::Tensor grad_sem = at::empty({batch, channels, height, width}, sem_logits.options());
  std::vector<at::Tensor> grad_rpn;
  for (const auto& r : rpn_logits) grad_rpn.push_back(at::empty(r.sizes(), r.options()));
  if (sem_logits.numel() == 0) {
    grad_sem.zero_();
    for (auto& g : grad_rpn) g.zero_();
    return {grad_sem, grad_rpn};
  }
  const at::Tensor sem = sem_logits.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sem.scalar_type(), "fg_fusion_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t plane = height * width;
    const auto acc_options = sem.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    // Per level: the gradient of each pooled cell, already divided by its bin area, [N, H_l, W_l].
    std::vector<at::Tensor> levels, level_grads, grad_cells;
    std::vector<int64_t> level_h, level_w;
    for (size_t l = 0; l < rpn_logits.size(); ++l) {
      levels.push_back(rpn_logits[l].contiguous());
      level_grads.push_back(grads[l].contiguous());
      level_h.push_back(levels[l].size(2));
      level_w.push_back(levels[l].size(3));
      grad_cells.push_back(at::empty({batch, level_h[l], level_w[l]}, acc_options));
    }
    const LevelRows rows(levels, batch);
    at::parallel_for(0, rows.total(), 8, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const auto [l, n, i] = rows.locate(row, levels);
        const int64_t anchors = levels[l].size(1), out_h = level_h[l], out_w = level_w[l];
        const scalar_t* r_ptr = levels[l].data_ptr<scalar_t>();
        const scalar_t* go_ptr = level_grads[l].data_ptr<scalar_t>();
        acc_t* gc_ptr = grad_cells[l].data_ptr<acc_t>() + (n * out_h + i) * out_w;
        for (int64_t j = 0; j < out_w; ++j) {
          acc_t grad_fg = 0;
          for (int64_t a = 0; a < anchors; ++a) {
            const int64_t idx = ((n * anchors + a) * out_h + i) * out_w + j;
            grad_fg += static_cast<acc_t>(go_ptr[idx]) * fusion_gate<acc_t>(static_cast<acc_t>(r_ptr[idx]), prob_mode);
          }
          gc_ptr[j] = grad_fg / static_cast<acc_t>(adaptive_bin_size(i, height, out_h) *
                                                   adaptive_bin_size(j, width, out_w));
        }
      }
    });
    const at::Tensor fg_map = at::empty({batch, height, width}, acc_options);
    acc_t* fg = fg_map.data_ptr<acc_t>();
    const scalar_t* in = sem.data_ptr<scalar_t>();
    scalar_t* out = grad_sem.data_ptr<scalar_t>();
    const bool avx2 = cpu_has_avx2();
    // Per level, the cells [first, stop) whose bins hold each pixel column: the same for every row, and the
    // integer divisions they take would otherwise dominate the gather.
    std::vector<std::vector<int64_t>> column_first(levels.size()), column_stop(levels.size());
    for (size_t l = 0; l < levels.size(); ++l) {
      for (int64_t x = 0; x < width; ++x) {
        column_first[l].push_back(adaptive_first_bin(x, width, level_w[l]));
        column_stop[l].push_back(adaptive_stop_bin(x, width, level_w[l]));
      }
    }
    const int64_t rows_per_band = band_rows(height, width), bands = (height + rows_per_band - 1) / rows_per_band;
    at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
      const int64_t band_pixels = rows_per_band * width;
      std::vector<acc_t> grad_fg(band_pixels), row_max(band_pixels), row_total(band_pixels),
          terms(channels * band_pixels);
      for (int64_t nb = begin; nb < end; ++nb) {
        const int64_t n = nb / bands, y_begin = (nb % bands) * rows_per_band;
        const int64_t y_end = std::min(height, y_begin + rows_per_band), pixels = (y_end - y_begin) * width;
        // d loss / d fg at each pixel of the band: the sum over levels of the cells whose bins hold the pixel.
        std::fill(grad_fg.begin(), grad_fg.end(), acc_t(0));
        for (int64_t y = y_begin; y < y_end; ++y) {
          acc_t* row_grad_fg = grad_fg.data() + (y - y_begin) * width;
          for (size_t l = 0; l < grad_cells.size(); ++l) {
            const int64_t out_h = level_h[l], out_w = level_w[l];
            const acc_t* gc = grad_cells[l].data_ptr<acc_t>() + n * out_h * out_w;
            const int64_t i0 = adaptive_first_bin(y, height, out_h), i1 = adaptive_stop_bin(y, height, out_h);
            const int64_t* first = column_first[l].data();
            const int64_t* stop = column_stop[l].data();
            for (int64_t x = 0; x < width; ++x) {
              const int64_t j0 = first[x], j1 = stop[x];
              acc_t sum = 0;
              for (int64_t i = i0; i < i1; ++i) {
                for (int64_t j = j0; j < j1; ++j) sum += gc[i * out_w + j];
              }
              row_grad_fg[x] += sum;
            }
          }
        }
        acc_t* band_fg = fg + n * plane + y_begin * width;
        row_statistics<scalar_t, acc_t>(avx2, in + n * channels * plane + y_begin * width, plane, channels,
                                        num_stuff, pixels, row_max.data(), row_total.data(), band_fg, terms.data());
        scalar_t* dst = out + n * channels * plane + y_begin * width;
        row_gradient<scalar_t, acc_t>(avx2, terms.data(), dst, plane, channels, num_stuff, pixels, row_total.data(),
                                      band_fg, grad_fg.data());
      }
    });
    // The RPN logits' gradient: d out / d r = gate'(r) * fg_cell.
    at::parallel_for(0, rows.total(), 8, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const auto [l, n, i] = rows.locate(row, levels);
        const int64_t anchors = levels[l].size(1), out_h = level_h[l], out_w = level_w[l];
        const scalar_t* r_ptr = levels[l].data_ptr<scalar_t>();
        const scalar_t* go_ptr = level_grads[l].data_ptr<scalar_t>();
        scalar_t* gr_ptr = grad_rpn[l].data_ptr<scalar_t>();
        for (int64_t j = 0; j < out_w; ++j) {
          const acc_t fg_cell = adaptive_bin_mean(fg + n * plane, height, width, i, j, out_h, out_w);
          for (int64_t a = 0; a < anchors; ++a) {
            const int64_t idx = ((n * anchors + a) * out_h + i) * out_w + j;
            const acc_t rv = static_cast<acc_t>(r_ptr[idx]);
            gr_ptr[idx] = static_cast<scalar_t>(static_cast<acc_t>(go_ptr[idx]) * fg_cell *
                                                fusion_gate_grad<acc_t>(rv, prob_mode));
          }
        }
      }
    });
  });
  return {grad_sem, grad_rpn};
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) {
  m.impl("fg_fusion", &eyecool::fg_fusion_forward_cpu);
  m.impl("_fg_fusion_backward", &eyecool::fg_fusion_backward_cpu);
}
