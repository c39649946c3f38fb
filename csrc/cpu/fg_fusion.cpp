// RPN-FCN fusion on the CPU.
//
// Both passes work on a band of image rows at a time (channels x ~1024 pixels), parallel over bands, with the
// pixel loop innermost (contiguous, vectorised) and the channel rows prefetched ahead of their turn.
// Forward: an online softmax in one sweep over the band's channels, eight channels at a time (fg_fusion.h's
// thing_softmax_fold), reading each logit once; only the per-pixel statistics are written (max, total, fg: the
// op's second output), and the levels are pooled from fg.
// Backward: one loop over the levels' cells computes the RPN logits' gradient (from the saved fg) and
// d loss / d pooled cell; then one sweep per band gathers d loss / d fg from every level's bins and writes the
// logits' gradient, exp(x - max) * coefficient, reading each logit once (no softmax statistics recomputed).
// Every output element is owned by one thread, so results do not depend on the thread count. The row loops are
// compiled three times, for AVX-512, for AVX2+FMA and for the baseline ISA, and chosen at run time (16, 8 or 4
// float lanes; the exp polynomial is what bounds them) by cpu_features.h's dispatch_cpu_isa.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
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
#include <emmintrin.h>
#endif

namespace eyecool {
namespace {

// Software prefetch: a band reads each channel's few KB, a plane apart, i.e. a new 4 KB page per channel, and
// the hardware prefetchers do not cross pages. When the logits are not in cache (in a training step the layers
// between forward and backward evict them), each row loop asks for the same pixels `kPrefetchChannels` channels
// ahead, one cache line per line of work: the backward of a cold 17 MB input went from 2.2 to 1.3 ms.
constexpr int64_t kPrefetchChannels = 1;
// The pixel loop runs over four cache lines between two batches of prefetches: with one line per batch the
// vectorised body ran once per batch and the compiler re-loaded its constants every 16 pixels.
constexpr int64_t kChunkLines = 4;
template <typename scalar_t>
constexpr int64_t kLineElements = 64 / static_cast<int64_t>(sizeof(scalar_t));

// body(x) for every pixel x of a band row, vectorised, calling prefetch(x0) once per cache line of scalar_t
// pixels starting at x0, kChunkLines lines at a time (the tail shorter than a chunk gets no prefetch).
template <typename scalar_t, typename Prefetch, typename Body>
EYECOOL_ALWAYS_INLINE inline void for_each_pixel_prefetching(int64_t pixels, Prefetch prefetch,
                                                             Body body) {
  constexpr int64_t line = kLineElements<scalar_t>;
  constexpr int64_t chunk = line * kChunkLines;
  const int64_t full_chunks = pixels - pixels % chunk;
  for (int64_t x0 = 0; x0 < full_chunks; x0 += chunk) {
    for (int64_t k = 0; k < kChunkLines; ++k) prefetch(x0 + k * line);
#pragma omp simd
    for (int64_t x = x0; x < x0 + chunk; ++x) body(x);
  }
#pragma omp simd
  for (int64_t x = full_chunks; x < pixels; ++x) body(x);
}

// Folds channels [c, c + G) of a band of pixels into the running statistics (max, total, things: rows of the
// op's output, a few KB, in L1), the pixel loop vectorised, prefetching the next group's rows (`ahead`).
// first_thing: the group's first thing channel, relative to c (a constant for the all-stuff and all-thing groups,
// so that the compiler drops the selects there).
template <int G, typename scalar_t, typename acc_t>
EYECOOL_ALWAYS_INLINE inline void fold_band_group(const scalar_t* group, const scalar_t* ahead,
                                                  int64_t plane, int first_thing, int64_t pixels,
                                                  acc_t* max, acc_t* total, acc_t* things) {
  auto fold = [&](int64_t x) EYECOOL_ALWAYS_INLINE {
    ThingSoftmaxSum<acc_t> s{max[x], total[x], things[x]};
    thing_softmax_fold<G, acc_t>(
        s, [&](int k) EYECOOL_ALWAYS_INLINE { return static_cast<acc_t>(group[k * plane + x]); },
        first_thing);
    max[x] = s.max;
    total[x] = s.total;
    things[x] = s.things;
  };
  auto prefetch = [&](int64_t x0) EYECOOL_ALWAYS_INLINE {
    for (int64_t k = 0; k < G; ++k) __builtin_prefetch(ahead + k * plane + x0);
  };
  for_each_pixel_prefetching<scalar_t>(pixels, prefetch, fold);
}

template <int G, typename scalar_t, typename acc_t>
EYECOOL_ALWAYS_INLINE inline void fold_band_group(const scalar_t* base, int64_t plane, int64_t channels,
                                                  int64_t num_stuff, int64_t c, int64_t pixels, acc_t* max,
                                                  acc_t* total, acc_t* things) {
  const scalar_t* group = base + c * plane;
  const scalar_t* ahead = base + std::min(c + G, channels - G) * plane;  // the next group's rows (or this one's)
  if (c >= num_stuff) {
    fold_band_group<G>(group, ahead, plane, 0, pixels, max, total, things);
  } else if (c + G <= num_stuff) {
    fold_band_group<G>(group, ahead, plane, G, pixels, max, total, things);
  } else {
    fold_band_group<G>(group, ahead, plane, static_cast<int>(num_stuff - c), pixels, max, total, things);
  }
}

// Softmax statistics of a band of pixels (base points at channel 0 of the band; channels are `plane` apart):
// groups of kGroupChannels channels, then the remaining channels in groups of 4, 2 and 1. Each logit is read once:
// the channel rows lie a plane apart, a stride that maps them all to the same cache sets, so a second sweep would
// read them from memory again (or need a staging copy, which costs as much).
constexpr int kGroupChannels = 8;

template <typename scalar_t, typename acc_t>
EYECOOL_ALWAYS_INLINE inline void band_statistics_body(const scalar_t* base, int64_t plane,
                                                       int64_t channels, int64_t num_stuff, int64_t pixels,
                                                       acc_t* max, acc_t* total, acc_t* fg) {
  const ThingSoftmaxSum<acc_t> empty = thing_softmax_empty<acc_t>();
  std::fill(max, max + pixels, empty.max);
  std::fill(total, total + pixels, empty.total);
  std::fill(fg, fg + pixels, empty.things);  // the running thing sum until the end
  int64_t c = 0;
  for (; c + kGroupChannels <= channels; c += kGroupChannels) {
    fold_band_group<kGroupChannels>(base, plane, channels, num_stuff, c, pixels, max, total, fg);
  }
  if (c + 4 <= channels) {
    fold_band_group<4>(base, plane, channels, num_stuff, c, pixels, max, total, fg);
    c += 4;
  }
  if (c + 2 <= channels) {
    fold_band_group<2>(base, plane, channels, num_stuff, c, pixels, max, total, fg);
    c += 2;
  }
  if (c < channels) fold_band_group<1>(base, plane, channels, num_stuff, c, pixels, max, total, fg);
#pragma omp simd
  for (int64_t x = 0; x < pixels; ++x) fg[x] = thing_softmax_fg(ThingSoftmaxSum<acc_t>{max[x], total[x], fg[x]});
}

// Copies `bytes` (a multiple of 64) from the 64-byte aligned `from` to the 16-byte aligned `to` with
// non-temporal stores (SSE2, which every x86-64 CPU has; plain copies elsewhere).
EYECOOL_ALWAYS_INLINE inline void stream_copy(void* to, const void* from, size_t bytes) {
#if EYECOOL_X86
  const __m128i* src = static_cast<const __m128i*>(from);
  __m128i* dst = static_cast<__m128i*>(to);
  for (size_t k = 0; k < bytes / 16; ++k) _mm_stream_si128(dst + k, _mm_load_si128(src + k));
#else
  std::memcpy(to, from, bytes);
#endif
}

// d loss / d logits of a band of pixels: exp(x - max) times the pixel's thing or stuff coefficient.
// The gradient (as large as the logits, written once, read by the next layer's backward) goes out with
// non-temporal stores when its rows allow (16-byte aligned): computed a chunk of cache lines at a time into an
// L1 buffer, then streamed, so that its lines are not first read from memory (write-allocate). The backward of a
// cold 17 MB input: 1.35 -> 1.14 ms; with a consumer that then reads the gradient, 2.16 -> 2.06 ms.
template <typename scalar_t, typename acc_t>
EYECOOL_ALWAYS_INLINE inline void band_gradient_body(const scalar_t* base, scalar_t* grad_base,
                                                     int64_t plane, int64_t channels, int64_t num_stuff,
                                                     int64_t pixels, const acc_t* max,
                                                     const acc_t* thing_coefficient,
                                                     const acc_t* stuff_coefficient) {
  constexpr int64_t line = kLineElements<scalar_t>, chunk = line * kChunkLines;
  alignas(64) scalar_t staged[chunk];
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t* coefficient = c >= num_stuff ? thing_coefficient : stuff_coefficient;
    const scalar_t* src = base + c * plane;
    const scalar_t* ahead = base + std::min(c + kPrefetchChannels, channels - 1) * plane;
    scalar_t* dst = grad_base + c * plane;
    auto gradient = [&](int64_t x) EYECOOL_ALWAYS_INLINE {
      return static_cast<scalar_t>(thing_softmax_grad<acc_t>(static_cast<acc_t>(src[x]), max[x], coefficient[x]));
    };
    auto prefetch = [&](int64_t x0) EYECOOL_ALWAYS_INLINE { __builtin_prefetch(ahead + x0); };
    int64_t x0 = 0;
    if (EYECOOL_X86 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
      for (; x0 + chunk <= pixels; x0 += chunk) {
        for (int64_t k = 0; k < kChunkLines; ++k) prefetch(x0 + k * line);
#pragma omp simd
        for (int64_t i = 0; i < chunk; ++i) staged[i] = gradient(x0 + i);
        stream_copy(dst + x0, staged, sizeof(staged));
      }
    }
    for_each_pixel_prefetching<scalar_t>(
        pixels - x0, [&](int64_t x) EYECOOL_ALWAYS_INLINE { prefetch(x0 + x); },
        [&](int64_t x) EYECOOL_ALWAYS_INLINE { dst[x0 + x] = gradient(x0 + x); });
  }
#if EYECOOL_X86
  _mm_sfence();  // the streamed stores are weakly ordered: visible before the band is reported done
#endif
}

// One anchor row of a level: out = gate(r) * fg_cell. prob_mode is hoisted out of the loop, which vectorises
// (the sigmoid's exp is the header's polynomial).
template <typename scalar_t, typename acc_t>
EYECOOL_ALWAYS_INLINE inline void level_row_forward_body(const scalar_t* r, scalar_t* out,
                                                         const acc_t* fg_cells, int64_t width,
                                                         bool prob_mode) {
  if (prob_mode) {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      out[j] = static_cast<scalar_t>(fusion_gate<acc_t>(static_cast<acc_t>(r[j]), true) * fg_cells[j]);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      out[j] = static_cast<scalar_t>(static_cast<acc_t>(r[j]) * fg_cells[j]);
    }
  }
}

// One anchor row of a level's backward: grad_r = grad_out * fg_cell * gate'(r), and cell_grad += grad_out * gate(r).
template <typename scalar_t, typename acc_t>
EYECOOL_ALWAYS_INLINE inline void level_row_backward_body(const scalar_t* r, const scalar_t* grad_out,
                                                          scalar_t* grad_r, const acc_t* fg_cells,
                                                          acc_t* cell_grad, int64_t width, bool prob_mode) {
  if (prob_mode) {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const acc_t go = static_cast<acc_t>(grad_out[j]);
      const acc_t gate = fusion_gate<acc_t>(static_cast<acc_t>(r[j]), true);
      grad_r[j] = static_cast<scalar_t>(go * fg_cells[j] * fusion_gate_grad<acc_t>(gate, true));
      cell_grad[j] += go * gate;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const acc_t go = static_cast<acc_t>(grad_out[j]);
      grad_r[j] = static_cast<scalar_t>(go * fg_cells[j]);
      cell_grad[j] += go * static_cast<acc_t>(r[j]);
    }
  }
}

// Each row loop's body compiled for the ISA cpu_isa() picked once per op call (cpu_features.h): AVX-512, AVX2+FMA
// or baseline.
template <typename scalar_t, typename acc_t>
void band_statistics(CpuIsa isa, const scalar_t* base, int64_t plane, int64_t channels, int64_t num_stuff,
                     int64_t pixels, acc_t* max, acc_t* total, acc_t* fg) {
  dispatch_cpu_isa(isa, [&]() EYECOOL_ALWAYS_INLINE {
    band_statistics_body<scalar_t, acc_t>(base, plane, channels, num_stuff, pixels, max, total, fg);
  });
}

template <typename scalar_t, typename acc_t>
void band_gradient(CpuIsa isa, const scalar_t* base, scalar_t* grad_base, int64_t plane, int64_t channels,
                   int64_t num_stuff, int64_t pixels, const acc_t* max, const acc_t* thing_coefficient,
                   const acc_t* stuff_coefficient) {
  dispatch_cpu_isa(isa, [&]() EYECOOL_ALWAYS_INLINE {
    band_gradient_body<scalar_t, acc_t>(base, grad_base, plane, channels, num_stuff, pixels, max, thing_coefficient,
                                        stuff_coefficient);
  });
}

template <typename scalar_t, typename acc_t>
void level_row_forward(CpuIsa isa, const scalar_t* r, scalar_t* out, const acc_t* fg_cells, int64_t width,
                       bool prob_mode) {
  dispatch_cpu_isa(isa, [&]() EYECOOL_ALWAYS_INLINE {
    level_row_forward_body<scalar_t, acc_t>(r, out, fg_cells, width, prob_mode);
  });
}

template <typename scalar_t, typename acc_t>
void level_row_backward(CpuIsa isa, const scalar_t* r, const scalar_t* grad_out, scalar_t* grad_r,
                        const acc_t* fg_cells, acc_t* cell_grad, int64_t width, bool prob_mode) {
  dispatch_cpu_isa(isa, [&]() EYECOOL_ALWAYS_INLINE {
    level_row_backward_body<scalar_t, acc_t>(r, grad_out, grad_r, fg_cells, cell_grad, width, prob_mode);
  });
}

// The kernels sweep bands of whole rows, which are contiguous runs of pixels in every channel plane: about 1024
// pixels, so that each channel contributes a few KB of consecutive memory (one prefetch stream per channel row)
// while the band's running statistics (3 x 4 KB) stay in L1.
int64_t band_rows(int64_t height, int64_t width) {
  return std::max<int64_t>(1, std::min<int64_t>(height, 1024 / std::max<int64_t>(width, 1)));
}

// The softmax statistics [3, N, H, W] (acc_t: max, total, fg) of every pixel.
template <typename scalar_t, typename acc_t>
at::Tensor softmax_statistics(const at::Tensor& sem, int64_t num_stuff) {
  const int64_t batch = sem.size(0), channels = sem.size(1), height = sem.size(2), width = sem.size(3);
  at::Tensor stats =
      at::empty({3, batch, height, width}, sem.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* in = sem.data_ptr<scalar_t>();
  const int64_t plane = height * width, stat_plane = batch * plane;
  acc_t* max = stats.data_ptr<acc_t>();
  acc_t* total = max + stat_plane;
  acc_t* fg = total + stat_plane;
  const CpuIsa isa = cpu_isa();
  const int64_t rows_per_band = band_rows(height, width), bands = (height + rows_per_band - 1) / rows_per_band;
  at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n = nb / bands, y = (nb % bands) * rows_per_band;
      const int64_t pixels = (std::min(height, y + rows_per_band) - y) * width, offset = n * plane + y * width;
      band_statistics<scalar_t, acc_t>(isa, in + n * channels * plane + y * width, plane, channels, num_stuff,
                                       pixels, max + offset, total + offset, fg + offset);
    }
  });
  return stats;
}

// The column geometry of one level's adaptive pooling, computed once per call (the integer divisions would
// otherwise dominate the level loops): each cell's pixel columns and each pixel column's cells.
struct LevelColumns {
  std::vector<int64_t> cell_begin, cell_end;     // per cell j: pixel columns [begin, end)
  std::vector<int64_t> pixel_first, pixel_stop;  // per pixel column x: cells [first, stop)
  bool one_cell_per_pixel = true;                // no overlapping bins (out_w divides width, or width divides out_w)

  LevelColumns(int64_t width, int64_t out_w) {
    for (int64_t j = 0; j < out_w; ++j) {
      cell_begin.push_back(adaptive_bin_start(j, width, out_w));
      cell_end.push_back(adaptive_bin_end(j, width, out_w));
    }
    for (int64_t x = 0; x < width; ++x) {
      pixel_first.push_back(adaptive_first_bin(x, width, out_w));
      pixel_stop.push_back(adaptive_stop_bin(x, width, out_w));
      one_cell_per_pixel = one_cell_per_pixel && pixel_stop.back() - pixel_first.back() == 1;
    }
  }
};

// The pooled fg of row i of a level's out_h-row grid, into `cells` (one per level column): the bin's image rows
// summed into `row_sum` first (vectorised), then each cell's columns.
template <typename acc_t>
void level_row_fg(const acc_t* fg, int64_t height, int64_t width, int64_t i, int64_t out_h,
                  const LevelColumns& columns, std::vector<acc_t>& row_sum, std::vector<acc_t>& cells) {
  const int64_t y0 = adaptive_bin_start(i, height, out_h), y1 = adaptive_bin_end(i, height, out_h);
  row_sum.assign(fg + y0 * width, fg + (y0 + 1) * width);
  for (int64_t y = y0 + 1; y < y1; ++y) {
    for (int64_t x = 0; x < width; ++x) row_sum[x] += fg[y * width + x];
  }
  const int64_t out_w = static_cast<int64_t>(columns.cell_begin.size());
  cells.resize(out_w);
  for (int64_t j = 0; j < out_w; ++j) {
    const int64_t x0 = columns.cell_begin[j], x1 = columns.cell_end[j];
    acc_t sum = 0;
    for (int64_t x = x0; x < x1; ++x) sum += row_sum[x];
    cells[j] = sum / static_cast<acc_t>((y1 - y0) * (x1 - x0));
  }
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

std::tuple<std::vector<at::Tensor>, at::Tensor> fg_fusion_forward_cpu(const at::Tensor& sem_logits,
                                                                       at::TensorList rpn_logits, int64_t num_stuff,
                                                                       c10::string_view mode) {
  check_fg_fusion_inputs(sem_logits, rpn_logits, num_stuff, "fg_fusion");
  const bool prob_mode = fg_fusion_prob_mode(mode);
  std::vector<at::Tensor> outputs;
  for (const auto& r : rpn_logits) outputs.push_back(at::empty(r.sizes(), r.options()));
  const int64_t batch = sem_logits.size(0), height = sem_logits.size(2), width = sem_logits.size(3);
  if (sem_logits.numel() == 0) {
    for (auto& o : outputs) o.zero_();
    const auto acc_dtype = at::toOpMathType(sem_logits.scalar_type());
    return {outputs, at::zeros({3, batch, height, width}, sem_logits.options().dtype(acc_dtype))};
  }
  const at::Tensor sem = sem_logits.contiguous();
  at::Tensor stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sem.scalar_type(), "fg_fusion_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats = softmax_statistics<scalar_t, acc_t>(sem, num_stuff);
    std::vector<at::Tensor> levels;
    for (const auto& r : rpn_logits) levels.push_back(r.contiguous());
    const LevelRows rows(levels, batch);
    const acc_t* fg = stats.data_ptr<acc_t>() + 2 * batch * height * width;
    const CpuIsa isa = cpu_isa();
    std::vector<LevelColumns> columns;
    for (const auto& level : levels) columns.emplace_back(width, level.size(3));
    at::parallel_for(0, rows.total(), 8, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> fg_cells, row_sum;
      for (int64_t row = begin; row < end; ++row) {
        const auto [l, n, i] = rows.locate(row, levels);
        const int64_t anchors = levels[l].size(1), out_h = levels[l].size(2), out_w = levels[l].size(3);
        level_row_fg(fg + n * height * width, height, width, i, out_h, columns[l], row_sum, fg_cells);
        for (int64_t a = 0; a < anchors; ++a) {
          const int64_t offset = ((n * anchors + a) * out_h + i) * out_w;
          level_row_forward<scalar_t, acc_t>(isa, levels[l].data_ptr<scalar_t>() + offset,
                                             outputs[l].data_ptr<scalar_t>() + offset, fg_cells.data(), out_w,
                                             prob_mode);
        }
      }
    });
  });
  return {outputs, stats};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fg_fusion_backward_cpu(at::TensorList grads,
                                                                       const at::Tensor& sem_logits,
                                                                       at::TensorList rpn_logits,
                                                                       const at::Tensor& softmax_stats,
                                                                       int64_t num_stuff, c10::string_view mode) {
  check_fg_fusion_inputs(sem_logits, rpn_logits, num_stuff, "_fg_fusion_backward");
  check_fg_fusion_grads(grads, rpn_logits);
  check_fg_fusion_stats(softmax_stats, sem_logits);
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
  const at::Tensor stats = softmax_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sem.scalar_type(), "fg_fusion_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t plane = height * width, stat_plane = batch * plane;
    const acc_t* max = stats.data_ptr<acc_t>();
    const acc_t* total = max + stat_plane;
    const acc_t* fg = total + stat_plane;
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
    // Per cell: d out / d r = gate'(r) * fg_cell for the RPN logits, and d loss / d fg_cell = sum over anchors of
    // d loss / d out * gate(r).
    const LevelRows rows(levels, batch);
    const CpuIsa isa = cpu_isa();
    std::vector<LevelColumns> columns;
    for (size_t l = 0; l < levels.size(); ++l) columns.emplace_back(width, level_w[l]);
    at::parallel_for(0, rows.total(), 8, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> fg_cells, row_sum, cell_grad;
      for (int64_t row = begin; row < end; ++row) {
        const auto [l, n, i] = rows.locate(row, levels);
        const int64_t anchors = levels[l].size(1), out_h = level_h[l], out_w = level_w[l];
        level_row_fg(fg + n * plane, height, width, i, out_h, columns[l], row_sum, fg_cells);
        cell_grad.assign(out_w, acc_t(0));
        for (int64_t a = 0; a < anchors; ++a) {
          const int64_t offset = ((n * anchors + a) * out_h + i) * out_w;
          level_row_backward<scalar_t, acc_t>(isa, levels[l].data_ptr<scalar_t>() + offset,
                                              level_grads[l].data_ptr<scalar_t>() + offset,
                                              grad_rpn[l].data_ptr<scalar_t>() + offset, fg_cells.data(),
                                              cell_grad.data(), out_w, prob_mode);
        }
        acc_t* gc_row = grad_cells[l].data_ptr<acc_t>() + (n * out_h + i) * out_w;
        const int64_t bin_h = adaptive_bin_size(i, height, out_h);
        for (int64_t j = 0; j < out_w; ++j) {
          gc_row[j] = cell_grad[j] / static_cast<acc_t>(bin_h * (columns[l].cell_end[j] - columns[l].cell_begin[j]));
        }
      }
    });
    const scalar_t* in = sem.data_ptr<scalar_t>();
    scalar_t* out = grad_sem.data_ptr<scalar_t>();
    const int64_t rows_per_band = band_rows(height, width), bands = (height + rows_per_band - 1) / rows_per_band;
    at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
      const int64_t band_pixels = rows_per_band * width;
      std::vector<acc_t> grad_fg(band_pixels), thing_coefficient(band_pixels), stuff_coefficient(band_pixels),
          row_cells;
      for (int64_t nb = begin; nb < end; ++nb) {
        const int64_t n = nb / bands, y_begin = (nb % bands) * rows_per_band;
        const int64_t y_end = std::min(height, y_begin + rows_per_band), pixels = (y_end - y_begin) * width;
        // d loss / d fg at each pixel of the band: the sum over levels of the cells whose bins hold the pixel
        // (the cells of the pixel's level rows summed first, then each pixel column's cells).
        std::fill(grad_fg.begin(), grad_fg.end(), acc_t(0));
        for (int64_t y = y_begin; y < y_end; ++y) {
          acc_t* row_grad_fg = grad_fg.data() + (y - y_begin) * width;
          for (size_t l = 0; l < grad_cells.size(); ++l) {
            const int64_t out_h = level_h[l], out_w = level_w[l];
            const acc_t* gc = grad_cells[l].data_ptr<acc_t>() + n * out_h * out_w;
            const int64_t i0 = adaptive_first_bin(y, height, out_h), i1 = adaptive_stop_bin(y, height, out_h);
            if (i0 >= i1) continue;  // a level without rows
            row_cells.assign(gc + i0 * out_w, gc + (i0 + 1) * out_w);
            for (int64_t i = i0 + 1; i < i1; ++i) {
              for (int64_t j = 0; j < out_w; ++j) row_cells[j] += gc[i * out_w + j];
            }
            const int64_t* first = columns[l].pixel_first.data();
            const int64_t* stop = columns[l].pixel_stop.data();
            if (columns[l].one_cell_per_pixel) {
              for (int64_t x = 0; x < width; ++x) row_grad_fg[x] += row_cells[first[x]];
            } else {
              for (int64_t x = 0; x < width; ++x) {
                acc_t sum = 0;
                for (int64_t j = first[x]; j < stop[x]; ++j) sum += row_cells[j];
                row_grad_fg[x] += sum;
              }
            }
          }
        }
        const int64_t offset = n * plane + y_begin * width;
        for (int64_t p = 0; p < pixels; ++p) {
          thing_coefficient[p] = thing_softmax_grad_coefficient(total[offset + p], fg[offset + p], grad_fg[p], true);
          stuff_coefficient[p] = thing_softmax_grad_coefficient(total[offset + p], fg[offset + p], grad_fg[p], false);
        }
        band_gradient<scalar_t, acc_t>(isa, in + n * channels * plane + y_begin * width,
                                       out + n * channels * plane + y_begin * width, plane, channels, num_stuff,
                                       pixels, max + offset, thing_coefficient.data(), stuff_coefficient.data());
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
