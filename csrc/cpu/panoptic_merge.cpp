// UPSNet panoptic merge on the CPU, parallel over output rows. Per row, the semantic part of the stack (the stuff
// argmax and the max thing logit) runs with the channel loop outside and the pixel loop inside, reading each
// channel's row contiguously (resized on the fly with per-pixel taps computed once per row); then every pixel
// finishes with the shared instance/unknown decision (panoptic_merge.h, the code the CUDA kernel runs). The
// offers are made in the same order and with the same arithmetic as the per-pixel function, so the labels are
// identical. Nothing is materialised: no [S + M + 1, H, W] stack, no pasted masks, no resized logits.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "panoptic_merge.h"

namespace eyecool {
namespace {

at::Tensor upsnet_panoptic_merge_cpu(const at::Tensor& sem_logits, int64_t num_stuff, const at::Tensor& boxes_in,
                                     const at::Tensor& classes_in, const at::Tensor& mask_logits_in, int64_t height,
                                     int64_t width) {
  check_panoptic_merge_inputs(sem_logits, num_stuff, boxes_in, classes_in, mask_logits_in, height, width);
  at::Tensor labels = at::empty({height, width}, sem_logits.options().dtype(at::kLong));
  if (labels.numel() == 0) return labels;
  const at::Tensor sem = sem_logits.contiguous();
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor classes = classes_in.contiguous();
  const at::Tensor masks = mask_logits_in.contiguous();
  const int64_t channels = sem.size(0), in_h = sem.size(1), in_w = sem.size(2);
  const int64_t num_instances = boxes.size(0), mask_h = masks.size(1), mask_w = masks.size(2);
  const int64_t num_things = channels - num_stuff;
  const int64_t* cls = classes.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_instances; ++i) {
    TORCH_CHECK(cls[i] >= 0 && cls[i] < num_things, "upsnet_panoptic_merge: classes[", i,
                "] must be a thing index in [0, ", num_things, "), got ", cls[i]);
  }
  int64_t* out = labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sem.scalar_type(), "upsnet_panoptic_merge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Pixel = SemanticPixel<acc_t, scalar_t>;
    const scalar_t* sem_ptr = sem.data_ptr<scalar_t>();
    const scalar_t* box_ptr = boxes.data_ptr<scalar_t>();
    const scalar_t* mask_ptr = masks.data_ptr<scalar_t>();
    at::parallel_for(0, height, 1, [&](int64_t begin, int64_t end) {
      std::vector<Pixel> pixels(width);
      std::vector<StackArgmax<acc_t>> best(width);
      std::vector<acc_t> thing_max(width);
      for (int64_t py = begin; py < end; ++py) {
        for (int64_t px = 0; px < width; ++px) {
          pixels[px] = semantic_pixel<acc_t, scalar_t>(sem_ptr, in_h, in_w, height, width, px, py);
          best[px] = StackArgmax<acc_t>{acc_t(0), -1};
        }
        // The semantic candidates of upsnet_semantic_candidates, channel by channel for the whole row, with the
        // arithmetic of SemanticPixel::operator() (a direct read, or w00 * p00 + w01 * p01 + w10 * p10 + w11 * p11).
        const bool resized = in_h != height || in_w != width;
        const int64_t plane = in_h * in_w;
        const auto for_channel_row = [&](int64_t c, auto&& consume) {
          if (!resized) {
            const scalar_t* row = sem_ptr + c * plane + py * in_w;
            for (int64_t px = 0; px < width; ++px) consume(px, static_cast<acc_t>(row[px]));
          } else {
            for (int64_t px = 0; px < width; ++px) consume(px, pixels[px](c));
          }
        };
        for (int64_t c = 0; c < num_stuff; ++c) {
          for_channel_row(c, [&](int64_t px, acc_t v) { stack_argmax_offer(best[px], v, c); });
        }
        for_channel_row(num_stuff, [&](int64_t px, acc_t v) { thing_max[px] = v; });
        for (int64_t c = num_stuff + 1; c < channels; ++c) {
          for_channel_row(c, [&](int64_t px, acc_t v) { thing_max[px] = v > thing_max[px] ? v : thing_max[px]; });
        }
        for (int64_t px = 0; px < width; ++px) {
          out[py * width + px] = upsnet_instance_candidates<acc_t>(pixels[px], best[px], thing_max[px], channels,
                                                                   num_stuff, box_ptr, cls, mask_ptr, num_instances,
                                                                   mask_h, mask_w, px, py);
        }
      }
    });
  });
  return labels;
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) { m.impl("upsnet_panoptic_merge", &eyecool::upsnet_panoptic_merge_cpu); }
