// The panoptic PNG reader (see panoptic_png_reader.h) and read_panoptic_png: a file -> int32 [H, W] segment ids
// R + 256 G + 256^2 B, in one GIL-free call (the dispatcher releases the GIL), so that a thread pool reads
// several files at once. Each row depends on the previous one, so one image is one sequential pass.
#include "cpu/panoptic_png_reader.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdio>
#include <cstring>

#include "cpu/png_inflate.h"

namespace eyecool {
namespace {

uint32_t big_endian_u32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

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

template <int BPP>
void decode_rows(const uint8_t* src, int64_t height, int64_t width, int32_t* out) {
  RowDecoder<BPP> rows(src, width, "read_panoptic_png");
  for (int64_t y = 0; y < height; ++y) {
    if (rows.next(y)) {
      row_segment_ids<BPP>(rows.row(), width, out + y * width);
    } else {
      std::memcpy(out + y * width, out + (y - 1) * width, width * sizeof(int32_t));  // a repeated row
    }
  }
}

// The ids of the PNG at `path`, or an empty [0, 0] tensor for a file the reader does not handle (a PNG has
// width and height >= 1, so the empty map is no image's): the caller then asks PIL.
at::Tensor read_panoptic_png_cpu(c10::string_view path) {
  thread_local PngScratch png;
  const auto options = at::TensorOptions().dtype(at::kInt);
  if (!load_panoptic_png(std::string(path), png)) return at::empty({0, 0}, options);
  at::Tensor ids = at::empty({png.height, png.width}, options);
  try {
    if (png.channels == 3) {
      decode_rows<3>(png.scanlines.data(), png.height, png.width, ids.data_ptr<int32_t>());
    } else {
      decode_rows<4>(png.scanlines.data(), png.height, png.width, ids.data_ptr<int32_t>());
    }
  } catch (const c10::Error&) {
    return at::empty({0, 0}, options);  // an unknown filter type: a corrupt file, which PIL then reports
  }
  return ids;
}

// The inflater the reader uses: "libdeflate", "zlib", or "" (none found: the reader handles no file).
std::string png_inflater_name() { return png_inflater().name; }

}  // namespace

bool load_panoptic_png(const std::string& path, PngScratch& png) {
  static const uint8_t kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  const PngInflater& inflater = png_inflater();
  if (!inflater.loaded() || !read_whole_file(path, png.file)) return false;
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
    // The CRC guards against decoding flipped bytes into wrong segment ids (PIL checks it too).
    if (inflater.crc32(inflater.crc32(0, kind, 4), body, length) != big_endian_u32(body + length)) return false;
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
  // Deflate expands at most ~1032:1, so a header that promises more is forged or truncated: refuse it before
  // allocating the buffer it asks for (a 2^31-pixel-wide IHDR would otherwise allocate gigabytes).
  if (scanline_bytes > 1032 * png.idat.size() + 1024) return false;
  png.scanlines.resize(scanline_bytes);
  return inflater.inflate(png.idat.data(), png.idat.size(), png.scanlines.data(), scanline_bytes);
}

}  // namespace eyecool

// No tensor argument: the dispatcher takes the CompositeExplicitAutograd kernel.
TORCH_LIBRARY_IMPL(eyecool, CompositeExplicitAutograd, m) {
  m.impl("read_panoptic_png", &eyecool::read_panoptic_png_cpu);
  m.impl("_png_inflater", &eyecool::png_inflater_name);
}
