// Run-time loading of libdeflate (see libdeflate_runtime.h) and the op that Python calls with the candidates.
#include "cpu/libdeflate_runtime.h"

#include <dlfcn.h>
#include <torch/library.h>

#include <mutex>

namespace eyecool {
namespace {

LibdeflateApi api;
std::mutex api_mutex;

template <typename F>
bool resolve(void* handle, const char* name, F& out) {
  out = reinterpret_cast<F>(dlsym(handle, name));
  return out != nullptr;
}

}  // namespace

const LibdeflateApi& libdeflate() { return api; }

bool load_libdeflate(const std::string& path) {
  std::lock_guard<std::mutex> lock(api_mutex);
  if (api.loaded()) return true;
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return false;
  LibdeflateApi candidate;
  if (!resolve(handle, "libdeflate_alloc_decompressor", candidate.alloc_decompressor) ||
      !resolve(handle, "libdeflate_free_decompressor", candidate.free_decompressor) ||
      !resolve(handle, "libdeflate_crc32", candidate.crc32) ||
      !resolve(handle, "libdeflate_deflate_decompress", candidate.deflate_decompress)) {
    dlclose(handle);
    return false;
  }
  api = candidate;  // the handle stays open for the life of the process
  return true;
}

namespace {

// The first of `paths` that loads (or the library loaded before): its index, -1 when none does.
int64_t load_libdeflate_op(c10::List<std::string> paths) {
  for (size_t i = 0; i < paths.size(); ++i) {
    if (load_libdeflate(paths.get(i))) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CompositeExplicitAutograd, m) {
  m.impl("_load_libdeflate", &eyecool::load_libdeflate_op);
}
