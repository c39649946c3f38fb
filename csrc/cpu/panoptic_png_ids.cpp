// panoptic_png_ids on the CPU: unfilters an 8-bit RGB / RGBA PNG's scanlines row by row (each row depends on
// the previous one, so one image is one sequential pass; callers decode several images in parallel threads,
// and the dispatcher releases the GIL) and writes R + 256 G + 256^2 B per pixel.
//
// panoptic_png_pair_counts does the same for a gt and a prediction PNG at once and counts their (gt, pred)
// pairs row by row, so that neither id map is ever written: at COCO sizes, writing and re-reading two fresh
// [H, W] int32 maps (page faults included) costs more than the unfiltering itself. panoptic_png_pq_statistics
// goes on to match the image's segments (cpu/pq_match.h), so that pq_compute's threads hold no GIL per image.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/libdeflate_runtime.h"
#include "cpu/pair_counter.h"
#include "cpu/pq_match.h"
#include "panoptic_png_ids.h"

namespace eyecool {
namespace {

bool row_is_zero(const uint8_t* bytes, int64_t length) {
  uint8_t any = 0;
  for (int64_t i = 0; i < length; ++i) any |= bytes[i];  // vectorised; no early exit needed at row length
  return any == 0;
}

// One image's rows, unfiltered one at a time; row() holds the bytes of the row last decoded.
template <int BPP>
class RowDecoder {
 public:
  // op names the op in the error of an unknown filter type.
  RowDecoder(const uint8_t* src, int64_t width, const char* op)
      : src_(src), op_(op), length_(width * BPP), rows_(2 * length_ + 1, 0) {
    prior_ = rows_.data();
    current_ = rows_.data() + length_;
  }

  // Decodes row y (rows are visited in order); returns false when it repeats row y - 1, which row() still holds.
  bool next(int64_t y) {
    const uint8_t* line = src_ + y * (1 + length_);
    // An Up row with zero residuals repeats the row above (most rows of a panoptic PNG).
    if (y > 0 && line[0] == 2 && row_is_zero(line + 1, length_)) return false;
    TORCH_CHECK(unfilter_row<BPP>(line + 1, prior_, current_, length_, line[0]), op_, ": row ", y,
                " has unknown filter type ", static_cast<int>(line[0]));
    std::swap(prior_, current_);
    return true;
  }

  // The unfiltered bytes of the last row decoded; pixel_segment_id may read one byte past the last pixel.
  const uint8_t* row() const { return prior_; }

 private:
  const uint8_t* src_;
  const char* op_;
  int64_t length_;
  std::vector<uint8_t> rows_;  // two rows, plus one byte so that pixel_segment_id may read 4 bytes at the end
  uint8_t* prior_;             // the last row decoded (the prior row of the next one)
  uint8_t* current_;
};

template <int BPP>
void row_segment_ids(const uint8_t* row, int64_t width, int32_t* ids) {
  for (int64_t x = 0; x < width; ++x) ids[x] = pixel_segment_id(row + x * BPP);
}

template <int BPP>
void decode_rows(const uint8_t* src, int64_t height, int64_t width, int32_t* out) {
  RowDecoder<BPP> rows(src, width, "panoptic_png_ids");
  for (int64_t y = 0; y < height; ++y) {
    if (rows.next(y)) {
      row_segment_ids<BPP>(rows.row(), width, out + y * width);
    } else {
      std::memcpy(out + y * width, out + (y - 1) * width, width * sizeof(int32_t));  // a repeated row
    }
  }
}

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
// flat region costs one zero test per row and side. Rows of equal bytes per pixel are split into runs on their
// bytes (RowRuns); an RGB image against an RGBA one goes through the two rows' ids.
template <int GT_BPP, int PRED_BPP>
void count_png_pairs(const uint8_t* gt_src, const uint8_t* pred_src, int64_t height, int64_t width,
                     PairCounter& counter) {
  RowDecoder<GT_BPP> gt(gt_src, width, "panoptic_png_pair_counts");
  RowDecoder<PRED_BPP> pred(pred_src, width, "panoptic_png_pair_counts");
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

// The same from two PNGs' scanline tensors, checked.
std::vector<KeyCount> png_pair_list(const at::Tensor& gt_scanlines_in, const at::Tensor& pred_scanlines_in,
                                    int64_t height, int64_t width, int64_t gt_channels, int64_t pred_channels,
                                    const char* op) {
  check_scanlines(gt_scanlines_in, height, width, gt_channels, op, "gt_scanlines");
  check_scanlines(pred_scanlines_in, height, width, pred_channels, op, "pred_scanlines");
  const at::Tensor gt_scanlines = gt_scanlines_in.contiguous();
  const at::Tensor pred_scanlines = pred_scanlines_in.contiguous();
  if (height == 0 || width == 0) return {};
  return scanline_pair_list(gt_scanlines.data_ptr<uint8_t>(), pred_scanlines.data_ptr<uint8_t>(), height, width,
                            gt_channels, pred_channels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> panoptic_png_pair_counts_cpu(
    const at::Tensor& gt_scanlines, const at::Tensor& pred_scanlines, int64_t height, int64_t width,
    int64_t gt_channels, int64_t pred_channels) {
  const std::vector<KeyCount> pairs = png_pair_list(gt_scanlines, pred_scanlines, height, width, gt_channels,
                                                    pred_channels, "panoptic_png_pair_counts");
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

// A [rows, n] int64 CPU table of segments (rows: ids ascending, category index, then iscrowd and area for gt).
SegmentRows segment_rows(const at::Tensor& table, int64_t rows, int64_t num_categories, const char* name) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.size(0) == rows && table.is_contiguous(),
              "panoptic_png_pq_statistics: ", name, " must be a contiguous int64 CPU tensor [", rows,
              ", segments], got ", table.scalar_type(), " of shape ", table.sizes());
  const int64_t n = table.size(1);
  const int64_t* data = table.data_ptr<int64_t>();
  SegmentRows out{data, data + n, rows > 2 ? data + 2 * n : nullptr, rows > 3 ? data + 3 * n : nullptr, n};
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(out.category[i] >= 0 && out.category[i] < num_categories, "panoptic_png_pq_statistics: ", name,
                " row ", i, " has category index ", out.category[i], ", expected [0, ", num_categories, ")");
    TORCH_CHECK(i == 0 || out.ids[i - 1] < out.ids[i], "panoptic_png_pq_statistics: ", name,
                " ids must be strictly ascending");
  }
  return out;
}

void check_crowd_of_category(const at::Tensor& crowd_of_category, int64_t num_categories) {
  TORCH_CHECK(crowd_of_category.device().is_cpu() && crowd_of_category.scalar_type() == at::kLong &&
                  crowd_of_category.dim() == 1 && crowd_of_category.numel() == num_categories &&
                  crowd_of_category.is_contiguous(),
              "panoptic_png_pq_statistics: crowd_of_category must be a contiguous int64 CPU tensor [",
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> panoptic_png_pq_statistics_cpu(
    const at::Tensor& gt_scanlines, const at::Tensor& pred_scanlines, int64_t height, int64_t width,
    int64_t gt_channels, int64_t pred_channels, const at::Tensor& gt_segments, const at::Tensor& pred_segments,
    const at::Tensor& crowd_of_category, int64_t num_categories) {
  TORCH_CHECK(num_categories >= 0, "panoptic_png_pq_statistics: num_categories must be >= 0, got ", num_categories);
  const SegmentRows gt = segment_rows(gt_segments, 4, num_categories, "gt_segments");
  const SegmentRows pred = segment_rows(pred_segments, 2, num_categories, "pred_segments");
  check_crowd_of_category(crowd_of_category, num_categories);
  const std::vector<KeyCount> pairs = png_pair_list(gt_scanlines, pred_scanlines, height, width, gt_channels,
                                                    pred_channels, "panoptic_png_pq_statistics");
  CategoryStatistics stats(num_categories);
  const MatchProblem problem =
      match_image_segments(pairs, gt, pred, crowd_of_category.data_ptr<int64_t>(), stats);
  return statistics_outputs(static_cast<int64_t>(problem), stats, gt_segments.options());
}

// ---- whole files: the PNG chunks, their CRCs and the inflation in C++ too (libdeflate, loaded at run time) ----

// Returned by panoptic_png_file_pq_statistics for anything its fast path leaves to the Python one.
constexpr int64_t kNotHandled = 5;

uint32_t big_endian_u32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// One PNG file in this thread's buffers: its bytes, its image data and the inflated scanlines.
struct PngScratch {
  std::vector<uint8_t> file, idat, scanlines;
  int64_t width = 0, height = 0, channels = 0;
};

bool read_whole_file(const std::string& path, std::vector<uint8_t>& out) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  bool ok = std::fseek(f, 0, SEEK_END) == 0;
  const long size = ok ? std::ftell(f) : -1;
  ok = ok && size >= 0 && std::fseek(f, 0, SEEK_SET) == 0;
  if (ok) {
    out.resize(static_cast<size_t>(size));
    ok = std::fread(out.data(), 1, out.size(), f) == out.size();
  }
  std::fclose(f);
  return ok;
}

// parse_panoptic_png's rules (eyecool_ext/ops/panoptic_png.py): the signature, every chunk whole and its CRC
// right up to IEND, one IHDR of 13 bytes, 8-bit RGB or RGBA, not interlaced, at least one IDAT; then the
// inflation of the joined IDATs into exactly height * (1 + width * channels) bytes. False for anything else.
bool load_png(const std::string& path, PngScratch& png) {
  static const uint8_t kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  const LibdeflateApi& deflate = libdeflate();
  if (!read_whole_file(path, png.file)) return false;
  const uint8_t* data = png.file.data();
  const size_t size = png.file.size();
  if (size < 8 || std::memcmp(data, kSignature, 8) != 0) return false;
  png.idat.clear();
  bool header = false;
  int64_t bit_depth = 0, colour_type = 0, interlace = 0;
  for (size_t pos = 8; pos + 8 <= size;) {
    const size_t length = big_endian_u32(data + pos);
    const uint8_t* kind = data + pos + 4;
    if (length > size - pos - 8 || size - pos - 8 - length < 4) return false;  // truncated body or CRC
    const uint8_t* body = data + pos + 8;
    const uint32_t crc = deflate.crc32(deflate.crc32(0, kind, 4), body, length);
    if (crc != big_endian_u32(body + length)) return false;
    if (std::memcmp(kind, "IHDR", 4) == 0) {
      if (length != 13) return false;
      png.width = big_endian_u32(body);
      png.height = big_endian_u32(body + 4);
      bit_depth = body[8];
      colour_type = body[9];
      interlace = body[12];
      header = true;
    } else if (std::memcmp(kind, "IDAT", 4) == 0) {
      png.idat.insert(png.idat.end(), body, body + length);
    } else if (std::memcmp(kind, "IEND", 4) == 0) {
      break;
    }
    pos += 12 + length;
  }
  if (!header || png.idat.empty() || bit_depth != 8 || (colour_type != 2 && colour_type != 6) || interlace != 0) {
    return false;
  }
  png.channels = colour_type == 2 ? 3 : 4;
  if (png.width == 0 || png.height == 0) return false;
  const size_t scanline_bytes = static_cast<size_t>(png.height) * (1 + static_cast<size_t>(png.width) * png.channels);
  // As _inflate: deflate expands at most ~1032:1, so a header promising more is forged or truncated.
  const size_t compressed = png.idat.size();
  if (scanline_bytes > 1032 * compressed + 1024) return false;
  // The zlib stream: deflate method, a header that checks, no preset dictionary; then the raw deflate data
  // before the Adler-32 trailer (not verified again: the chunk CRCs cover these bytes).
  if (compressed < 6) return false;
  const uint8_t cmf = png.idat[0], flg = png.idat[1];
  if ((cmf & 0x0F) != 8 || (cmf * 256 + flg) % 31 != 0 || (flg & 0x20) != 0) return false;
  png.scanlines.resize(scanline_bytes);  // kept per thread: fresh pages would cost more page faults than inflating
  thread_local struct Decompressor {
    void* handle = nullptr;
    ~Decompressor() {
      if (handle != nullptr) libdeflate().free_decompressor(handle);
    }
  } decompressor;
  if (decompressor.handle == nullptr) decompressor.handle = deflate.alloc_decompressor();
  if (decompressor.handle == nullptr) return false;
  size_t actual = 0;
  const int result = deflate.deflate_decompress(decompressor.handle, png.idat.data() + 2, compressed - 6,
                                                png.scanlines.data(), scanline_bytes, &actual);
  return result == 0 && actual == scanline_bytes;
}

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
  if (!libdeflate().loaded() || !load_png(std::string(gt_path), gt_png) || !load_png(std::string(pred_path), pred_png) ||
      gt_png.width != pred_png.width || gt_png.height != pred_png.height) {
    return statistics_outputs(kNotHandled, stats, gt_segments.options());
  }
  const std::vector<KeyCount> pairs =
      scanline_pair_list(gt_png.scanlines.data(), pred_png.scanlines.data(), gt_png.height, gt_png.width,
                         gt_png.channels, pred_png.channels);
  const MatchProblem problem =
      match_image_segments(pairs, gt, pred, crowd_of_category.data_ptr<int64_t>(), stats);
  return statistics_outputs(static_cast<int64_t>(problem), stats, gt_segments.options());
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) {
  m.impl("panoptic_png_ids", &eyecool::panoptic_png_ids_cpu);
  m.impl("panoptic_png_pair_counts", &eyecool::panoptic_png_pair_counts_cpu);
  m.impl("panoptic_png_pq_statistics", &eyecool::panoptic_png_pq_statistics_cpu);
  m.impl("panoptic_png_file_pq_statistics", &eyecool::panoptic_png_file_pq_statistics_cpu);
}
