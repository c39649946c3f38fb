// Run-time CPU feature checks for the CPU kernels that carry AVX2 (and AVX-512) row loops beside their portable
// ones. The loops are compiled with __attribute__((target(...))) per function, so the extension still loads and
// runs on any x86-64 CPU; these checks pick the loop. EYECOOL_CPU_ISA=baseline|avx2 caps the choice (read once,
// at the first check), so that tests can run every variant on one machine.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define EYECOOL_X86 1
#else
#define EYECOOL_X86 0
#endif

namespace eyecool {

// 0: baseline, 1: up to AVX2, 2: no cap.
inline int cpu_isa_cap() {
  static const int cap = [] {
    const char* value = std::getenv("EYECOOL_CPU_ISA");
    if (value == nullptr) return 2;
    if (std::strcmp(value, "baseline") == 0) return 0;
    if (std::strcmp(value, "avx2") == 0) return 1;
    return 2;
  }();
  return cap;
}

// AVX2 and FMA both present (every AVX2 CPU has FMA too; FMA is checked because some loops use it).
inline bool cpu_has_avx2() {
#if EYECOOL_X86
  static const bool has = cpu_isa_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// AVX-512 F/VL/DQ/BW (Skylake-SP and later): 16 float lanes for the loops bound by arithmetic (the softmax's exp).
inline bool cpu_has_avx512() {
#if EYECOOL_X86
  static const bool has = cpu_isa_cap() >= 2 && cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

}  // namespace eyecool
