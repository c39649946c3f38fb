// pq_pair_counts on CUDA: encode every pixel's (gt_id, pred_id) pair into an int64 key (pq_pair_counts.h, the
// code the CPU tests exercise), sort the keys on the device and count runs of equal (image, key).
//
// One image: a single sort. A batch: a stable sort of the keys, then a stable sort of their image indices,
// which leaves the keys sorted by (image, key) without packing the image into the key (ids use 62 of its bits).
// The output length is data dependent, so the op synchronises once to read it (and to learn whether an id was
// out of range).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
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

// run_start[i] = 1 where sorted element i begins a new (image, key) run.
__global__ void run_start_kernel(int64_t total, const int64_t* __restrict__ keys, const int64_t* __restrict__ image,
                                 bool* __restrict__ run_start) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)blockDim.x * gridDim.x) {
    run_start[i] = i == 0 || keys[i] != keys[i - 1] || (image != nullptr && image[i] != image[i - 1]);
  }
}

// One output row per run: decode its key, and its count from the next run's start.
__global__ void decode_kernel(int64_t runs, int64_t total, const int64_t* __restrict__ starts,
                              const int64_t* __restrict__ keys, const int64_t* __restrict__ image,
                              int64_t* __restrict__ image_out, int64_t* __restrict__ gt_out,
                              int64_t* __restrict__ pred_out, int64_t* __restrict__ counts) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < runs; r += (int64_t)blockDim.x * gridDim.x) {
    const int64_t start = starts[r];
    const int64_t end = r + 1 < runs ? starts[r + 1] : total;
    const int64_t key = keys[start];
    image_out[r] = image != nullptr ? image[start] : 0;
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
    encode_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(total, gt.data_ptr<scalar_t>(),
                                                                         pred.data_ptr<scalar_t>(),
                                                                         keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  at::Tensor sorted_keys, image;
  if (batch == 1) {
    sorted_keys = std::get<0>(at::sort(keys));
  } else {
    at::Tensor order;
    std::tie(sorted_keys, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    at::Tensor image_of = at::div(order, pixels, "floor");
    at::Tensor by_image;
    std::tie(image, by_image) = at::sort(image_of, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    sorted_keys = sorted_keys.index_select(0, by_image);
  }
  // Invalid ids encode to -1, the smallest key: one read tells whether any is present.
  const int64_t smallest = at::min(sorted_keys).item<int64_t>();
  TORCH_CHECK(smallest != kInvalidPairKey, "pq_pair_counts: segment ids must be in [0, ", kMaxSegmentId,
              "]; gt_ids or pred_ids holds a value outside that range");

  at::Tensor run_start = at::empty({total}, options.dtype(at::kBool));
  run_start_kernel<<<num_blocks(total), kThreads, 0, stream>>>(
      total, sorted_keys.data_ptr<int64_t>(), image.defined() ? image.data_ptr<int64_t>() : nullptr,
      run_start.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor starts = at::nonzero(run_start).view(-1);  // synchronises for its length
  const int64_t runs = starts.size(0);

  at::Tensor image_out = at::empty({runs}, options);
  at::Tensor gt_out = at::empty({runs}, options);
  at::Tensor pred_out = at::empty({runs}, options);
  at::Tensor counts = at::empty({runs}, options);
  decode_kernel<<<num_blocks(runs), kThreads, 0, stream>>>(
      runs, total, starts.data_ptr<int64_t>(), sorted_keys.data_ptr<int64_t>(),
      image.defined() ? image.data_ptr<int64_t>() : nullptr, image_out.data_ptr<int64_t>(),
      gt_out.data_ptr<int64_t>(), pred_out.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {image_out, gt_out, pred_out, counts};
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CUDA, m) { m.impl("pq_pair_counts", &eyecool::pq_pair_counts_cuda); }
