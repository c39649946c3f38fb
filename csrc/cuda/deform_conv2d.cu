// Deformable convolution on CUDA as im2col + GEMM, over chunks of the batch so that the column buffer stays
// bounded. The sampling arithmetic (position, taps, value, coordinate gradient) comes from deform_conv2d.h, the
// code the CPU tests exercise.
//   forward:  columns[c * K + k, n * L + p] (one thread per element, pixels fastest for coalesced writes), then
//             out_g = W_g @ columns_g per weight group (at::mm, so cuBLAS).
//   backward: column gradient W_g^T @ grad_g (GEMM); grad_input by scattering it with atomic adds (offsets can
//             send any output to any input pixel, so there is no gather form; the op reports itself to
//             torch.use_deterministic_algorithms); grad_offset and grad_mask by one thread per (image, offset
//             group, kernel point, pixel) looping over the group's channels (no atomics); grad_weight by GEMM.
// float, double, half and bfloat16; the sampling and the accumulators of the gradients run in float (opmath).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

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

// The shapes the kernels need, passed by value.
struct KernelShape {
  int64_t channels, height, width, out_h, out_w, kernel_h, kernel_w, offset_groups;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

KernelShape kernel_shape(const DeformConv2dShape& s) {
  return {s.in_channels, s.height,   s.width,    s.out_h,      s.out_w,      s.kernel_h,   s.kernel_w,
          s.offset_groups, s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dilation_h, s.dilation_w};
}

// The taps and modulation of (image n, offset group og, kernel point k, output pixel p).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ DeformTaps<acc_t> sample_taps(const KernelShape& s, const scalar_t* __restrict__ offset,
                                                         const scalar_t* __restrict__ mask, int64_t n, int64_t og,
                                                         int64_t k, int64_t p, acc_t* modulation) {
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t oy = p / s.out_w, ox = p % s.out_w;
  const int64_t ki = k / s.kernel_w, kj = k % s.kernel_w;
  const int64_t channel = (n * s.offset_groups + og) * taps + k;
  const scalar_t* off = offset + channel * 2 * plane + p;
  const acc_t y = deform_sampling_position<acc_t>(oy, ki, s.stride_h, s.pad_h, s.dilation_h,
                                                  static_cast<acc_t>(off[0]));
  const acc_t x = deform_sampling_position<acc_t>(ox, kj, s.stride_w, s.pad_w, s.dilation_w,
                                                  static_cast<acc_t>(off[plane]));
  *modulation = mask ? static_cast<acc_t>(mask[channel * plane + p]) : acc_t(1);
  return deform_bilinear_taps<acc_t>(s.height, s.width, y, x);
}

// columns[(c * K + k), nl * L + p] for the images n0 .. n0 + chunk of the batch.
template <typename scalar_t>
__global__ void im2col_kernel(int64_t total, KernelShape s, const scalar_t* __restrict__ input,
                              const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t n0,
                              int64_t chunk, scalar_t* __restrict__ columns) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t channels_per_offset_group = s.channels / s.offset_groups;
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = index % plane;
    const int64_t nl = (index / plane) % chunk;
    const int64_t k = (index / plane / chunk) % taps;
    const int64_t c = index / plane / chunk / taps;
    const int64_t n = n0 + nl;
    acc_t m;
    const DeformTaps<acc_t> t = sample_taps<scalar_t, acc_t>(s, offset, mask, n, c / channels_per_offset_group, k, p, &m);
    acc_t value = 0;
    if (t.any) {
      const scalar_t* img = input + (n * s.channels + c) * s.height * s.width;
      value = deform_bilinear_value<acc_t>(t, static_cast<acc_t>(img[t.y_low * s.width + t.x_low]),
                                           static_cast<acc_t>(img[t.y_low * s.width + t.x_high]),
                                           static_cast<acc_t>(img[t.y_high * s.width + t.x_low]),
                                           static_cast<acc_t>(img[t.y_high * s.width + t.x_high]));
    }
    // A sample wholly outside the image is 0, whatever the mask (m * 0 would be NaN for an infinite mask).
    columns[(c * taps + k) * chunk * plane + nl * plane + p] = t.any ? static_cast<scalar_t>(m * value) : scalar_t(0);
  }
}

// grad_input[n, c] += modulation * w_i * grad_columns at each real tap.
template <typename scalar_t>
__global__ void col2im_kernel(int64_t total, KernelShape s, const scalar_t* __restrict__ grad_columns,
                              const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask, int64_t n0,
                              int64_t chunk, at::opmath_type<scalar_t>* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t channels_per_offset_group = s.channels / s.offset_groups;
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = index % plane;
    const int64_t nl = (index / plane) % chunk;
    const int64_t k = (index / plane / chunk) % taps;
    const int64_t c = index / plane / chunk / taps;
    const int64_t n = n0 + nl;
    acc_t m;
    const DeformTaps<acc_t> t = sample_taps<scalar_t, acc_t>(s, offset, mask, n, c / channels_per_offset_group, k, p, &m);
    if (!t.any) continue;
    const acc_t g = m * static_cast<acc_t>(grad_columns[index]);
    acc_t* img = grad_input + (n * s.channels + c) * s.height * s.width;
    if (t.in1) gpuAtomicAdd(img + t.y_low * s.width + t.x_low, g * t.w1);
    if (t.in2) gpuAtomicAdd(img + t.y_low * s.width + t.x_high, g * t.w2);
    if (t.in3) gpuAtomicAdd(img + t.y_high * s.width + t.x_low, g * t.w3);
    if (t.in4) gpuAtomicAdd(img + t.y_high * s.width + t.x_high, g * t.w4);
  }
}

// grad_offset[n, og, k, (y, x), p] and grad_mask[n, og, k, p]: sums over the offset group's channels of the
// column gradient times the coordinate gradient (or the value) of each channel's sample.
template <typename scalar_t>
__global__ void coordinate_grad_kernel(int64_t total, KernelShape s, const scalar_t* __restrict__ grad_columns,
                                       const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                                       const scalar_t* __restrict__ mask, int64_t n0, int64_t chunk,
                                       scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t channels_per_offset_group = s.channels / s.offset_groups;
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = index % plane;
    const int64_t k = (index / plane) % taps;
    const int64_t og = (index / plane / taps) % s.offset_groups;
    const int64_t nl = index / plane / taps / s.offset_groups;
    const int64_t n = n0 + nl;
    acc_t m;
    const DeformTaps<acc_t> t = sample_taps<scalar_t, acc_t>(s, offset, mask, n, og, k, p, &m);
    acc_t s1 = 0, s2 = 0, s3 = 0, s4 = 0;
    if (t.touches) {
      for (int64_t cl = 0; cl < channels_per_offset_group; ++cl) {
        const int64_t c = og * channels_per_offset_group + cl;
        const acc_t g = static_cast<acc_t>(grad_columns[(c * taps + k) * chunk * plane + nl * plane + p]);
        const scalar_t* img = input + (n * s.channels + c) * s.height * s.width;
        // Taps outside the image were clamped onto it; their products are dropped by the shared functions.
        s1 += g * static_cast<acc_t>(img[t.y_low * s.width + t.x_low]);
        s2 += g * static_cast<acc_t>(img[t.y_low * s.width + t.x_high]);
        s3 += g * static_cast<acc_t>(img[t.y_high * s.width + t.x_low]);
        s4 += g * static_cast<acc_t>(img[t.y_high * s.width + t.x_high]);
      }
    }
    acc_t grad_y, grad_x;
    deform_coordinate_gradient<acc_t>(t, s1, s2, s3, s4, &grad_y, &grad_x);
    const int64_t channel = (n * s.offset_groups + og) * taps + k;
    grad_offset[channel * 2 * plane + p] = static_cast<scalar_t>(m * grad_y);
    grad_offset[(channel * 2 + 1) * plane + p] = static_cast<scalar_t>(m * grad_x);
    if (grad_mask) grad_mask[channel * plane + p] = static_cast<scalar_t>(deform_bilinear_value<acc_t>(t, s1, s2, s3, s4));
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
  const int64_t total = s.in_channels * s.kernel_h * s.kernel_w * chunk * s.out_h * s.out_w;
  EYECOOL_LAUNCH(num_blocks(total), kThreads, at::cuda::getCurrentCUDAStream(), im2col_kernel<scalar_t>)(
      total, kernel_shape(s), input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
      mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, n0, chunk, columns.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
        const KernelShape ks = kernel_shape(s);
        const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
        const int64_t total = s.in_channels * taps * count * plane;
        EYECOOL_LAUNCH(num_blocks(total), kThreads, at::cuda::getCurrentCUDAStream(), col2im_kernel<scalar_t>)(
            total, ks, grad_cols.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr, n0, count,
            grad_input_acc.data_ptr<at::opmath_type<scalar_t>>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t coord_total = count * s.offset_groups * taps * plane;
        EYECOOL_LAUNCH(num_blocks(coord_total), kThreads, at::cuda::getCurrentCUDAStream(), coordinate_grad_kernel<scalar_t>)(
            coord_total, ks, grad_cols.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
            mask_ptr, n0, count, grad_offset.data_ptr<scalar_t>(), masked ? grad_mask.data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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
