// See gemm_avx512.h.
#include "cpu/gemm_avx512.h"

#include <algorithm>
#include <cstring>

#include <c10/util/Exception.h>

#include "cpu/cpu_features.h"

#if EYECOOL_X86
#include <immintrin.h>
#endif

namespace eyecool {

namespace {
constexpr int64_t kPanelRows = 32;  // output channels per panel: two 16-float vectors
constexpr int kTilePixels = 8;      // pixels per C^T tile
}  // namespace

GemmPackedA gemm_pack_a(const float* a, int64_t rows, int64_t depth, int64_t lda) {
  GemmPackedA packed;
  packed.rows = rows;
  packed.depth = depth;
  const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
  packed.panels.assign(static_cast<size_t>(panels * depth * kPanelRows), 0.f);
  for (int64_t m = 0; m < rows; ++m) {
    float* dst = packed.panels.data() + (m / kPanelRows) * depth * kPanelRows + m % kPanelRows;
    const float* src = a + m * lda;
    for (int64_t k = 0; k < depth; ++k) dst[k * kPanelRows] = src[k];
  }
  return packed;
}

#if EYECOOL_X86
namespace {

// acc[i][0..31] = sum_k b_rows[i][k] * panel[k][0..31] for i < MR.
template <int MR>
__attribute__((target("avx512f"))) void tile_kernel(const float* panel, const float* const* b_rows, int64_t depth,
                                                    float (*acc)[kPanelRows]) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 a_lo = _mm512_loadu_ps(panel + k * kPanelRows);
    const __m512 a_hi = _mm512_loadu_ps(panel + k * kPanelRows + 16);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 b = _mm512_set1_ps(b_rows[i][k]);
      lo[i] = _mm512_fmadd_ps(b, a_lo, lo[i]);
      hi[i] = _mm512_fmadd_ps(b, a_hi, hi[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(acc[i], lo[i]);
    _mm512_storeu_ps(acc[i] + 16, hi[i]);
  }
}

using TileKernel = void (*)(const float*, const float* const*, int64_t, float (*)[kPanelRows]);
constexpr TileKernel kTileKernels[kTilePixels] = {tile_kernel<1>, tile_kernel<2>, tile_kernel<3>, tile_kernel<4>,
                                                  tile_kernel<5>, tile_kernel<6>, tile_kernel<7>, tile_kernel<8>};

}  // namespace
#endif

void gemm_packed_a_bt(const GemmPackedA& a, const float* b, int64_t pixels, int64_t ldb, float* c, int64_t ldc,
                      bool accumulate) {
#if EYECOOL_X86
  TORCH_CHECK(cpu_has_avx512(), "gemm_packed_a_bt needs AVX-512");
  const int64_t panels = (a.rows + kPanelRows - 1) / kPanelRows;
  alignas(64) float acc[kTilePixels][kPanelRows];
  const float* b_rows[kTilePixels];
  for (int64_t panel = 0; panel < panels; ++panel) {
    const float* panel_data = a.panels.data() + panel * a.depth * kPanelRows;
    const int64_t m0 = panel * kPanelRows, m_count = std::min(kPanelRows, a.rows - m0);
    for (int64_t p0 = 0; p0 < pixels; p0 += kTilePixels) {
      const int count = static_cast<int>(std::min<int64_t>(kTilePixels, pixels - p0));
      for (int i = 0; i < count; ++i) b_rows[i] = b + (p0 + i) * ldb;
      kTileKernels[count - 1](panel_data, b_rows, a.depth, acc);
      // C is channel-major (row m holds the pixels): each of the panel's channels gets `count` pixels.
      for (int64_t j = 0; j < m_count; ++j) {
        float* c_row = c + (m0 + j) * ldc + p0;
        if (accumulate) {
          for (int i = 0; i < count; ++i) c_row[i] += acc[i][j];
        } else {
          for (int i = 0; i < count; ++i) c_row[i] = acc[i][j];
        }
      }
    }
  }
#else
  TORCH_CHECK(false, "gemm_packed_a_bt needs AVX-512");
#endif
}

}  // namespace eyecool
