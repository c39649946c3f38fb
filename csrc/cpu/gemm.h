// A float GEMM for the deformable convolution's forward on AVX-512 CPUs: C (+)= A @ B^T with A the layer's weight
// rows [M, K] (packed once per call) and B a tile's column matrix [P, K] (pixel-major, as the sampling writes it).
//
// Why not at::mm: torch's BLAS (MKL) runs its AVX2 code on AMD CPUs, ~98 GFLOP/s per core on this project's
// machine where the AVX-512 units allow twice that, and the dense convolution the benchmark compares with
// (oneDNN) uses them. The kernel computes C^T tiles of 8 pixels x 32 output channels (16 accumulators): per K
// step two vector loads of the packed weight, eight broadcasts of the pixels' column values, 16 FMAs. Each C
// element is one sequential sum over K, so the result does not depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

namespace eyecool {

// A [M, K] (row stride lda) repacked as ceil(M / 32) panels of [K][32] floats (rows past M are zero).
struct GemmPackedA {
  int64_t rows = 0, depth = 0;
  std::vector<float> panels;
};

GemmPackedA gemm_pack_a(const float* a, int64_t rows, int64_t depth, int64_t lda);

// C[m, p] = (accumulate ? C[m, p] : 0) + sum_k A[m, k] * B[p, k] for m < a.rows, p < pixels; C has row stride
// ldc, B row stride ldb. Requires cpu_has_avx512().
void gemm_packed_a_bt(const GemmPackedA& a, const float* b, int64_t pixels, int64_t ldb, float* c, int64_t ldc,
                      bool accumulate);

}  // namespace eyecool
