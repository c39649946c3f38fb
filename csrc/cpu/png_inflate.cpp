// Run-time loading of the PNG inflater (see png_inflate.h).
#include "cpu/png_inflate.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

namespace eyecool {
namespace {

// ---- libdeflate: one-shot raw inflate; the zlib header is checked here, the Adler-32 is not (the reader has
// checked the chunk CRCs, which cover these bytes) ----
struct LibdeflateApi {
  void* (*alloc_decompressor)() = nullptr;
  void (*free_decompressor)(void*) = nullptr;
  // Returns 0 (LIBDEFLATE_SUCCESS) when `in` inflates into at most out_avail bytes; *actual_out gets their count.
  int (*deflate_decompress)(void*, const void* in, size_t in_bytes, void* out, size_t out_avail,
                            size_t* actual_out) = nullptr;
  uint32_t (*crc32)(uint32_t crc, const void* buffer, size_t length) = nullptr;
};
LibdeflateApi libdeflate;

// ---- zlib: uncompress() inflates a whole zlib stream and checks its Adler-32 ----
struct ZlibApi {
  int (*uncompress)(unsigned char* dest, unsigned long* dest_len, const unsigned char* source,
                    unsigned long source_len) = nullptr;
  unsigned long (*crc32)(unsigned long crc, const unsigned char* buffer, unsigned int length) = nullptr;
};
ZlibApi zlib;

template <typename F>
bool resolve(void* handle, const char* name, F& out) {
  out = reinterpret_cast<F>(dlsym(handle, name));
  return out != nullptr;
}

void* open_first(const char* const* names) {
  for (; *names != nullptr; ++names) {
    if (void* handle = dlopen(*names, RTLD_NOW | RTLD_LOCAL)) return handle;
  }
  return nullptr;
}

// A zlib stream's header: deflate method, a check that holds (a multiple of 31), no preset dictionary (PNG
// allows none); at least the 2 header and 4 trailer bytes.
bool zlib_header_ok(const uint8_t* in, size_t in_bytes) {
  if (in_bytes < 6) return false;
  const unsigned cmf = in[0], flg = in[1];
  return (cmf & 0x0F) == 8 && (cmf * 256 + flg) % 31 == 0 && (flg & 0x20) == 0;
}

bool libdeflate_inflate(const uint8_t* in, size_t in_bytes, uint8_t* out, size_t out_bytes) {
  if (!zlib_header_ok(in, in_bytes)) return false;
  thread_local struct Decompressor {
    void* handle = nullptr;
    ~Decompressor() {
      if (handle != nullptr) libdeflate.free_decompressor(handle);
    }
  } decompressor;
  if (decompressor.handle == nullptr) decompressor.handle = libdeflate.alloc_decompressor();
  if (decompressor.handle == nullptr) return false;
  size_t actual = 0;
  return libdeflate.deflate_decompress(decompressor.handle, in + 2, in_bytes - 6, out, out_bytes, &actual) == 0 &&
         actual == out_bytes;
}

uint32_t libdeflate_crc32(uint32_t crc, const uint8_t* data, size_t length) {
  return libdeflate.crc32(crc, data, length);
}

bool zlib_inflate(const uint8_t* in, size_t in_bytes, uint8_t* out, size_t out_bytes) {
  if (!zlib_header_ok(in, in_bytes)) return false;
  unsigned long written = static_cast<unsigned long>(out_bytes);
  return zlib.uncompress(out, &written, in, static_cast<unsigned long>(in_bytes)) == 0 /* Z_OK */ &&
         written == out_bytes;
}

uint32_t zlib_crc32(uint32_t crc, const uint8_t* data, size_t length) {
  // zlib's crc32 takes 32-bit lengths: longer buffers go in pieces.
  constexpr size_t kPiece = size_t{1} << 30;
  unsigned long value = crc;
  for (size_t done = 0; done < length; done += kPiece) {
    const size_t piece = length - done < kPiece ? length - done : kPiece;
    value = zlib.crc32(value, data + done, static_cast<unsigned int>(piece));
  }
  return static_cast<uint32_t>(value);
}

PngInflater load_inflater() {
  PngInflater inflater;
  // EYECOOL_PNG_INFLATER=zlib skips libdeflate: the tests run the zlib path with it.
  const char* choice = std::getenv("EYECOOL_PNG_INFLATER");
  const bool skip_libdeflate = choice != nullptr && std::strcmp(choice, "zlib") == 0;
  static const char* const kLibdeflate[] = {"libdeflate.so.0", "libdeflate.0.dylib", nullptr};
  if (void* handle = skip_libdeflate ? nullptr : open_first(kLibdeflate)) {
    if (resolve(handle, "libdeflate_alloc_decompressor", libdeflate.alloc_decompressor) &&
        resolve(handle, "libdeflate_free_decompressor", libdeflate.free_decompressor) &&
        resolve(handle, "libdeflate_deflate_decompress", libdeflate.deflate_decompress) &&
        resolve(handle, "libdeflate_crc32", libdeflate.crc32)) {
      inflater.name = "libdeflate";
      inflater.inflate = &libdeflate_inflate;
      inflater.crc32 = &libdeflate_crc32;
      return inflater;  // the handle stays open for the life of the process
    }
    dlclose(handle);
  }
  static const char* const kZlib[] = {"libz.so.1", "libz.1.dylib", nullptr};
  if (void* handle = open_first(kZlib)) {
    if (resolve(handle, "uncompress", zlib.uncompress) && resolve(handle, "crc32", zlib.crc32)) {
      inflater.name = "zlib";
      inflater.inflate = &zlib_inflate;
      inflater.crc32 = &zlib_crc32;
      return inflater;
    }
    dlclose(handle);
  }
  return inflater;
}

}  // namespace

const PngInflater& png_inflater() {
  static const PngInflater inflater = load_inflater();  // C++11: initialised once, thread-safe
  return inflater;
}

}  // namespace eyecool
