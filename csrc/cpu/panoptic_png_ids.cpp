// panoptic_png_ids on the CPU: unfilters an 8-bit RGB / RGBA PNG's scanlines row by row (each row depends on
// the previous one, so one image is one sequential pass; callers decode several images in parallel threads,
// and the dispatcher releases the GIL) and writes R + 256 G + 256^2 B per pixel.
//
// panoptic_png_pair_counts does the same for a gt and a prediction PNG at once and counts their (gt, pred)
// pairs row by row, so that neither id map is ever written: at COCO sizes, writing and re-reading two fresh
// [H, W] int32 maps (page faults included) costs more than the unfiltering itself.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/pair_counter.h"
#include "panoptic_png_ids.h"

namespace eyecool {
namespace {

bool row_is_zero(const uint8_t* bytes, int64_t length) {
  uint8_t any = 0;
  for (int64_t i = 0; i < length; ++i) any |= bytes[i];  // vectorised; no early exit needed at row length
  return any == 0;
}

// One image's rows, decoded one at a time into the ids of the current row.
template <int BPP>
class RowDecoder {
 public:
  // op names the op in the error of an unknown filter type.
  RowDecoder(const uint8_t* src, int64_t width, const char* op)
      : src_(src), op_(op), width_(width), length_(width * BPP), rows_(2 * length_ + 1, 0), ids_(width, 0) {
    prior_ = rows_.data();
    current_ = rows_.data() + length_;
  }

  // Decodes row y (rows are visited in order); returns false when it repeats row y - 1, whose ids stay.
  bool next(int64_t y) {
    const uint8_t* line = src_ + y * (1 + length_);
    // An Up row with zero residuals repeats the row above (most rows of a panoptic PNG).
    if (y > 0 && line[0] == 2 && row_is_zero(line + 1, length_)) return false;
    TORCH_CHECK(unfilter_row<BPP>(line + 1, prior_, current_, length_, line[0]), op_, ": row ", y,
                " has unknown filter type ", static_cast<int>(line[0]));
    for (int64_t x = 0; x < width_; ++x) ids_[x] = pixel_segment_id(current_ + x * BPP);
    std::swap(prior_, current_);
    return true;
  }

  const int32_t* ids() const { return ids_.data(); }

 private:
  const uint8_t* src_;
  const char* op_;
  int64_t width_, length_;
  std::vector<uint8_t> rows_;  // two rows, plus one byte so that pixel_segment_id may read 4 bytes at the end
  std::vector<int32_t> ids_;
  uint8_t* prior_;
  uint8_t* current_;
};

template <int BPP>
void decode_rows(const uint8_t* src, int64_t height, int64_t width, int32_t* out) {
  RowDecoder<BPP> rows(src, width, "panoptic_png_ids");
  for (int64_t y = 0; y < height; ++y) {
    rows.next(y);  // a repeated row keeps the previous ids
    std::memcpy(out + y * width, rows.ids(), width * sizeof(int32_t));
  }
}

// The checks of one image's scanlines; op names the op in the messages, name the argument.
void check_scanlines(const at::Tensor& scanlines, int64_t height, int64_t width, int64_t channels, const char* op,
                     const char* name) {
  TORCH_CHECK(channels == 3 || channels == 4, op, ": channels must be 3 (RGB) or 4 (RGBA), got ", channels);
  TORCH_CHECK(height >= 0 && width >= 0, op, ": height and width must be non-negative, got ", height, " x ", width);
  TORCH_CHECK(scanlines.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", scanlines.device());
  TORCH_CHECK(scanlines.scalar_type() == at::kByte && scanlines.dim() == 1, op, ": ", name,
              " must be a 1-d uint8 tensor, got ", scanlines.scalar_type(), " of shape ", scanlines.sizes());
  const int64_t stride = 1 + width * channels;  // filter-type byte, then the row's bytes
  TORCH_CHECK(scanlines.numel() >= height * stride, op, ": a ", width, " x ", height, " image with ", channels,
              " channels needs ", height * stride, " bytes of ", name, ", got ", scanlines.numel(),
              " (truncated PNG?)");
}

at::Tensor panoptic_png_ids_cpu(const at::Tensor& scanlines_in, int64_t height, int64_t width, int64_t channels) {
  check_scanlines(scanlines_in, height, width, channels, "panoptic_png_ids", "scanlines");
  const at::Tensor scanlines = scanlines_in.contiguous();
  at::Tensor ids = at::empty({height, width}, scanlines.options().dtype(at::kInt));
  if (height == 0 || width == 0) return ids;
  const uint8_t* src = scanlines.data_ptr<uint8_t>();
  int32_t* out = ids.data_ptr<int32_t>();
  if (channels == 3) {
    decode_rows<3>(src, height, width, out);
  } else {
    decode_rows<4>(src, height, width, out);
  }
  return ids;
}

// Counts the pairs row by row. A row where neither image changes adds the previous row's runs again, so a
// flat region costs one zero test per row and side.
template <int GT_BPP, int PRED_BPP>
void count_png_pairs(const uint8_t* gt_src, const uint8_t* pred_src, int64_t height, int64_t width,
                     PairCounter& counter) {
  RowDecoder<GT_BPP> gt(gt_src, width, "panoptic_png_pair_counts");
  RowDecoder<PRED_BPP> pred(pred_src, width, "panoptic_png_pair_counts");
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
    int64_t bad_pixel = -1;
    // Ids of a PNG are below 2^24, so every pair encodes.
    count_pixels(gt.ids(), pred.ids(), 0, width, row, bad_pixel);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> panoptic_png_pair_counts_cpu(
    const at::Tensor& gt_scanlines_in, const at::Tensor& pred_scanlines_in, int64_t height, int64_t width,
    int64_t gt_channels, int64_t pred_channels) {
  check_scanlines(gt_scanlines_in, height, width, gt_channels, "panoptic_png_pair_counts", "gt_scanlines");
  check_scanlines(pred_scanlines_in, height, width, pred_channels, "panoptic_png_pair_counts", "pred_scanlines");
  const at::Tensor gt_scanlines = gt_scanlines_in.contiguous();
  const at::Tensor pred_scanlines = pred_scanlines_in.contiguous();
  PairCounter counter;
  if (height > 0 && width > 0) {
    const uint8_t* gt_src = gt_scanlines.data_ptr<uint8_t>();
    const uint8_t* pred_src = pred_scanlines.data_ptr<uint8_t>();
    if (gt_channels == 3) {
      count_png_pairs_for<3>(gt_src, pred_src, height, width, pred_channels, counter);
    } else {
      count_png_pairs_for<4>(gt_src, pred_src, height, width, pred_channels, counter);
    }
  }
  std::vector<KeyCount> pairs;
  counter.append_to(pairs);
  std::sort(pairs.begin(), pairs.end());
  const int64_t total = static_cast<int64_t>(pairs.size());
  const auto options = gt_scanlines.options().dtype(at::kLong);
  at::Tensor gt_out = at::empty({total}, options);
  at::Tensor pred_out = at::empty({total}, options);
  at::Tensor counts = at::empty({total}, options);
  int64_t* gt_ptr = gt_out.data_ptr<int64_t>();
  int64_t* pred_ptr = pred_out.data_ptr<int64_t>();
  int64_t* count_ptr = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < total; ++i) {
    gt_ptr[i] = pair_gt_id(pairs[i].first);
    pred_ptr[i] = pair_pred_id(pairs[i].first);
    count_ptr[i] = pairs[i].second;
  }
  return {gt_out, pred_out, counts};
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) {
  m.impl("panoptic_png_ids", &eyecool::panoptic_png_ids_cpu);
  m.impl("panoptic_png_pair_counts", &eyecool::panoptic_png_pair_counts_cpu);
}
