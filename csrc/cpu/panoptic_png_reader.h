// The one panoptic PNG reader: a file's chunks (signature, every chunk whole with its CRC, one 13-byte IHDR,
// 8-bit RGB or RGBA, not interlaced, the joined IDATs) inflated into scanlines (cpu/png_inflate.h), and the rows
// unfiltered one at a time (RowDecoder). read_panoptic_png (an id map) and panoptic_png_file_pq_statistics
// (cpu/pq_file_statistics.cpp: pair counts and matching without writing an id map) are its two users.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cpu/png_unfilter.h"

namespace eyecool {

// One PNG file in reusable buffers: its bytes, its image data and the inflated scanlines (per row, the filter-
// type byte then the row's bytes). Kept per thread by the callers: fresh pages for a COCO-sized image's MB of
// scanlines cost more page faults than the inflation itself.
struct PngScratch {
  std::vector<uint8_t> file, idat, scanlines;
  int64_t width = 0, height = 0, channels = 0;
};

// Reads and inflates the panoptic PNG at `path` into `png`. False for anything it does not handle: an
// unreadable file, another kind of PNG (palette, 16-bit, grey, interlaced), a corrupt or truncated one, a
// header that promises more pixels than the data can hold, width or height 0, or no inflater loaded. Callers
// then hand the file to PIL, which decodes the other kinds and names the problem of a broken one.
bool load_panoptic_png(const std::string& path, PngScratch& png);

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
  static bool row_is_zero(const uint8_t* bytes, int64_t length) {
    uint8_t any = 0;
    for (int64_t i = 0; i < length; ++i) any |= bytes[i];  // vectorised; no early exit needed at row length
    return any == 0;
  }

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

}  // namespace eyecool
