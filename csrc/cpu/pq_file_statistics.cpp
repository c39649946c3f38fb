// panoptic_png_file_pq_statistics: one image's panoptic-quality statistics from its gt and predicted PNG files,
// in one GIL-free call, so that pq_compute's worker threads hold no GIL per image. Both files are read and
// inflated by the panoptic PNG reader (cpu/panoptic_png_reader.h), their rows unfiltered side by side and their
// (gt, pred) pairs counted row by row, without either id map ever being written (at COCO sizes, writing and
// re-reading two fresh [H, W] int32 maps, page faults included, costs more than the unfiltering itself); then
// the segments are matched by panopticapi's rules (cpu/pq_match.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/pair_counter.h"
#include "cpu/panoptic_png_reader.h"
#include "cpu/pq_match.h"

namespace eyecool {
namespace {

// The (gt, pred) runs of one row pair of equal bytes per pixel, found on the bytes: a run ends where a byte of
// either row differs from the byte one pixel to its left. The difference mask is one vectorised pass; the scan
// then skips 8 mask bytes at a time, so a row costs about as much as reading it, however its pixels are laid
// out. (For RGBA an alpha change splits a run into two of the same key, which the counts add up again.)
template <int BPP>
class RowRuns {
 public:
  explicit RowRuns(int64_t width) : width_(width), length_(width * BPP), diff_(length_ + 8, 0) {}

  void count(const uint8_t* gt, const uint8_t* pred, RunList& runs) {
    uint8_t* diff = diff_.data();
    for (int64_t j = BPP; j < length_; ++j) diff[j] = (gt[j] ^ gt[j - BPP]) | (pred[j] ^ pred[j - BPP]);
    int64_t run_start = 0;
    for (int64_t chunk = 0; chunk < length_; chunk += 8) {
      uint64_t word;
      std::memcpy(&word, diff + chunk, sizeof(word));  // bytes past the row are zero
      while (word != 0) {
        const int byte = __builtin_ctzll(word) >> 3;
        const int64_t pixel = (chunk + byte) / BPP;
        if (pixel > run_start) {
          add_run(gt, pred, run_start, pixel, runs);
          run_start = pixel;
        }
        word &= ~(uint64_t{0xFF} << (8 * byte));
      }
    }
    add_run(gt, pred, run_start, width_, runs);
  }

 private:
  static void add_run(const uint8_t* gt, const uint8_t* pred, int64_t begin, int64_t end, RunList& runs) {
    // Ids of a PNG are below 2^24, so every pair encodes.
    runs.add(encode_pair(pixel_segment_id(gt + begin * BPP), pixel_segment_id(pred + begin * BPP)), end - begin);
  }

  int64_t width_, length_;
  std::vector<uint8_t> diff_;  // the row's difference mask, 8 bytes longer so that whole words can be read
};

// Counts the pairs row by row. A row where neither image changes adds the previous row's runs again, so a
// flat region costs one zero test per row and side. Rows of equal bytes per pixel are split into runs on their
// bytes (RowRuns); an RGB image against an RGBA one goes through the two rows' ids.
template <int GT_BPP, int PRED_BPP>
void count_png_pairs(const uint8_t* gt_src, const uint8_t* pred_src, int64_t height, int64_t width,
                     PairCounter& counter) {
  RowDecoder<GT_BPP> gt(gt_src, width, "panoptic_png_file_pq_statistics");
  RowDecoder<PRED_BPP> pred(pred_src, width, "panoptic_png_file_pq_statistics");
  RowRuns<GT_BPP> byte_runs(GT_BPP == PRED_BPP ? width : 0);
  std::vector<int32_t> gt_ids(GT_BPP == PRED_BPP ? 0 : width), pred_ids(GT_BPP == PRED_BPP ? 0 : width);
  RunList row;
  int64_t repeats = 0;  // rows that repeat row.runs and are not counted yet
  auto flush = [&] {
    for (const KeyCount& run : row.runs) counter.add(run.first, run.second * repeats);
    repeats = 0;
  };
  for (int64_t y = 0; y < height; ++y) {
    // Both sides decode their row even if the other repeats: each keeps its own previous row.
    const bool gt_changed = gt.next(y);
    const bool pred_changed = pred.next(y);
    if (y > 0 && !gt_changed && !pred_changed) {
      ++repeats;
      continue;
    }
    flush();
    row.runs.clear();
    if constexpr (GT_BPP == PRED_BPP) {
      byte_runs.count(gt.row(), pred.row(), row);
    } else {
      row_segment_ids<GT_BPP>(gt.row(), width, gt_ids.data());
      row_segment_ids<PRED_BPP>(pred.row(), width, pred_ids.data());
      int64_t bad_pixel = -1;
      count_pixels(gt_ids.data(), pred_ids.data(), 0, width, row, bad_pixel);  // PNG ids always encode
    }
    repeats = 1;
  }
  flush();
}

template <int GT_BPP>
void count_png_pairs_for(const uint8_t* gt_src, const uint8_t* pred_src, int64_t height, int64_t width,
                         int64_t pred_channels, PairCounter& counter) {
  if (pred_channels == 3) {
    count_png_pairs<GT_BPP, 3>(gt_src, pred_src, height, width, counter);
  } else {
    count_png_pairs<GT_BPP, 4>(gt_src, pred_src, height, width, counter);
  }
}

// The distinct (gt, pred) pairs of two images' scanlines (checked sizes, height and width > 0) and their pixel
// counts, sorted by key.
std::vector<KeyCount> scanline_pair_list(const uint8_t* gt_src, const uint8_t* pred_src, int64_t height,
                                         int64_t width, int64_t gt_channels, int64_t pred_channels) {
  PairCounter counter;
  if (gt_channels == 3) {
    count_png_pairs_for<3>(gt_src, pred_src, height, width, pred_channels, counter);
  } else {
    count_png_pairs_for<4>(gt_src, pred_src, height, width, pred_channels, counter);
  }
  std::vector<KeyCount> pairs;
  counter.append_to(pairs);
  std::sort(pairs.begin(), pairs.end());
  return pairs;
}

// A [rows, n] int64 CPU table of segments (rows: ids ascending, category index, then iscrowd and area for gt).
SegmentRows segment_rows(const at::Tensor& table, int64_t rows, int64_t num_categories, const char* name) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.size(0) == rows && table.is_contiguous(),
              "panoptic_png_file_pq_statistics: ", name, " must be a contiguous int64 CPU tensor [", rows,
              ", segments], got ", table.scalar_type(), " of shape ", table.sizes());
  const int64_t n = table.size(1);
  const int64_t* data = table.data_ptr<int64_t>();
  SegmentRows out{data, data + n, rows > 2 ? data + 2 * n : nullptr, rows > 3 ? data + 3 * n : nullptr, n};
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(out.category[i] >= 0 && out.category[i] < num_categories, "panoptic_png_file_pq_statistics: ", name,
                " row ", i, " has category index ", out.category[i], ", expected [0, ", num_categories, ")");
    TORCH_CHECK(i == 0 || out.ids[i - 1] < out.ids[i], "panoptic_png_file_pq_statistics: ", name,
                " ids must be strictly ascending");
  }
  return out;
}

void check_crowd_of_category(const at::Tensor& crowd_of_category, int64_t num_categories) {
  TORCH_CHECK(crowd_of_category.device().is_cpu() && crowd_of_category.scalar_type() == at::kLong &&
                  crowd_of_category.dim() == 1 && crowd_of_category.numel() == num_categories &&
                  crowd_of_category.is_contiguous(),
              "panoptic_png_file_pq_statistics: crowd_of_category must be a contiguous int64 CPU tensor [",
              num_categories, "], got ", crowd_of_category.scalar_type(), " of shape ", crowd_of_category.sizes());
}

// (problem [1], category, iou_sum, tp, fp, fn) over the categories with a TP, FP or FN (none unless problem is 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> statistics_outputs(
    int64_t problem, const CategoryStatistics& stats, const at::TensorOptions& options) {
  const auto long_options = options.dtype(at::kLong).device(at::kCPU);
  std::vector<int64_t> touched;
  if (problem == 0) {
    for (size_t c = 0; c < stats.tp.size(); ++c) {
      if (stats.tp[c] + stats.fp[c] + stats.fn[c] != 0) touched.push_back(static_cast<int64_t>(c));
    }
  }
  const int64_t k = static_cast<int64_t>(touched.size());
  at::Tensor category = at::empty({k}, long_options), iou = at::empty({k}, long_options.dtype(at::kDouble));
  at::Tensor tp = at::empty({k}, long_options), fp = at::empty({k}, long_options), fn = at::empty({k}, long_options);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t c = touched[i];
    category.data_ptr<int64_t>()[i] = c;
    iou.data_ptr<double>()[i] = stats.iou[c];
    tp.data_ptr<int64_t>()[i] = stats.tp[c];
    fp.data_ptr<int64_t>()[i] = stats.fp[c];
    fn.data_ptr<int64_t>()[i] = stats.fn[c];
  }
  return {at::full({1}, problem, long_options), category, iou, tp, fp, fn};
}

// Returned as problem by panoptic_png_file_pq_statistics for files the reader does not handle: the caller then
// takes the fallback (PIL and the numpy rules), which decodes them or names their problem.
constexpr int64_t kNotHandled = 5;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> panoptic_png_file_pq_statistics_cpu(
    c10::string_view gt_path, c10::string_view pred_path, const at::Tensor& gt_segments,
    const at::Tensor& pred_segments, const at::Tensor& crowd_of_category, int64_t num_categories) {
  TORCH_CHECK(num_categories >= 0, "panoptic_png_file_pq_statistics: num_categories must be >= 0, got ",
              num_categories);
  const SegmentRows gt = segment_rows(gt_segments, 4, num_categories, "gt_segments");
  const SegmentRows pred = segment_rows(pred_segments, 2, num_categories, "pred_segments");
  check_crowd_of_category(crowd_of_category, num_categories);
  CategoryStatistics stats(num_categories);
  thread_local PngScratch gt_png, pred_png;
  if (!load_panoptic_png(std::string(gt_path), gt_png) || !load_panoptic_png(std::string(pred_path), pred_png) ||
      gt_png.width != pred_png.width || gt_png.height != pred_png.height) {
    return statistics_outputs(kNotHandled, stats, gt_segments.options());
  }
  std::vector<KeyCount> pairs;
  try {
    pairs = scanline_pair_list(gt_png.scanlines.data(), pred_png.scanlines.data(), gt_png.height, gt_png.width,
                               gt_png.channels, pred_png.channels);
  } catch (const c10::Error&) {
    return statistics_outputs(kNotHandled, stats, gt_segments.options());  // an unknown filter type: corrupt
  }
  const MatchProblem problem =
      match_image_segments(pairs, gt, pred, crowd_of_category.data_ptr<int64_t>(), stats);
  return statistics_outputs(static_cast<int64_t>(problem), stats, gt_segments.options());
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) {
  m.impl("panoptic_png_file_pq_statistics", &eyecool::panoptic_png_file_pq_statistics_cpu);
}
