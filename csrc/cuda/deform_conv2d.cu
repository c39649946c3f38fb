// Deformable convolution on CUDA as im2col + GEMM, over chunks of the batch so that the column buffer stays
// bounded. The sampling arithmetic (position, taps, value, coordinate gradient) comes from deform_conv2d.h, the
// code the CPU tests exercise.
//   sampling: one thread per sample (image, offset group, kernel tap, output pixel), pixels fastest: it reads the
//             sample's offset and mask and computes its bilinear taps and weights once, then loops over the
//             offset group's channels, where each column element costs its four gathers, a few multiply-adds and
//             one store (or atomic) that coalesces with the neighbouring threads' (benchmarks/sass_budget.py
//             counts the instructions of that loop in the sm_90 SASS). Indices are 32-bit when every tensor has
//             fewer than 2^31 elements, 64-bit otherwise, and split by precomputed fast divisors, never by an
//             integer division.
//   forward:  columns[c * K + k, n * L + p] by im2col_kernel, then out_g = W_g @ columns_g per weight group
//             (at::mm, so cuBLAS).
//   backward: column gradient W_g^T @ grad_g (GEMM); grad_input by scattering it with atomic adds (offsets can
//             send any output to any input pixel, so there is no gather form; the op reports itself to
//             torch.use_deterministic_algorithms); grad_offset and grad_mask by coordinate_grad_kernel (sums over
//             the group's channels, no atomics); grad_weight by GEMM.
// float, double, half and bfloat16; the sampling and the accumulators of the gradients run in float (opmath).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "deform_conv2d.h"
#include "cuda/launch.cuh"

namespace eyecool {
namespace {

// Upper bound on the column buffer of one batch chunk, in elements.
constexpr int64_t kMaxColumnElements = int64_t(1) << 27;

// The bound in force: kMaxColumnElements, or the emulation's test setting (a tiny one makes small batches run in
// several chunks, as large ones do on a GPU).
int64_t max_column_elements() {
#ifdef EYECOOL_CUDA_EMULATION
  const int64_t limit = emulation::launch_limits().max_column_elements;
  if (limit > 0) return limit;
#endif
  return kMaxColumnElements;
}

// The shapes the sampling arithmetic needs (deform_conv2d.h works in int64), passed by value.
struct KernelShape {
  int64_t height, width, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

KernelShape kernel_shape(const DeformConv2dShape& s) {
  return {s.height, s.width, s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dilation_h, s.dilation_w};
}

// The high half of a * b.
__device__ __forceinline__ uint32_t mul_high(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__device__ __forceinline__ uint64_t mul_high(uint64_t a, uint64_t b) {
#ifdef __CUDA_ARCH__
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// Division by a divisor fixed for the launch as a multiply-high, an add and a shift (Granlund and Montgomery's
// round-up method, as ATen's IntDivider). For a divisor d in [1, 2^(B-1)] with l = ceil(log2 d) and
// m = floor(2^B (2^l - d) / d) + 1, (mul_high(n, m) + n) >> l = floor(n / d) for every n < 2^(B-1) (B: the index
// type's bits; the bound keeps the add from wrapping). What nvcc makes of a plain `/` by a runtime value is an
// inlined reciprocal sequence of about 20 instructions (32-bit) or, for 64-bit operands whose high words are not
// zero, a call to __cuda_sm20_div_s64 (about 80): benchmarks/sass_budget.py counts both.
template <typename index_t>
struct FastDivider {
  static_assert(std::is_same<index_t, uint32_t>::value || std::is_same<index_t, uint64_t>::value,
                "FastDivider: uint32_t or uint64_t");
  static constexpr unsigned kBits = sizeof(index_t) * 8;
  using wide_t = std::conditional_t<kBits == 32, uint64_t, unsigned __int128>;

  index_t divisor, multiplier;
  unsigned shift;

  // Host side, at launch.
  static FastDivider make(int64_t d) {
    TORCH_INTERNAL_ASSERT(d >= 1 && static_cast<uint64_t>(d) <= (uint64_t(1) << (kBits - 1)),
                          "FastDivider: divisor ", d, " outside [1, 2^", kBits - 1, "]");
    FastDivider f;
    f.divisor = static_cast<index_t>(d);
    f.shift = 0;
    while ((wide_t(1) << f.shift) < wide_t(d)) ++f.shift;
    // (2^l - d) < d <= 2^(B-1), so the shifted numerator fits 2B bits and the quotient B bits.
    f.multiplier = static_cast<index_t>((((wide_t(1) << f.shift) - wide_t(d)) << kBits) / wide_t(d) + 1);
    return f;
  }

  __device__ __forceinline__ index_t div(index_t n) const { return (mul_high(n, multiplier) + n) >> shift; }
};

// A launch's samples, one per (image nl of the chunk, offset group og, kernel tap k, output pixel p), flattened
// with p fastest, then k, og, nl (neighbouring threads take neighbouring pixels, so a warp's column stores are
// contiguous), and the sizes their indices are formed from, in the launch's index type (uint32_t when every
// tensor involved has fewer than 2^31 elements: see narrow_indices).
template <typename index_t>
struct SampleGrid {
  index_t total;                       // chunk * offset_groups * taps * plane
  FastDivider<index_t> plane, taps, offset_groups, out_w, kernel_w;
  index_t first_channel;               // n0 * offset_groups * taps: the chunk's first offset / mask channel
  index_t n0, chunk, channels, channels_per_group;
  index_t in_plane;                    // height * width
  index_t width;
  index_t column_step;                 // taps * chunk * plane: from channel c's column row to c + 1's
};

template <typename index_t>
SampleGrid<index_t> sample_grid(const DeformConv2dShape& s, int64_t n0, int64_t chunk) {
  const int64_t taps = s.kernel_h * s.kernel_w, plane = s.out_h * s.out_w;
  SampleGrid<index_t> g;
  g.total = static_cast<index_t>(chunk * s.offset_groups * taps * plane);
  g.plane = FastDivider<index_t>::make(plane);
  g.taps = FastDivider<index_t>::make(taps);
  g.offset_groups = FastDivider<index_t>::make(s.offset_groups);
  g.out_w = FastDivider<index_t>::make(s.out_w);
  g.kernel_w = FastDivider<index_t>::make(s.kernel_w);
  g.first_channel = static_cast<index_t>(n0 * s.offset_groups * taps);
  g.n0 = static_cast<index_t>(n0);
  g.chunk = static_cast<index_t>(chunk);
  g.channels = static_cast<index_t>(s.in_channels);
  g.channels_per_group = static_cast<index_t>(s.in_channels / s.offset_groups);
  g.in_plane = static_cast<index_t>(s.height * s.width);
  g.width = static_cast<index_t>(s.width);
  g.column_step = static_cast<index_t>(taps * chunk * plane);
  return g;
}

// Whether the sampling kernels may index in 32 bits: every index they form is an element index into the input
// (grad_input has its shape), the offsets (the mask and grad_mask are half their size, grad_offset the same), or
// the chunk's columns (grad_columns the same), or a sample index (below the column count, as C >= offset groups).
// With each of those below 2^31, unsigned 32-bit arithmetic holds them, and also the values one step past the
// end that the loops form and never use (an index below 2^31 plus a grid stride (< 2^27) or a column step (below
// the column count)), and FastDivider's bound (dividends below 2^31) holds. The emulation can force the 64-bit
// path (LaunchLimits::force_64bit_index), so that small tests run it too.
bool narrow_indices(int64_t input_numel, int64_t offset_numel, int64_t column_numel) {
#ifdef EYECOOL_CUDA_EMULATION
  if (emulation::launch_limits().force_64bit_index) return false;
#endif
  constexpr int64_t kLimit = int64_t(1) << 31;
  static_assert(kMaxBlocks * kThreads < (int64_t(1) << 27), "the grid stride must stay below 2^27");
  return input_numel < kLimit && offset_numel < kLimit && column_numel < kLimit;
}

// f(index_t{}) with index_t the launch's index type.
template <typename F>
void with_index_type(bool narrow, const F& f) {
  if (narrow) {
    f(uint32_t(0));
  } else {
    f(uint64_t(0));
  }
}

// One sample's coordinates.
template <typename index_t>
struct Sample {
  index_t nl, og, k, p;
  index_t channel;  // (n0 + nl) * offset_groups + og) * taps + k: its offset / mask channel
};

template <typename index_t>
__device__ __forceinline__ Sample<index_t> decode_sample(const SampleGrid<index_t>& g, index_t index) {
  Sample<index_t> sample;
  const index_t row = g.plane.div(index);  // (nl * offset_groups + og) * taps + k
  sample.p = index - row * g.plane.divisor;
  const index_t group = g.taps.div(row);   // nl * offset_groups + og
  sample.k = row - group * g.taps.divisor;
  sample.nl = g.offset_groups.div(group);
  sample.og = group - sample.nl * g.offset_groups.divisor;
  sample.channel = g.first_channel + row;
  return sample;
}

// The taps and modulation of a sample: computed once, shared by the offset group's channels.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ DeformTaps<acc_t> sample_taps(const KernelShape& s, const SampleGrid<index_t>& g,
                                                         const scalar_t* __restrict__ offset,
                                                         const scalar_t* __restrict__ mask,
                                                         const Sample<index_t>& sample, acc_t* modulation) {
  const index_t plane = g.plane.divisor;
  const index_t oy = g.out_w.div(sample.p), ox = sample.p - oy * g.out_w.divisor;
  const index_t ki = g.kernel_w.div(sample.k), kj = sample.k - ki * g.kernel_w.divisor;
  const scalar_t* off = offset + sample.channel * 2 * plane + sample.p;
  const acc_t y = deform_sampling_position<acc_t>(static_cast<int64_t>(oy), static_cast<int64_t>(ki), s.stride_h,
                                                  s.pad_h, s.dilation_h, static_cast<acc_t>(off[0]));
  const acc_t x = deform_sampling_position<acc_t>(static_cast<int64_t>(ox), static_cast<int64_t>(kj), s.stride_w,
                                                  s.pad_w, s.dilation_w, static_cast<acc_t>(off[plane]));
  *modulation = mask ? static_cast<acc_t>(mask[sample.channel * plane + sample.p]) : acc_t(1);
  return deform_bilinear_taps<acc_t>(s.height, s.width, y, x);
}

// The four taps' element offsets inside one channel's image (taps outside it were clamped onto it).
template <typename index_t>
struct TapOffsets {
  index_t o1, o2, o3, o4;
};

template <typename index_t, typename acc_t>
__device__ __forceinline__ TapOffsets<index_t> tap_offsets(const DeformTaps<acc_t>& t, index_t width) {
  const index_t y_low = static_cast<index_t>(t.y_low) * width, y_high = static_cast<index_t>(t.y_high) * width;
  const index_t x_low = static_cast<index_t>(t.x_low), x_high = static_cast<index_t>(t.x_high);
  return {y_low + x_low, y_low + x_high, y_high + x_low, y_high + x_high};
}

// The index of columns[(c0 * K + k), nl * L + p], channel c0's row of the sample; channel c0 + i's is i column
// steps further.
template <typename index_t>
__device__ __forceinline__ index_t first_column(const SampleGrid<index_t>& g, const Sample<index_t>& sample,
                                                index_t c0) {
  return ((c0 * g.taps.divisor + sample.k) * g.chunk + sample.nl) * g.plane.divisor + sample.p;
}

template <typename index_t>
__device__ __forceinline__ index_t grid_start() {
  return static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

template <typename index_t>
__device__ __forceinline__ index_t grid_stride() {
  return static_cast<index_t>(blockDim.x) * gridDim.x;
}

// columns[(c * K + k), nl * L + p] for the images n0 .. n0 + chunk of the batch: one thread per sample, looping
// over its offset group's channels.
template <typename scalar_t, typename index_t>
__global__ void im2col_kernel(KernelShape s, SampleGrid<index_t> g, const scalar_t* __restrict__ input,
                              const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                              scalar_t* __restrict__ columns) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t index = grid_start<index_t>(); index < g.total; index += grid_stride<index_t>()) {
    const Sample<index_t> sample = decode_sample(g, index);
    acc_t m;
    const DeformTaps<acc_t> t = sample_taps<scalar_t, acc_t>(s, g, offset, mask, sample, &m);
    const index_t c0 = sample.og * g.channels_per_group;
    index_t col = first_column(g, sample, c0);
    if (!t.any) {
      // A sample wholly outside the image is 0, whatever the mask (m * 0 would be NaN for an infinite mask).
      for (index_t cl = 0; cl < g.channels_per_group; ++cl, col += g.column_step) columns[col] = scalar_t(0);
      continue;
    }
    const TapOffsets<index_t> o = tap_offsets(t, g.width);
    index_t img = ((g.n0 + sample.nl) * g.channels + c0) * g.in_plane;
    for (index_t cl = 0; cl < g.channels_per_group; ++cl, col += g.column_step, img += g.in_plane) {
      const acc_t value = deform_bilinear_value<acc_t>(
          t, static_cast<acc_t>(input[img + o.o1]), static_cast<acc_t>(input[img + o.o2]),
          static_cast<acc_t>(input[img + o.o3]), static_cast<acc_t>(input[img + o.o4]));
      columns[col] = static_cast<scalar_t>(m * value);
    }
  }
}

// grad_input[img + o_i] += grad * w_i over the offset group's channels, at the sample's taps inside the image.
// kAllTaps: all four are (the common case), and the loop runs without a branch per atomic.
template <bool kAllTaps, typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ void scatter_channels(const SampleGrid<index_t>& g, const DeformTaps<acc_t>& t,
                                                 const TapOffsets<index_t>& o, acc_t m, index_t col, index_t img,
                                                 const scalar_t* __restrict__ grad_columns,
                                                 acc_t* __restrict__ grad_input) {
  for (index_t cl = 0; cl < g.channels_per_group; ++cl, col += g.column_step, img += g.in_plane) {
    const acc_t grad = m * static_cast<acc_t>(grad_columns[col]);
    if (kAllTaps || t.in1) gpuAtomicAdd(grad_input + (img + o.o1), grad * t.w1);
    if (kAllTaps || t.in2) gpuAtomicAdd(grad_input + (img + o.o2), grad * t.w2);
    if (kAllTaps || t.in3) gpuAtomicAdd(grad_input + (img + o.o3), grad * t.w3);
    if (kAllTaps || t.in4) gpuAtomicAdd(grad_input + (img + o.o4), grad * t.w4);
  }
}

// grad_input[n, c] += modulation * w_i * grad_columns at each real tap: one thread per sample, looping over its
// offset group's channels. The sums are in float for half and bfloat16 (grad_input is the op-math type).
template <typename scalar_t, typename index_t>
__global__ void col2im_kernel(KernelShape s, SampleGrid<index_t> g, const scalar_t* __restrict__ grad_columns,
                              const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                              at::opmath_type<scalar_t>* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t index = grid_start<index_t>(); index < g.total; index += grid_stride<index_t>()) {
    const Sample<index_t> sample = decode_sample(g, index);
    acc_t m;
    const DeformTaps<acc_t> t = sample_taps<scalar_t, acc_t>(s, g, offset, mask, sample, &m);
    if (!t.any) continue;
    const index_t c0 = sample.og * g.channels_per_group;
    const TapOffsets<index_t> o = tap_offsets(t, g.width);
    const index_t col = first_column(g, sample, c0);
    const index_t img = ((g.n0 + sample.nl) * g.channels + c0) * g.in_plane;
    if (t.in1 && t.in2 && t.in3 && t.in4) {
      scatter_channels<true>(g, t, o, m, col, img, grad_columns, grad_input);
    } else {
      scatter_channels<false>(g, t, o, m, col, img, grad_columns, grad_input);
    }
  }
}

// grad_offset[n, og, k, (y, x), p] and grad_mask[n, og, k, p]: sums over the offset group's channels of the
// column gradient times the coordinate gradient (or the value) of each channel's sample.
template <typename scalar_t, typename index_t>
__global__ void coordinate_grad_kernel(KernelShape s, SampleGrid<index_t> g,
                                       const scalar_t* __restrict__ grad_columns, const scalar_t* __restrict__ input,
                                       const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                                       scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t index = grid_start<index_t>(); index < g.total; index += grid_stride<index_t>()) {
    const Sample<index_t> sample = decode_sample(g, index);
    acc_t m;
    const DeformTaps<acc_t> t = sample_taps<scalar_t, acc_t>(s, g, offset, mask, sample, &m);
    acc_t s1 = 0, s2 = 0, s3 = 0, s4 = 0;
    if (t.touches) {
      const index_t c0 = sample.og * g.channels_per_group;
      const TapOffsets<index_t> o = tap_offsets(t, g.width);
      index_t col = first_column(g, sample, c0);
      index_t img = ((g.n0 + sample.nl) * g.channels + c0) * g.in_plane;
      for (index_t cl = 0; cl < g.channels_per_group; ++cl, col += g.column_step, img += g.in_plane) {
        const acc_t grad = static_cast<acc_t>(grad_columns[col]);
        // Taps outside the image were clamped onto it; their products are dropped by the shared functions.
        s1 += grad * static_cast<acc_t>(input[img + o.o1]);
        s2 += grad * static_cast<acc_t>(input[img + o.o2]);
        s3 += grad * static_cast<acc_t>(input[img + o.o3]);
        s4 += grad * static_cast<acc_t>(input[img + o.o4]);
      }
    }
    acc_t grad_y, grad_x;
    deform_coordinate_gradient<acc_t>(t, s1, s2, s3, s4, &grad_y, &grad_x);
    const index_t plane = g.plane.divisor;
    // A sample off the image has no offset gradient, whatever the mask (m * 0 would be NaN for an infinite one).
    grad_offset[sample.channel * 2 * plane + sample.p] = static_cast<scalar_t>(t.touches ? m * grad_y : acc_t(0));
    grad_offset[(sample.channel * 2 + 1) * plane + sample.p] =
        static_cast<scalar_t>(t.touches ? m * grad_x : acc_t(0));
    if (grad_mask) {
      grad_mask[sample.channel * plane + sample.p] =
          static_cast<scalar_t>(deform_bilinear_value<acc_t>(t, s1, s2, s3, s4));
    }
  }
}

// Images per chunk so that the columns fit max_column_elements() (at least one image).
int64_t images_per_chunk(const DeformConv2dShape& s) {
  const int64_t per_image = s.in_channels * s.kernel_h * s.kernel_w * s.out_h * s.out_w;
  return std::max<int64_t>(1, std::min<int64_t>(s.batch, max_column_elements() / std::max<int64_t>(1, per_image)));
}

template <typename scalar_t>
void im2col(const DeformConv2dShape& s, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
            int64_t n0, int64_t chunk, at::Tensor& columns) {
  with_index_type(narrow_indices(input.numel(), offset.numel(), columns.numel()), [&](auto zero) {
    using index_t = decltype(zero);
    const SampleGrid<index_t> g = sample_grid<index_t>(s, n0, chunk);
    EYECOOL_LAUNCH(num_blocks(g.total), kThreads, at::cuda::getCurrentCUDAStream(), im2col_kernel<scalar_t, index_t>)(
        kernel_shape(s), g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
        mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, columns.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor deform_conv2d_forward_cuda(const at::Tensor& input_in, const at::Tensor& offset_in,
                                      const at::Tensor& weight_in, const c10::optional<at::Tensor>& mask_in,
                                      const c10::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformConv2dShape s =
      check_deform_conv2d_inputs(input_in, offset_in, weight_in, mask_in, bias_in, stride, padding, dilation);
  at::cuda::CUDAGuard guard(input_in.device());
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input_in.options());
  if (output.numel() == 0) return output;
  const at::Tensor bias =
      bias_in.has_value() ? bias_in->contiguous().view({s.groups, s.out_channels / s.groups}) : at::Tensor();
  const at::Tensor input = input_in.contiguous();
  const at::Tensor offset = offset_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t c_per_group = s.in_channels / s.groups, out_per_group = s.out_channels / s.groups;
  const at::Tensor weight = weight_in.contiguous().view({s.groups, out_per_group, c_per_group * taps});
  const int64_t chunk = images_per_chunk(s);
  for (int64_t n0 = 0; n0 < s.batch; n0 += chunk) {
    const int64_t count = std::min(chunk, s.batch - n0);
    at::Tensor cols = at::empty({s.in_channels * taps, count * plane}, input.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_forward_cuda", [&] {
      im2col<scalar_t>(s, input, offset, mask, n0, count, cols);
    });
    // [groups, C_out_g, count * L] -> output[n0 : n0 + count] as [count, C_out, L]. The bias enters the GEMM
    // (addmm), so that half and bfloat16 outputs are rounded once, after it is added, as on the CPU.
    at::Tensor out = at::empty({s.groups, out_per_group, count * plane}, input.options());
    const at::Tensor cols_g = cols.view({s.groups, c_per_group * taps, count * plane});
    for (int64_t g = 0; g < s.groups; ++g) {
      at::Tensor out_g = out[g];
      if (bias.defined()) {
        at::addmm_out(out_g, bias[g].unsqueeze(1), weight[g], cols_g[g]);
      } else {
        at::mm_out(out_g, weight[g], cols_g[g]);
      }
    }
    output.narrow(0, n0, count).copy_(out.view({s.out_channels, count, s.out_h, s.out_w}).transpose(0, 1));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& input_in, const at::Tensor& offset_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& mask_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const DeformConv2dShape s =
      check_deform_conv2d_inputs(input_in, offset_in, weight_in, mask_in, c10::nullopt, stride, padding, dilation);
  check_deform_conv2d_grad(grad_in, s, input_in);
  at::cuda::CUDAGuard guard(input_in.device());
  const bool masked = mask_in.has_value();
  const auto acc_type = at::toOpMathType(input_in.scalar_type());
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t c_per_group = s.in_channels / s.groups, out_per_group = s.out_channels / s.groups;
  at::Tensor grad_input_acc = at::zeros({s.batch, s.in_channels, s.height, s.width}, input_in.options().dtype(acc_type));
  at::Tensor grad_offset = at::zeros(offset_in.sizes(), input_in.options());
  at::Tensor grad_mask = masked ? at::zeros(mask_in->sizes(), input_in.options()) : at::empty({0}, input_in.options());
  at::Tensor grad_weight_acc = at::zeros({s.groups, out_per_group, c_per_group * taps}, input_in.options().dtype(acc_type));
  const at::Tensor grad = grad_in.contiguous();
  if (s.batch > 0 && s.in_channels > 0 && s.out_channels > 0) {
    at::globalContext().alertNotDeterministic(
        "eyecool::_deform_conv2d_backward on CUDA (grad_input is accumulated with atomic adds)");
    const at::Tensor input = input_in.contiguous();
    const at::Tensor offset = offset_in.contiguous();
    const at::Tensor mask = masked ? mask_in->contiguous() : at::Tensor();
    const at::Tensor weight = weight_in.contiguous().view({s.groups, out_per_group, c_per_group * taps});
    const int64_t chunk = images_per_chunk(s);
    for (int64_t n0 = 0; n0 < s.batch; n0 += chunk) {
      const int64_t count = std::min(chunk, s.batch - n0);
      at::Tensor cols = at::empty({s.in_channels * taps, count * plane}, input.options());
      // grad[n0 : n0 + count] as [groups, C_out_g, count * L], the layout of the forward GEMM's result.
      const at::Tensor grad_g = grad.narrow(0, n0, count)
                                    .view({count, s.out_channels, plane})
                                    .transpose(0, 1)
                                    .reshape({s.groups, out_per_group, count * plane});
      at::Tensor grad_cols = at::empty({s.groups, c_per_group * taps, count * plane}, input.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cuda", [&] {
        im2col<scalar_t>(s, input, offset, mask, n0, count, cols);
        const at::Tensor cols_g = cols.view({s.groups, c_per_group * taps, count * plane});
        for (int64_t g = 0; g < s.groups; ++g) {
          // In the op-math type: a half product of one chunk can overflow (65504) before the float sum.
          grad_weight_acc[g].addmm_(grad_g[g].to(acc_type), cols_g[g].t().to(acc_type));
          at::Tensor grad_cols_g = grad_cols[g];
          at::mm_out(grad_cols_g, weight[g].t(), grad_g[g]);
        }
        const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
        with_index_type(narrow_indices(input.numel(), offset.numel(), grad_cols.numel()), [&](auto zero) {
          using index_t = decltype(zero);
          const SampleGrid<index_t> sg = sample_grid<index_t>(s, n0, count);
          const int64_t blocks = num_blocks(sg.total);
          EYECOOL_LAUNCH(blocks, kThreads, at::cuda::getCurrentCUDAStream(), col2im_kernel<scalar_t, index_t>)(
              kernel_shape(s), sg, grad_cols.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr,
              grad_input_acc.data_ptr<at::opmath_type<scalar_t>>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          EYECOOL_LAUNCH(blocks, kThreads, at::cuda::getCurrentCUDAStream(),
                         coordinate_grad_kernel<scalar_t, index_t>)(
              kernel_shape(s), sg, grad_cols.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
              offset.data_ptr<scalar_t>(), mask_ptr, grad_offset.data_ptr<scalar_t>(),
              masked ? grad_mask.data_ptr<scalar_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
  }
  const auto out_type = input_in.scalar_type();
  at::Tensor grad_weight = grad_weight_acc.view(weight_in.sizes()).to(out_type);
  at::Tensor grad_bias = grad.sum({0, 2, 3}, /*keepdim=*/false, acc_type).to(out_type);
  return {grad_input_acc.to(out_type), grad_offset, grad_weight, grad_mask, grad_bias};
}

}  // namespace
}  // namespace eyecool

EYECOOL_CUDA_LIBRARY_IMPL(m) {
  m.impl("deform_conv2d", &eyecool::deform_conv2d_forward_cuda);
  m.impl("_deform_conv2d_backward", &eyecool::deform_conv2d_backward_cuda);
}
