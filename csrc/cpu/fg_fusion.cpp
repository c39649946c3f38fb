// RPN-FCN fusion on the CPU.
//
// Forward: one pass over the semantic logits, parallel over image rows: for each row the channel loop is
// outermost and the pixel loop innermost (contiguous, vectorisable), carrying the online softmax statistics of
// the row's pixels; only the one-channel foreground map is written. The levels are then pooled from that map.
// Backward: the same pass recomputes the per-pixel statistics (max, sum, fg; the softmax is never stored), the
// gradient of fg is gathered from every level's bins, and a second sweep writes the logits' gradient.
// Every output element is owned by one thread, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "fg_fusion.h"

namespace eyecool {
namespace {

// Per-pixel softmax statistics of every image: the fg map, and (for the backward) the max and the sum.
template <typename acc_t>
struct PixelStatistics {
  at::Tensor fg, max, total;  // [N, H, W] acc_t each; max/total undefined when not requested
};

template <typename scalar_t, typename acc_t>
PixelStatistics<acc_t> pixel_statistics(const at::Tensor& sem, int64_t num_stuff, bool keep_max_total) {
  const int64_t batch = sem.size(0), channels = sem.size(1), height = sem.size(2), width = sem.size(3);
  const auto acc_options = sem.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  PixelStatistics<acc_t> stats;
  stats.fg = at::empty({batch, height, width}, acc_options);
  if (keep_max_total) {
    stats.max = at::empty({batch, height, width}, acc_options);
    stats.total = at::empty({batch, height, width}, acc_options);
  }
  const scalar_t* in = sem.data_ptr<scalar_t>();
  acc_t* fg = stats.fg.template data_ptr<acc_t>();
  acc_t* max_out = keep_max_total ? stats.max.template data_ptr<acc_t>() : nullptr;
  acc_t* total_out = keep_max_total ? stats.total.template data_ptr<acc_t>() : nullptr;
  const int64_t plane = height * width;
  at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<ThingSoftmaxSum<acc_t>> row(width);
    for (int64_t ny = begin; ny < end; ++ny) {
      const int64_t n = ny / height, y = ny % height;
      const scalar_t* base = in + n * channels * plane + y * width;
      for (int64_t x = 0; x < width; ++x) {
        row[x] = thing_softmax_start<acc_t>(static_cast<acc_t>(base[x]), 0 >= num_stuff);
      }
      for (int64_t c = 1; c < channels; ++c) {
        const scalar_t* channel_row = base + c * plane;
        const bool is_thing = c >= num_stuff;
        for (int64_t x = 0; x < width; ++x) {
          thing_softmax_add<acc_t>(row[x], static_cast<acc_t>(channel_row[x]), is_thing);
        }
      }
      const int64_t offset = n * plane + y * width;
      for (int64_t x = 0; x < width; ++x) {
        fg[offset + x] = thing_softmax_fg(row[x]);
        if (max_out != nullptr) {
          max_out[offset + x] = row[x].max;
          total_out[offset + x] = row[x].total;
        }
      }
    }
  });
  return stats;
}

// fg pooled to one level: [N, H_l, W_l] acc_t.
template <typename acc_t>
at::Tensor pool_to_level(const at::Tensor& fg, int64_t out_h, int64_t out_w) {
  const int64_t batch = fg.size(0), height = fg.size(1), width = fg.size(2);
  at::Tensor pooled = at::empty({batch, out_h, out_w}, fg.options());
  const acc_t* src = fg.data_ptr<acc_t>();
  acc_t* dst = pooled.data_ptr<acc_t>();
  at::parallel_for(0, batch * out_h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ni = begin; ni < end; ++ni) {
      const int64_t n = ni / out_h, i = ni % out_h;
      for (int64_t j = 0; j < out_w; ++j) {
        dst[ni * out_w + j] = adaptive_bin_mean(src + n * height * width, height, width, i, j, out_h, out_w);
      }
    }
  });
  return pooled;
}

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
    const auto stats = pixel_statistics<scalar_t, acc_t>(sem, num_stuff, false);
    for (size_t l = 0; l < rpn_logits.size(); ++l) {
      const at::Tensor r = rpn_logits[l].contiguous();
      const int64_t anchors = r.size(1), out_h = r.size(2), out_w = r.size(3);
      const at::Tensor fg_level = pool_to_level<acc_t>(stats.fg, out_h, out_w);
      const acc_t* fg_l = fg_level.data_ptr<acc_t>();
      const scalar_t* src = r.data_ptr<scalar_t>();
      scalar_t* dst = outputs[l].data_ptr<scalar_t>();
      const int64_t cells = out_h * out_w;
      at::parallel_for(0, r.numel(), 4096, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t n = k / (anchors * cells), cell = k % cells;
          dst[k] = static_cast<scalar_t>(fusion_gate<acc_t>(static_cast<acc_t>(src[k]), prob_mode) *
                                         fg_l[n * cells + cell]);
        }
      });
    }
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
    const auto stats = pixel_statistics<scalar_t, acc_t>(sem, num_stuff, true);
    const int64_t plane = height * width;
    // Per level: the gradient of each pooled cell, already divided by its bin area, [N, H_l, W_l].
    std::vector<at::Tensor> grad_cells;
    std::vector<int64_t> level_h, level_w;
    for (size_t l = 0; l < rpn_logits.size(); ++l) {
      const at::Tensor r = rpn_logits[l].contiguous();
      const at::Tensor go = grads[l].contiguous();
      const int64_t anchors = r.size(1), out_h = r.size(2), out_w = r.size(3), cells = out_h * out_w;
      const at::Tensor fg_level = pool_to_level<acc_t>(stats.fg, out_h, out_w);
      at::Tensor grad_cell = at::empty({batch, out_h, out_w}, fg_level.options());
      const acc_t* fg_l = fg_level.data_ptr<acc_t>();
      const scalar_t* r_ptr = r.data_ptr<scalar_t>();
      const scalar_t* go_ptr = go.data_ptr<scalar_t>();
      scalar_t* gr_ptr = grad_rpn[l].data_ptr<scalar_t>();
      acc_t* gc_ptr = grad_cell.data_ptr<acc_t>();
      at::parallel_for(0, batch * cells, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t n = k / cells, cell = k % cells;
          const acc_t fg_value = fg_l[k];
          acc_t grad_fg = 0;
          for (int64_t a = 0; a < anchors; ++a) {
            const int64_t idx = (n * anchors + a) * cells + cell;
            const acc_t rv = static_cast<acc_t>(r_ptr[idx]);
            const acc_t g = static_cast<acc_t>(go_ptr[idx]);
            gr_ptr[idx] = static_cast<scalar_t>(g * fg_value * fusion_gate_grad<acc_t>(rv, prob_mode));
            grad_fg += g * fusion_gate<acc_t>(rv, prob_mode);
          }
          const int64_t i = cell / out_w, j = cell % out_w;
          gc_ptr[k] = grad_fg / static_cast<acc_t>(adaptive_bin_size(i, height, out_h) *
                                                   adaptive_bin_size(j, width, out_w));
        }
      });
      grad_cells.push_back(grad_cell);
      level_h.push_back(out_h);
      level_w.push_back(out_w);
    }
    const acc_t* fg = stats.fg.template data_ptr<acc_t>();
    const acc_t* max = stats.max.data_ptr<acc_t>();
    const acc_t* total = stats.total.data_ptr<acc_t>();
    const scalar_t* in = sem.data_ptr<scalar_t>();
    scalar_t* out = grad_sem.data_ptr<scalar_t>();
    at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> grad_fg(width);
      for (int64_t ny = begin; ny < end; ++ny) {
        const int64_t n = ny / height, y = ny % height;
        // d loss / d fg at each pixel of the row: the sum over levels of the cells whose bins hold the pixel.
        std::fill(grad_fg.begin(), grad_fg.end(), acc_t(0));
        for (size_t l = 0; l < grad_cells.size(); ++l) {
          const int64_t out_h = level_h[l], out_w = level_w[l];
          const acc_t* gc = grad_cells[l].data_ptr<acc_t>() + n * out_h * out_w;
          const int64_t i0 = adaptive_first_bin(y, height, out_h), i1 = adaptive_stop_bin(y, height, out_h);
          for (int64_t x = 0; x < width; ++x) {
            const int64_t j0 = adaptive_first_bin(x, width, out_w), j1 = adaptive_stop_bin(x, width, out_w);
            acc_t sum = 0;
            for (int64_t i = i0; i < i1; ++i) {
              for (int64_t j = j0; j < j1; ++j) sum += gc[i * out_w + j];
            }
            grad_fg[x] += sum;
          }
        }
        const int64_t offset = n * plane + y * width;
        for (int64_t c = 0; c < channels; ++c) {
          const bool is_thing = c >= num_stuff;
          const scalar_t* src = in + (n * channels + c) * plane + y * width;
          scalar_t* dst = out + (n * channels + c) * plane + y * width;
          for (int64_t x = 0; x < width; ++x) {
            dst[x] = static_cast<scalar_t>(thing_softmax_grad<acc_t>(static_cast<acc_t>(src[x]), max[offset + x],
                                                                     total[offset + x], fg[offset + x],
                                                                     grad_fg[x], is_thing));
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
