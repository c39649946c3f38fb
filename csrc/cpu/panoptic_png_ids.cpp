// panoptic_png_ids on the CPU: unfilters an 8-bit RGB / RGBA PNG's scanlines row by row (each row depends on
// the previous one, so one image is one sequential pass; callers decode several images in parallel threads,
// and the dispatcher releases the GIL) and writes R + 256 G + 256^2 B per pixel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <utility>
#include <vector>

#include "panoptic_png_ids.h"

namespace eyecool {
namespace {

bool row_is_zero(const uint8_t* bytes, int64_t length) {
  uint8_t any = 0;
  for (int64_t i = 0; i < length; ++i) any |= bytes[i];  // vectorised; no early exit needed at row length
  return any == 0;
}

template <int BPP>
void decode_rows(const uint8_t* src, int64_t height, int64_t width, int32_t* out) {
  const int64_t length = width * BPP, stride = 1 + length;
  // Two rows, plus one byte so that pixel_segment_id may read 4 bytes at the last RGB pixel of the second.
  std::vector<uint8_t> rows(2 * length + 1, 0);
  uint8_t* prior = rows.data();
  uint8_t* current = rows.data() + length;
  for (int64_t y = 0; y < height; ++y) {
    const uint8_t* line = src + y * stride;
    int32_t* out_row = out + y * width;
    // An Up row with zero residuals repeats the row above (most rows of a panoptic PNG): copy its ids.
    if (y > 0 && line[0] == 2 && row_is_zero(line + 1, length)) {
      std::memcpy(out_row, out_row - width, width * sizeof(int32_t));
      continue;
    }
    TORCH_CHECK(unfilter_row<BPP>(line + 1, prior, current, length, line[0]), "panoptic_png_ids: row ", y,
                " has unknown filter type ", static_cast<int>(line[0]));
    for (int64_t x = 0; x < width; ++x) out_row[x] = pixel_segment_id(current + x * BPP);
    std::swap(prior, current);
  }
}

at::Tensor panoptic_png_ids_cpu(const at::Tensor& scanlines_in, int64_t height, int64_t width, int64_t channels) {
  TORCH_CHECK(channels == 3 || channels == 4, "panoptic_png_ids: channels must be 3 (RGB) or 4 (RGBA), got ",
              channels);
  TORCH_CHECK(height >= 0 && width >= 0, "panoptic_png_ids: height and width must be non-negative, got ", height,
              " x ", width);
  TORCH_CHECK(scanlines_in.scalar_type() == at::kByte && scanlines_in.dim() == 1,
              "panoptic_png_ids: scanlines must be a 1-d uint8 tensor, got ", scanlines_in.scalar_type(), " of shape ",
              scanlines_in.sizes());
  const int64_t stride = 1 + width * channels;  // filter-type byte, then the row's bytes
  TORCH_CHECK(scanlines_in.numel() >= height * stride, "panoptic_png_ids: a ", width, " x ", height, " image with ",
              channels, " channels needs ", height * stride, " bytes of scanlines, got ", scanlines_in.numel(),
              " (truncated PNG?)");
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

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) { m.impl("panoptic_png_ids", &eyecool::panoptic_png_ids_cpu); }
