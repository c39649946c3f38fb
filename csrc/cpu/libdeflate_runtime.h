// libdeflate, loaded at run time when the machine has it (the system's libdeflate.so.0, or the copy that the
// imagecodecs wheel bundles), so that the extension needs no inflate library to build or to import. It gives
// pq_compute a whole image pair per GIL-free call: PNG chunks, CRCs and inflation in C++ as well. Only the four
// functions of libdeflate's stable public API that are used are declared here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace eyecool {

struct LibdeflateApi {
  void* (*alloc_decompressor)() = nullptr;
  void (*free_decompressor)(void*) = nullptr;
  // Returns 0 (LIBDEFLATE_SUCCESS) when `in` inflates into at most out_avail bytes; *actual_out gets their count.
  int (*deflate_decompress)(void*, const void* in, size_t in_bytes, void* out, size_t out_avail,
                            size_t* actual_out) = nullptr;
  uint32_t (*crc32)(uint32_t crc, const void* buffer, size_t length) = nullptr;
  bool loaded() const { return deflate_decompress != nullptr; }
};

// The loaded library (all null until load_libdeflate succeeds).
const LibdeflateApi& libdeflate();

// Loads libdeflate from `path` (a file name for the dynamic loader's search, or a full path) unless a copy is
// loaded already; true when the library is loaded afterwards.
bool load_libdeflate(const std::string& path);

}  // namespace eyecool
