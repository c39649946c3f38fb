// The inflater behind the panoptic PNG reader (cpu/panoptic_png_reader.cpp), found one way: the dynamic
// loader's search (dlopen) for libdeflate (libdeflate.so.0; the Debian/Ubuntu package libdeflate0, conda's and
// Homebrew's libdeflate), else for zlib (libz.so.1, which any Python with a zlib module has loaded already).
// Nothing is linked, so the extension needs neither library to build or to import; LD_LIBRARY_PATH points the
// loader at another copy, EYECOOL_PNG_INFLATER=zlib skips libdeflate. libdeflate inflates panoptic PNGs about 5x faster than zlib (benchmarks/results/pq.md).
// Only the functions of the two libraries' stable public APIs that are used are declared here.
#pragma once

#include <cstddef>
#include <cstdint>

namespace eyecool {

struct PngInflater {
  // "libdeflate", "zlib", or "" when neither library loads (the reader then handles no file).
  const char* name = "";
  // Inflates the zlib stream (RFC 1950) `in` into exactly `out_bytes` bytes at `out`; false when the stream is
  // corrupt or inflates to another size. Thread-safe (libdeflate: one decompressor per thread).
  bool (*inflate)(const uint8_t* in, size_t in_bytes, uint8_t* out, size_t out_bytes) = nullptr;
  // CRC-32 of PNG chunks (ISO 3309, as zlib's crc32).
  uint32_t (*crc32)(uint32_t crc, const uint8_t* data, size_t length) = nullptr;
  bool loaded() const { return inflate != nullptr; }
};

// The inflater, loaded on first use (thread-safe).
const PngInflater& png_inflater();

}  // namespace eyecool
