// Run-time CPU feature checks for the CPU kernels that carry AVX2 row loops beside their portable ones. The
// loops are compiled with __attribute__((target(...))) per function, so the extension still loads and runs on
// any x86-64 CPU; these checks pick the loop.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define EYECOOL_X86 1
#else
#define EYECOOL_X86 0
#endif

namespace eyecool {

// AVX2 and FMA both present (every AVX2 CPU has FMA too; FMA is checked because some loops use it).
inline bool cpu_has_avx2() {
#if EYECOOL_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace eyecool
