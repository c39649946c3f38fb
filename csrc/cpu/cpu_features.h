// The one CPU ISA dispatch of the CPU kernels: each vectorised loop is written once, as an always-inline body,
// and compiled into a baseline (x86-64 SSE2), an AVX2+FMA and an AVX-512 variant by per-ISA
// __attribute__((target(...))) wrappers; cpu_isa() picks the variant at run time. The extension is built for
// the baseline ISA, so it loads and runs on any x86-64 CPU (and on other architectures, where only the baseline
// variant exists and cpu_isa() is always kBaseline).
//
// The cap: EYECOOL_CPU_ISA=baseline|avx2|avx512 limits cpu_isa() to at most that ISA, so that the tests run
// every variant on one machine and a benchmark can time each (tests/ops/test_cpu_isa_variants.py). It is read
// once, at the first cpu_isa() call. Unset or empty: no cap. A cap above what the CPU supports gives what the CPU
// supports (it is a cap, not a demand: cpu_isa() tells what runs). Any other value is an error, raised by the
// first cpu_isa() call (so by every kernel that dispatches, and by eyecool_ext.cpu_isa()), naming the accepted
// values: a misspelt cap, if ignored, would let a test run the widest variant while it claims another.
// Not target_clones: its resolver picks the widest clone the CPU has and cannot be capped.
//
// Usage (the body must be always-inline, or the compiler may call one baseline copy from every wrapper):
//
//   template <typename T>
//   EYECOOL_ALWAYS_INLINE inline void scale_row_body(T* row, T factor, int64_t n) {
//     for (int64_t i = 0; i < n; ++i) row[i] *= factor;  // auto-vectorised per variant: 4, 8 or 16 floats
//   }
//   ...
//   const CpuIsa isa = cpu_isa();  // once per op call, outside the parallel loop
//   at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
//     for (int64_t r = begin; r < end; ++r)
//       dispatch_cpu_isa(isa, [&]() EYECOOL_ALWAYS_INLINE { scale_row_body(data + r * n, factor, n); });
//   });
//
// The body may take the variant's tag, [&](auto isa) EYECOOL_ALWAYS_INLINE {...}, to adapt at compile time
// (decltype(isa)::value is a CpuIsa; e.g. a block size). Intrinsics cannot go in the body itself (a default-
// target function may not inline them): put them in a function of their own marked EYECOOL_TARGET_AVX512 (or
// _AVX2) and call it from the body under `if constexpr (decltype(isa)::value == CpuIsa::kAvx512)`.
// Template arguments of dispatch_cpu_isa: the widest variant a kernel has (dispatch_cpu_isa<CpuIsa::kAvx2>:
// an AVX-512 CPU runs the AVX2 variant), and FmaPolicy::kUnfused for a kernel whose sums must round exactly as
// the scalar code's (no a * b + c contracted into one FMA in the vector variants; such a kernel has no AVX-512
// variant, since AVX-512F has FMA instructions of its own that GCC contracts into whatever the target says).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

// 1: the x86 variants and intrinsics are compiled. -DEYECOOL_X86=0 compiles the portable code only, as a non-x86
// build does, so that it can be checked on an x86 machine.
#ifndef EYECOOL_X86
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define EYECOOL_X86 1
#else
#define EYECOOL_X86 0
#endif
#endif

#if defined(__GNUC__)
// For a dispatch body (lambda: after the parameter list; function: before its return type).
#define EYECOOL_ALWAYS_INLINE __attribute__((always_inline))
#define EYECOOL_NOINLINE __attribute__((noinline))
#else
#define EYECOOL_ALWAYS_INLINE
#define EYECOOL_NOINLINE
#endif

// The target attributes of the variants. AVX2 means AVX2 + FMA (every AVX2 CPU has FMA); AVX-512 means
// F/VL/DQ/BW (Skylake-SP, Ice Lake, Zen 4 and later) at 512-bit vectors (GCC's default tuning would split them
// into 256-bit halves). EYECOOL_TARGET_AVX2_NO_FMA leaves FMA out so that the compiler cannot contract
// a * b + c (there is no AVX-512 counterpart: "avx512f" without "fma" still contracts, with the EVEX FMAs).
#if EYECOOL_X86
#define EYECOOL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define EYECOOL_TARGET_AVX2_NO_FMA __attribute__((target("avx2")))
#define EYECOOL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")))
#else
#define EYECOOL_TARGET_AVX2
#define EYECOOL_TARGET_AVX2_NO_FMA
#define EYECOOL_TARGET_AVX512
#endif

namespace eyecool {

// The instruction sets the kernels are compiled for, narrowest first (so `isa >= CpuIsa::kAvx2` reads "at
// least AVX2").
enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// "baseline", "avx2" or "avx512": the names EYECOOL_CPU_ISA takes and eyecool_ext.cpu_isa() returns.
inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// The widest variant this CPU can run, ignoring EYECOOL_CPU_ISA.
inline CpuIsa cpu_isa_supported() {
#if EYECOOL_X86
  static const CpuIsa supported = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return CpuIsa::kBaseline;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
      return CpuIsa::kAvx512;
    }
    return CpuIsa::kAvx2;
  }();
  return supported;
#else
  return CpuIsa::kBaseline;
#endif
}

// The variant the kernels run: the widest the CPU supports, capped by EYECOOL_CPU_ISA (see the top of the file;
// throws c10::Error naming the accepted values for any other value, at every call since a throwing static
// initialiser is retried).
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    const char* value = std::getenv("EYECOOL_CPU_ISA");
    CpuIsa cap = CpuIsa::kAvx512;
    if (value == nullptr || value[0] == '\0') {
      cap = CpuIsa::kAvx512;
    } else if (std::strcmp(value, "baseline") == 0) {
      cap = CpuIsa::kBaseline;
    } else if (std::strcmp(value, "avx2") == 0) {
      cap = CpuIsa::kAvx2;
    } else if (std::strcmp(value, "avx512") == 0) {
      cap = CpuIsa::kAvx512;
    } else {
      TORCH_CHECK(false, "EYECOOL_CPU_ISA must be one of baseline, avx2, avx512 (or unset or empty: no cap), got '",
                  value, "'");
    }
    const CpuIsa supported = cpu_isa_supported();
    return cap < supported ? cap : supported;
  }();
  return isa;
}

// Whether the vector variants may contract a * b + c into one fused multiply-add (one rounding instead of
// two): kFused for kernels compared with a tolerance, kUnfused for those whose results must equal the scalar
// (or CUDA) arithmetic bit for bit (at most AVX2: see EYECOOL_TARGET_AVX2_NO_FMA).
enum class FmaPolicy { kFused, kUnfused };

// The type a dispatch body may take: which variant is being compiled, as a compile-time constant.
template <CpuIsa kIsa>
struct CpuIsaTag {
  static constexpr CpuIsa value = kIsa;
};

namespace cpu_isa_detail {

template <CpuIsa kIsa, typename Body>
EYECOOL_ALWAYS_INLINE inline void call_body(const Body& body) {
  if constexpr (std::is_invocable_v<const Body&, CpuIsaTag<kIsa>>) {
    body(CpuIsaTag<kIsa>{});
  } else {
    body();
  }
}

#if EYECOOL_X86
// One wrapper per target attribute; the body inlined into it is compiled for that target. Not inlined into the
// dispatch (a function may not inline one that needs more ISA than itself).
template <typename Body>
EYECOOL_TARGET_AVX512 void run_avx512(const Body& body) {
  call_body<CpuIsa::kAvx512>(body);
}
template <typename Body>
EYECOOL_TARGET_AVX2 void run_avx2(const Body& body) {
  call_body<CpuIsa::kAvx2>(body);
}
template <typename Body>
EYECOOL_TARGET_AVX2_NO_FMA void run_avx2_no_fma(const Body& body) {
  call_body<CpuIsa::kAvx2>(body);
}
#endif

// The baseline variant as a function of its own too, not inlined into the dispatch (and so into its caller):
// inlined, the body was compiled inside the caller's loop, which cost fg_fusion's baseline backward ~4%.
template <typename Body>
EYECOOL_NOINLINE void run_baseline(const Body& body) {
  call_body<CpuIsa::kBaseline>(body);
}

}  // namespace cpu_isa_detail

// Runs `body` compiled for `isa` (a cpu_isa() result) or, where the kernel's widest variant kWidest is
// narrower, for kWidest. body: a lambda marked EYECOOL_ALWAYS_INLINE taking nothing or a CpuIsaTag (auto).
template <CpuIsa kWidest = CpuIsa::kAvx512, FmaPolicy kFma = FmaPolicy::kFused, typename Body>
inline void dispatch_cpu_isa(CpuIsa isa, const Body& body) {
  static_assert(kFma == FmaPolicy::kFused || kWidest <= CpuIsa::kAvx2,
                "FmaPolicy::kUnfused needs kWidest <= CpuIsa::kAvx2: AVX-512 code contracts a * b + c whatever the "
                "target attribute says");
#if EYECOOL_X86
  if constexpr (kWidest >= CpuIsa::kAvx512) {
    if (isa >= CpuIsa::kAvx512) {
      cpu_isa_detail::run_avx512(body);
      return;
    }
  }
  if constexpr (kWidest >= CpuIsa::kAvx2) {
    if (isa >= CpuIsa::kAvx2) {
      if constexpr (kFma == FmaPolicy::kFused) {
        cpu_isa_detail::run_avx2(body);
      } else {
        cpu_isa_detail::run_avx2_no_fma(body);
      }
      return;
    }
  }
#endif
  (void)isa;
  cpu_isa_detail::run_baseline(body);
}

}  // namespace eyecool
