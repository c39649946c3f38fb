// Helpers shared by every kernel file: the host/device qualifier for the math headers and the input checks.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#if defined(__CUDACC__)
#define EYECOOL_HD __host__ __device__ __forceinline__
#define EYECOOL_HD_ALWAYS_INLINE __host__ __device__ __forceinline__
#else
#define EYECOOL_HD inline
// For the math inside the vectorised CPU loops: a call that is not inlined there runs one element at a time.
#define EYECOOL_HD_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

#include <ATen/ATen.h>

#include <type_traits>

namespace eyecool {

// a * b rounded on its own. nvcc contracts a * b + c into one fused multiply-add by default (one rounding instead
// of two), which the host build never does (no FMA in its baseline code); where a product meets a sum in code
// whose result must match the CPU's bit for bit (the panoptic merge's labels), the product goes through this:
// CUDA never fuses __fmul_rn / __dmul_rn.
template <typename T>
EYECOOL_HD T mul_rn(T a, T b) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same<T, double>::value) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

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

// The largest buffer an op allocates without being asked twice: 1 TiB, more than any one device holds. A request
// beyond it is a wrong argument (an output_size of 10**6, say), not a workload.
constexpr int64_t kMaxAllocationBytes = int64_t(1) << 40;

// Refuses, before anything is allocated, a tensor of `sizes` whose element count overflows int64 or whose bytes
// exceed kMaxAllocationBytes; the message names what would be allocated and how big it would be.
inline void check_allocation(std::initializer_list<int64_t> sizes, int64_t element_size, const char* op,
                             const char* what) {
  int64_t elements = 1;
  bool overflow = false;
  for (const int64_t s : sizes) {
    TORCH_CHECK(s >= 0, op, ": ", what, " would have a negative size ", s);
    overflow = overflow || __builtin_mul_overflow(elements, s, &elements);
  }
  int64_t bytes = 0;
  overflow = overflow || __builtin_mul_overflow(elements, element_size, &bytes);
  TORCH_CHECK(!overflow && bytes <= kMaxAllocationBytes, op, ": ", what, " would have shape ",
              c10::IntArrayRef(sizes.begin(), sizes.size()), " (",
              overflow ? std::string("more than 2^63 bytes")
                       : std::to_string(static_cast<double>(bytes) / (int64_t(1) << 30)) + " GiB",
              "), over the ", kMaxAllocationBytes >> 30, " GiB this op allocates at most; check the arguments");
}

}  // namespace eyecool
