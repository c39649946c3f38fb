// RPN-FCN fusion on CUDA. One thread per pixel runs the softmax over the channels in one pass (online, eight
// channels at a time; coalesced: neighbouring threads read neighbouring pixels of the same channel), and writes
// only the pixel's statistics (max, total, fg: the op's second output); one thread per output cell pools its bin
// from the fg map.
// The backward reads those statistics, gathers d loss / d fg from every level's bins per pixel, and writes the
// logits' gradient one element per thread (one exp each). No atomics: every output element has one writer, so
// the results are deterministic. The arithmetic is fg_fusion.h's, the code the CPU tests exercise.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "fg_fusion.h"
#include "cuda/launch.cuh"

namespace eyecool {
namespace {

// Levels gathered per launch of gather_grad_fg_kernel (their pointers travel by value); more levels take more
// launches, each adding to the previous one's sums.
constexpr int kMaxLevels = 8;
// Channels per step of the online softmax: that many independent loads and exps in flight per thread.
constexpr int kFoldChannels = 8;

// Per-pixel softmax statistics: max, total and fg, each [N, H, W].
template <typename scalar_t, typename acc_t>
__global__ void statistics_kernel(int64_t pixels, const scalar_t* __restrict__ sem, int64_t channels, int64_t plane,
                                  int64_t num_stuff, acc_t* __restrict__ max_out, acc_t* __restrict__ total_out,
                                  acc_t* __restrict__ fg) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pixels; p += (int64_t)blockDim.x * gridDim.x) {
    const int64_t n = p / plane, q = p % plane;
    const scalar_t* base = sem + n * channels * plane + q;
    // One read of each logit (online softmax, kFoldChannels channels at a time, then one at a time):
    // neighbouring threads read neighbouring pixels of one channel.
    ThingSoftmaxSum<acc_t> s = thing_softmax_empty<acc_t>();
    int64_t c = 0;
    for (; c + kFoldChannels <= channels; c += kFoldChannels) {
      const int64_t first_thing = num_stuff - c;
      thing_softmax_fold<kFoldChannels, acc_t>(
          s, [&](int k) { return static_cast<acc_t>(base[(c + k) * plane]); },
          static_cast<int>(first_thing < 0 ? 0 : (first_thing > kFoldChannels ? kFoldChannels : first_thing)));
    }
    for (; c < channels; ++c) {
      thing_softmax_fold<1, acc_t>(s, [&](int) { return static_cast<acc_t>(base[c * plane]); },
                                   c >= num_stuff ? 0 : 1);
    }
    fg[p] = thing_softmax_fg(s);
    max_out[p] = s.max;
    total_out[p] = s.total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void level_forward_kernel(int64_t total, const scalar_t* __restrict__ rpn, const acc_t* __restrict__ fg,
                                     int64_t height, int64_t width, int64_t anchors, int64_t out_h, int64_t out_w,
                                     bool prob_mode, scalar_t* __restrict__ out) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)blockDim.x * gridDim.x) {
    const int64_t j = k % out_w, i = (k / out_w) % out_h, n = k / (out_w * out_h * anchors);
    const acc_t fg_cell = adaptive_bin_mean(fg + n * height * width, height, width, i, j, out_h, out_w);
    out[k] = static_cast<scalar_t>(fusion_gate<acc_t>(static_cast<acc_t>(rpn[k]), prob_mode) * fg_cell);
  }
}

// One thread per pooled cell: the RPN logits' gradient of its anchors and d loss / d fg_cell / bin area.
template <typename scalar_t, typename acc_t>
__global__ void level_backward_kernel(int64_t cells_total, const scalar_t* __restrict__ rpn,
                                      const scalar_t* __restrict__ grad, const acc_t* __restrict__ fg, int64_t height,
                                      int64_t width, int64_t anchors, int64_t out_h, int64_t out_w, bool prob_mode,
                                      scalar_t* __restrict__ grad_rpn, acc_t* __restrict__ grad_cell) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < cells_total;
       k += (int64_t)blockDim.x * gridDim.x) {
    const int64_t j = k % out_w, i = (k / out_w) % out_h, n = k / (out_w * out_h);
    const acc_t fg_cell = adaptive_bin_mean(fg + n * height * width, height, width, i, j, out_h, out_w);
    acc_t grad_fg = 0;
    for (int64_t a = 0; a < anchors; ++a) {
      const int64_t idx = ((n * anchors + a) * out_h + i) * out_w + j;
      const acc_t rv = static_cast<acc_t>(rpn[idx]);
      const acc_t g = static_cast<acc_t>(grad[idx]);
      const acc_t gate = fusion_gate<acc_t>(rv, prob_mode);
      grad_rpn[idx] = static_cast<scalar_t>(g * fg_cell * fusion_gate_grad<acc_t>(gate, prob_mode));
      grad_fg += g * gate;
    }
    grad_cell[k] = grad_fg / static_cast<acc_t>(adaptive_bin_size(i, height, out_h) * adaptive_bin_size(j, width, out_w));
  }
}

template <typename acc_t>
struct CellGrads {
  const acc_t* data[kMaxLevels];  // [N, H_l, W_l] per level
  int64_t height[kMaxLevels], width[kMaxLevels];
  int num_levels;
};

// d loss / d fg per pixel: the cells of every level whose bins hold the pixel (added to grad_fg's value when
// `accumulate`, for the launches after the first kMaxLevels levels).
template <typename acc_t>
__global__ void gather_grad_fg_kernel(int64_t pixels, CellGrads<acc_t> cells, int64_t height, int64_t width,
                                      bool accumulate, acc_t* __restrict__ grad_fg) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pixels; p += (int64_t)blockDim.x * gridDim.x) {
    const int64_t x = p % width, y = (p / width) % height, n = p / (width * height);
    acc_t sum = 0;
    for (int l = 0; l < cells.num_levels; ++l) {
      const int64_t out_h = cells.height[l], out_w = cells.width[l];
      const acc_t* gc = cells.data[l] + n * out_h * out_w;
      const int64_t i1 = adaptive_stop_bin(y, height, out_h), j1 = adaptive_stop_bin(x, width, out_w);
      for (int64_t i = adaptive_first_bin(y, height, out_h); i < i1; ++i) {
        for (int64_t j = adaptive_first_bin(x, width, out_w); j < j1; ++j) sum += gc[i * out_w + j];
      }
    }
    grad_fg[p] = accumulate ? grad_fg[p] + sum : sum;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sem_backward_kernel(int64_t total, const scalar_t* __restrict__ sem, int64_t channels, int64_t plane,
                                    int64_t num_stuff, const acc_t* __restrict__ max, const acc_t* __restrict__ sum,
                                    const acc_t* __restrict__ fg, const acc_t* __restrict__ grad_fg,
                                    scalar_t* __restrict__ grad_sem) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)blockDim.x * gridDim.x) {
    const int64_t q = k % plane, c = (k / plane) % channels, n = k / (plane * channels);
    const int64_t p = n * plane + q;
    const acc_t coefficient = thing_softmax_grad_coefficient<acc_t>(sum[p], fg[p], grad_fg[p], c >= num_stuff);
    grad_sem[k] = static_cast<scalar_t>(thing_softmax_grad<acc_t>(static_cast<acc_t>(sem[k]), max[p], coefficient));
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor> fg_fusion_forward_cuda(const at::Tensor& sem_logits,
                                                                        at::TensorList rpn_logits, int64_t num_stuff,
                                                                        c10::string_view mode) {
  check_fg_fusion_inputs(sem_logits, rpn_logits, num_stuff, "fg_fusion");
  const bool prob_mode = fg_fusion_prob_mode(mode);
  at::cuda::CUDAGuard guard(sem_logits.device());
  const int64_t batch = sem_logits.size(0), channels = sem_logits.size(1), height = sem_logits.size(2),
                width = sem_logits.size(3);
  // Every element of the outputs is written by a kernel below, unless there are no logits at all.
  std::vector<at::Tensor> outputs;
  for (const auto& r : rpn_logits) outputs.push_back(at::empty(r.sizes(), r.options()));
  const at::Tensor stats = at::empty({3, batch, height, width},
                                     sem_logits.options().dtype(at::toOpMathType(sem_logits.scalar_type())));
  if (sem_logits.numel() == 0) {
    for (auto& o : outputs) o.zero_();
    return {outputs, stats};
  }
  const at::Tensor sem = sem_logits.contiguous();
  const int64_t plane = height * width, pixels = batch * plane;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sem.scalar_type(), "fg_fusion_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor max = stats[0], total = stats[1], fg = stats[2];
    EYECOOL_LAUNCH(num_blocks(pixels), kThreads, stream, statistics_kernel<scalar_t, acc_t>)(
        pixels, sem.data_ptr<scalar_t>(), channels, plane, num_stuff, max.data_ptr<acc_t>(), total.data_ptr<acc_t>(),
        fg.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (size_t l = 0; l < rpn_logits.size(); ++l) {
      const at::Tensor r = rpn_logits[l].contiguous();
      const int64_t total = r.numel();
      if (total == 0) continue;
      EYECOOL_LAUNCH(num_blocks(total), kThreads, stream, level_forward_kernel<scalar_t, acc_t>)(
          total, r.data_ptr<scalar_t>(), fg.data_ptr<acc_t>(), height, width, r.size(1), r.size(2), r.size(3),
          prob_mode, outputs[l].data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {outputs, stats};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fg_fusion_backward_cuda(at::TensorList grads,
                                                                        const at::Tensor& sem_logits,
                                                                        at::TensorList rpn_logits,
                                                                        const at::Tensor& softmax_stats,
                                                                        int64_t num_stuff, c10::string_view mode) {
  check_fg_fusion_inputs(sem_logits, rpn_logits, num_stuff, "_fg_fusion_backward");
  check_fg_fusion_grads(grads, rpn_logits);
  check_fg_fusion_stats(softmax_stats, sem_logits);
  const bool prob_mode = fg_fusion_prob_mode(mode);
  at::cuda::CUDAGuard guard(sem_logits.device());
  // Every element of the gradients is written by a kernel below, unless there are no logits at all.
  at::Tensor grad_sem = at::empty(sem_logits.sizes(), sem_logits.options());
  std::vector<at::Tensor> grad_rpn;
  for (const auto& r : rpn_logits) grad_rpn.push_back(at::empty(r.sizes(), r.options()));
  if (sem_logits.numel() == 0) {
    grad_sem.zero_();
    for (auto& g : grad_rpn) g.zero_();
    return {grad_sem, grad_rpn};
  }
  const at::Tensor sem = sem_logits.contiguous();
  const int64_t batch = sem.size(0), channels = sem.size(1), height = sem.size(2), width = sem.size(3);
  const int64_t plane = height * width, pixels = batch * plane;
  const auto acc_options = sem.options().dtype(at::toOpMathType(sem.scalar_type()));
  const at::Tensor stats = softmax_stats.contiguous();
  const at::Tensor max = stats[0], sum = stats[1], fg = stats[2];
  const at::Tensor grad_fg = at::empty({batch, height, width}, acc_options);
  std::vector<at::Tensor> grad_cells;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sem.scalar_type(), "fg_fusion_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (size_t l = 0; l < rpn_logits.size(); ++l) {
      const at::Tensor r = rpn_logits[l].contiguous();
      const at::Tensor go = grads[l].contiguous();
      const int64_t out_h = r.size(2), out_w = r.size(3);
      const int64_t cells_total = batch * out_h * out_w;
      // A level without anchors still has cells (its zeros reach the gather); otherwise the kernel writes them.
      const bool launch = cells_total > 0 && r.size(1) > 0;
      grad_cells.push_back(launch ? at::empty({batch, out_h, out_w}, acc_options)
                                  : at::zeros({batch, out_h, out_w}, acc_options));
      if (!launch) continue;
      EYECOOL_LAUNCH(num_blocks(cells_total), kThreads, stream, level_backward_kernel<scalar_t, acc_t>)(
          cells_total, r.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), fg.data_ptr<acc_t>(), height, width,
          r.size(1), out_h, out_w, prob_mode, grad_rpn[l].data_ptr<scalar_t>(), grad_cells.back().data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // kMaxLevels levels per gather (there is at least one level): the first launch writes grad_fg, later ones add.
    for (size_t first = 0; first < grad_cells.size(); first += kMaxLevels) {
      CellGrads<acc_t> cells{};
      cells.num_levels = static_cast<int>(std::min<size_t>(kMaxLevels, grad_cells.size() - first));
      for (int l = 0; l < cells.num_levels; ++l) {
        cells.data[l] = grad_cells[first + l].data_ptr<acc_t>();
        cells.height[l] = grad_cells[first + l].size(1);
        cells.width[l] = grad_cells[first + l].size(2);
      }
      EYECOOL_LAUNCH(num_blocks(pixels), kThreads, stream, gather_grad_fg_kernel<acc_t>)(
          pixels, cells, height, width, first > 0, grad_fg.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t total = sem.numel();
    EYECOOL_LAUNCH(num_blocks(total), kThreads, stream, sem_backward_kernel<scalar_t, acc_t>)(
        total, sem.data_ptr<scalar_t>(), channels, plane, num_stuff, max.data_ptr<acc_t>(), sum.data_ptr<acc_t>(),
        fg.data_ptr<acc_t>(), grad_fg.data_ptr<acc_t>(), grad_sem.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_sem, grad_rpn};
}

}  // namespace
}  // namespace eyecool

EYECOOL_CUDA_LIBRARY_IMPL(m) {
  m.impl("fg_fusion", &eyecool::fg_fusion_forward_cuda);
  m.impl("_fg_fusion_backward", &eyecool::fg_fusion_backward_cuda);
}
