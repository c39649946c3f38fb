// pq_pair_counts on CUDA: encode every pixel's (gt_id, pred_id) pair into an int64 key (pq_pair_counts.h, the
// code the CPU tests exercise), sort the keys of each image on the device and count runs of equal keys.
//
// The keys are sorted as one [B, H * W] tensor along its rows: a segmented sort, so they end up ordered by
// (image, key) without packing the image into the key (ids use 62 of its bits). The output length is data
// dependent, so the op synchronises once, to read the number of runs and whether an id was out of range together
// (an error then takes one more, to name the pixel).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "pq_pair_counts.h"
#include "cuda/launch.cuh"

namespace eyecool {
namespace {

template <typename id_t>
__global__ void encode_kernel(int64_t total, const id_t* __restrict__ gt, const id_t* __restrict__ pred,
                              int64_t* __restrict__ keys) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)blockDim.x * gridDim.x) {
    keys[i] = encode_pair(static_cast<int64_t>(gt[i]), static_cast<int64_t>(pred[i]));
  }
}

// run_start[i] = 1 where sorted element i begins a new (image, key) run: a new image every `pixels` elements.
__global__ void run_start_kernel(int64_t total, int64_t pixels, const int64_t* __restrict__ keys,
                                 bool* __restrict__ run_start) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)blockDim.x * gridDim.x) {
    run_start[i] = i % pixels == 0 || keys[i] != keys[i - 1];
  }
}

// One output row per run: decode its key, and its count from the next run's start.
__global__ void decode_kernel(int64_t runs, int64_t total, int64_t pixels, const int64_t* __restrict__ starts,
                              const int64_t* __restrict__ keys, int64_t* __restrict__ image_out,
                              int64_t* __restrict__ gt_out, int64_t* __restrict__ pred_out,
                              int64_t* __restrict__ counts) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < runs; r += (int64_t)blockDim.x * gridDim.x) {
    const int64_t start = starts[r];
    const int64_t end = r + 1 < runs ? starts[r + 1] : total;
    const int64_t key = keys[start];
    image_out[r] = start / pixels;
    gt_out[r] = pair_gt_id(key);
    pred_out[r] = pair_pred_id(key);
    counts[r] = end - start;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pq_pair_counts_cuda(const at::Tensor& gt_in,
                                                                                const at::Tensor& pred_in) {
  check_pq_pair_counts_inputs(gt_in, pred_in);
  at::cuda::CUDAGuard guard(gt_in.device());
  const at::Tensor gt = gt_in.contiguous();
  const at::Tensor pred = pred_in.contiguous();
  const int64_t batch = gt.size(0), pixels = gt.size(1) * gt.size(2);
  const int64_t total = gt.numel();
  const auto options = gt.options().dtype(at::kLong);
  if (total == 0) {
    return {at::empty({0}, options), at::empty({0}, options), at::empty({0}, options), at::empty({0}, options)};
  }
  const auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor keys = at::empty({total}, options);
  AT_DISPATCH_INTEGRAL_TYPES(gt.scalar_type(), "pq_pair_counts_cuda", [&] {
    EYECOOL_LAUNCH(num_blocks(total), kThreads, stream, encode_kernel<scalar_t>)(
        total, gt.data_ptr<scalar_t>(), pred.data_ptr<scalar_t>(), keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const at::Tensor sorted_keys =
      std::get<0>(at::sort(keys.view({batch, pixels}), /*stable=*/false, /*dim=*/1, /*descending=*/false)).view(-1);

  at::Tensor run_start = at::empty({total}, options.dtype(at::kBool));
  EYECOOL_LAUNCH(num_blocks(total), kThreads, stream, run_start_kernel)(total, pixels, sorted_keys.data_ptr<int64_t>(),
                                                                        run_start.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The one synchronisation: the number of runs, and the smallest key (invalid ids encode to -1, the smallest).
  const at::Tensor summary = at::stack({run_start.sum(), at::min(sorted_keys)}).cpu();
  const int64_t runs = summary[0].item<int64_t>();
  if (summary[1].item<int64_t>() == kInvalidPairKey) {
    // The first invalid pixel: keys are in pixel order before the sort.
    fail_invalid_segment_id(gt, pred, at::argmax((keys == kInvalidPairKey).to(at::kInt)).item<int64_t>());
  }
  const at::Tensor starts = at::nonzero_static(run_start, runs).view(-1);  // its size is known: no second sync

  at::Tensor image_out = at::empty({runs}, options);
  at::Tensor gt_out = at::empty({runs}, options);
  at::Tensor pred_out = at::empty({runs}, options);
  at::Tensor counts = at::empty({runs}, options);
  EYECOOL_LAUNCH(num_blocks(runs), kThreads, stream, decode_kernel)(
      runs, total, pixels, starts.data_ptr<int64_t>(), sorted_keys.data_ptr<int64_t>(), image_out.data_ptr<int64_t>(),
      gt_out.data_ptr<int64_t>(), pred_out.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {image_out, gt_out, pred_out, counts};
}

}  // namespace
}  // namespace eyecool

EYECOOL_CUDA_LIBRARY_IMPL(m) { m.impl("pq_pair_counts", &eyecool::pq_pair_counts_cuda); }
