// Helpers shared by every kernel file: the host/device qualifier for the math headers and the input checks.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EYECOOL_HD __host__ __device__ __forceinline__
#define EYECOOL_HD_ALWAYS_INLINE __host__ __device__ __forceinline__
#else
#define EYECOOL_HD inline
// For the math inside the vectorised CPU loops: a call that is not inlined there runs one element at a time.
#define EYECOOL_HD_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

#include <ATen/ATen.h>

namespace eyecool {

// "input must be a floating point tensor, got Long" style messages, naming the argument.
inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating point tensor, got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, name, " must be a ", dim, "-d tensor ", layout, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ", a.device(),
              " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

}  // namespace eyecool
