// pq_pair_counts on the CPU: one pass over the pixels, counting (gt_id, pred_id) pairs in a small hash table.
//
// Panoptic id maps are made of large flat regions, so consecutive pixels almost always carry the same pair:
// the pass keeps a run (key, length) and touches the table only when the pair changes, which makes it about a
// load and a compare per pixel instead of the sort that np.unique needs.
//
// Work is split into (image, row band) units so that one image still uses every thread; each unit fills its
// own table, then one task per image merges its bands and sorts the distinct pairs. The result (integer
// counts, sorted keys) is identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/pair_counter.h"
#include "pq_pair_counts.h"

namespace eyecool {
namespace {

constexpr int64_t kMinPixelsPerBand = int64_t(1) << 20;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pq_pair_counts_cpu(const at::Tensor& gt_in,
                                                                               const at::Tensor& pred_in) {
  check_pq_pair_counts_inputs(gt_in, pred_in);
  const at::Tensor gt = gt_in.contiguous();
  const at::Tensor pred = pred_in.contiguous();
  const int64_t batch = gt.size(0), height = gt.size(1), width = gt.size(2);
  const int64_t pixels = height * width;

  // Row bands per image: enough units to occupy every thread, but only for large images: one pass over a
  // COCO-sized image takes well under a millisecond, less than waking a busy machine's threads can cost.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t wanted = batch >= threads ? 1 : (threads + batch - 1) / std::max<int64_t>(batch, 1);
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(wanted, pixels / kMinPixelsPerBand));
  const int64_t rows_per_band = (height + bands - 1) / bands;

  std::vector<std::vector<KeyCount>> band_pairs(static_cast<size_t>(batch * bands));
  std::atomic<int64_t> first_bad{-1};  // flat pixel index of an invalid id, if any

  AT_DISPATCH_INTEGRAL_TYPES(gt.scalar_type(), "pq_pair_counts_cpu", [&] {
    const scalar_t* gt_data = gt.data_ptr<scalar_t>();
    const scalar_t* pred_data = pred.data_ptr<scalar_t>();
    at::parallel_for(0, batch * bands, 1, [&](int64_t unit_begin, int64_t unit_end) {
      for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const int64_t image = unit / bands, band = unit % bands;
        const int64_t begin = std::min(band * rows_per_band, height) * width;
        const int64_t end = std::min((band + 1) * rows_per_band, height) * width;
        const int64_t offset = image * pixels;
        PairCounter counter;
        int64_t bad_pixel = -1;
        if (!count_pixels(gt_data + offset, pred_data + offset, begin, end, counter, bad_pixel)) {
          int64_t expected = -1;
          first_bad.compare_exchange_strong(expected, offset + bad_pixel);
          return;
        }
        counter.append_to(band_pairs[unit]);
      }
    });
  });
  if (first_bad.load() >= 0) fail_invalid_segment_id(gt, pred, first_bad.load());

  // Merge the bands of each image and sort its distinct pairs.
  std::vector<std::vector<KeyCount>> image_pairs(static_cast<size_t>(batch));
  at::parallel_for(0, batch, 1, [&](int64_t image_begin, int64_t image_end) {
    for (int64_t image = image_begin; image < image_end; ++image) {
      std::vector<KeyCount>& merged = image_pairs[image];
      for (int64_t band = 0; band < bands; ++band) {
        const auto& part = band_pairs[image * bands + band];
        merged.insert(merged.end(), part.begin(), part.end());
      }
      std::sort(merged.begin(), merged.end());
      size_t out = 0;
      for (size_t i = 0; i < merged.size(); ++i) {
        if (out > 0 && merged[out - 1].first == merged[i].first) {
          merged[out - 1].second += merged[i].second;
        } else {
          merged[out++] = merged[i];
        }
      }
      merged.resize(out);
    }
  });

  std::vector<int64_t> starts(static_cast<size_t>(batch) + 1, 0);
  for (int64_t image = 0; image < batch; ++image) starts[image + 1] = starts[image] + image_pairs[image].size();
  const int64_t total = starts[batch];
  const auto options = gt.options().dtype(at::kLong);
  at::Tensor image_index = at::empty({total}, options);
  at::Tensor gt_out = at::empty({total}, options);
  at::Tensor pred_out = at::empty({total}, options);
  at::Tensor counts = at::empty({total}, options);
  int64_t* image_ptr = image_index.data_ptr<int64_t>();
  int64_t* gt_ptr = gt_out.data_ptr<int64_t>();
  int64_t* pred_ptr = pred_out.data_ptr<int64_t>();
  int64_t* count_ptr = counts.data_ptr<int64_t>();
  for (int64_t image = 0; image < batch; ++image) {
    int64_t row = starts[image];
    for (const KeyCount& kc : image_pairs[image]) {
      image_ptr[row] = image;
      gt_ptr[row] = pair_gt_id(kc.first);
      pred_ptr[row] = pair_pred_id(kc.first);
      count_ptr[row] = kc.second;
      ++row;
    }
  }
  return {image_index, gt_out, pred_out, counts};
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) { m.impl("pq_pair_counts", &eyecool::pq_pair_counts_cpu); }
