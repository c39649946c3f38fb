// See gemm.h. Also registers torch.ops.eyecool_cpu.gemm / gemm_isa, the test and benchmark handles of the
// kernels (tests/ops/test_cpu_gemm.py, benchmarks/bench_deform_conv2d.py).
#include "cpu/gemm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>

#include "cpu/cpu_features.h"

#if EYECOOL_X86
#include <immintrin.h>
#endif

namespace eyecool {

namespace {
// Panel widths: two vectors of the ISA. Rows per tile: accumulators = 2 * rows, leaving registers for the two
// panel vectors and the broadcast (AVX2 has 16 vector registers: 6 rows; AVX-512 32: 12 rows).
constexpr int kAvx512Width = 32;
constexpr int kAvx512Rows = 12;
constexpr int kAvx2Width = 16;
constexpr int kAvx2Rows = 6;
// Depth blocks: a row block's kDepthBlock values per row stay in L1 while the kernel runs over every panel (rows
// read in place lie a whole row apart: without blocking, each of the 12 rows is its own stream from L2 for every
// panel). AVX-512 at 256: 12 rows x 1 KB + a 32 KB panel slice in a 48 KB L1.
constexpr int64_t kDepthBlock = 256;
// Row stride of the partial sums kept between depth blocks: the widest panel.
constexpr int64_t kStartStride = 32;

int64_t panel_width(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return kAvx512Width;
    case CpuIsa::kAvx2:
      return kAvx2Width;
    default:
      TORCH_CHECK(false, "gemm: no kernel for ISA ", cpu_isa_name(isa));
  }
}
}  // namespace

void gemm_pack_panels(CpuIsa isa, const float* src, int64_t columns, int64_t depth, int64_t column_stride,
                      int64_t depth_stride, GemmPanels& out) {
  const int64_t width = panel_width(isa);
  const int64_t panels = (columns + width - 1) / width;
  out.isa = isa;
  out.columns = columns;
  out.depth = depth;
  out.width = width;
  const size_t size = static_cast<size_t>(panels * depth * width);
  if (out.data.size() < size) out.data.resize(size);
  for (int64_t panel = 0; panel < panels; ++panel) {
    float* dst = out.data.data() + panel * depth * width;
    const int64_t j0 = panel * width, count = std::min(width, columns - j0);
    if (column_stride == 1) {
      // Each k's panel row is a contiguous run of the source.
      for (int64_t k = 0; k < depth; ++k) {
        float* d = dst + k * width;
        std::memcpy(d, src + k * depth_stride + j0, static_cast<size_t>(count) * sizeof(float));
        std::fill(d + count, d + width, 0.f);
      }
    } else {
      // Transposing: read each source column along k (contiguous when depth_stride is 1).
      if (count < width) std::fill(dst, dst + depth * width, 0.f);
      for (int64_t j = 0; j < count; ++j) {
        const float* s = src + (j0 + j) * column_stride;
        for (int64_t k = 0; k < depth; ++k) dst[k * width + j] = s[k * depth_stride];
      }
    }
  }
}

void gemm_reserve_panels(CpuIsa isa, int64_t columns, int64_t depth, GemmPanels& out) {
  const int64_t width = panel_width(isa);
  const int64_t panels = (columns + width - 1) / width;
  out.isa = isa;
  out.columns = columns;
  out.depth = depth;
  out.width = width;
  const size_t size = static_cast<size_t>(panels * depth * width);
  if (out.data.size() < size) out.data.resize(size);
  const int64_t used = columns - (panels - 1) * width;  // columns of the last panel
  if (panels > 0 && used < width) {
    float* last = out.data.data() + (panels - 1) * depth * width;
    for (int64_t k = 0; k < depth; ++k) std::fill(last + k * width + used, last + (k + 1) * width, 0.f);
  }
}

#if EYECOOL_X86
namespace {

// Adds (or stores) a tile acc[i][0..width) held in memory into C through its strides; the path for a C whose
// j stride is not 1 or a partial panel.
template <int Width>
inline void write_tile_strided(const float (*acc)[Width], int rows, int columns, float* c, int64_t c_row_stride,
                               int64_t c_column_stride, bool accumulate) {
  for (int j = 0; j < columns; ++j) {
    float* cj = c + j * c_column_stride;
    if (accumulate) {
      for (int i = 0; i < rows; ++i) cj[i * c_row_stride] += acc[i][j];
    } else {
      for (int i = 0; i < rows; ++i) cj[i * c_row_stride] = acc[i][j];
    }
  }
}


// One tile: rows i < MR (row i at r + i * stride, contiguous in k) times one panel [depth][32]: 2 * MR
// accumulators. The rows are addressed from four pointers (rows 0, 3, 6, 9) plus the stride as an index
// register scaled by 4 and 8, so that 12 rows need five general registers, not twelve.
template <int MR>
EYECOOL_TARGET_AVX512 void tile_avx512(const float* panel, const float* r, int64_t stride, int64_t depth, int columns,
                                     const float* start, float* c, int64_t c_row_stride, int64_t c_column_stride,
                                     bool accumulate) {
  __m512 lo[MR], hi[MR];
  if (start) {  // the chains of the depth blocks before this one (kStartStride floats per row)
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      lo[i] = _mm512_loadu_ps(start + i * kStartStride);
      hi[i] = _mm512_loadu_ps(start + i * kStartStride + 16);
    }
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  }
  const float* base[4] = {r, r + 3 * stride, r + 6 * stride, r + 9 * stride};
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 p_lo = _mm512_loadu_ps(panel + k * kAvx512Width);
    const __m512 p_hi = _mm512_loadu_ps(panel + k * kAvx512Width + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 b = _mm512_set1_ps(base[i / 3][(i % 3) * stride]);
      lo[i] = _mm512_fmadd_ps(b, p_lo, lo[i]);
      hi[i] = _mm512_fmadd_ps(b, p_hi, hi[i]);
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) ++base[q];
  }
  if (c_column_stride == 1) {
    // Rows of C are contiguous in j: masked vector stores cover a partial panel too.
    const __mmask16 m_lo = static_cast<__mmask16>(columns >= 16 ? 0xFFFF : (1u << columns) - 1);
    const __mmask16 m_hi =
        static_cast<__mmask16>(columns >= 32 ? 0xFFFF : columns > 16 ? (1u << (columns - 16)) - 1 : 0);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * c_row_stride;
      __m512 v_lo = lo[i], v_hi = hi[i];
      if (accumulate) {
        v_lo = _mm512_add_ps(_mm512_maskz_loadu_ps(m_lo, ci), v_lo);
        v_hi = _mm512_add_ps(_mm512_maskz_loadu_ps(m_hi, ci + 16), v_hi);
      }
      _mm512_mask_storeu_ps(ci, m_lo, v_lo);
      _mm512_mask_storeu_ps(ci + 16, m_hi, v_hi);
    }
    return;
  }
  alignas(64) float tile[MR][kAvx512Width];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_store_ps(tile[i], lo[i]);
    _mm512_store_ps(tile[i] + 16, hi[i]);
  }
  write_tile_strided<kAvx512Width>(tile, MR, columns, c, c_row_stride, c_column_stride, accumulate);
}

template <int MR>
EYECOOL_TARGET_AVX2 void tile_avx2(const float* panel, const float* r, int64_t stride, int64_t depth, int columns,
                                 const float* start, float* c, int64_t c_row_stride, int64_t c_column_stride,
                                 bool accumulate) {
  __m256 lo[MR], hi[MR];
  if (start) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      lo[i] = _mm256_loadu_ps(start + i * kStartStride);
      hi[i] = _mm256_loadu_ps(start + i * kStartStride + 8);
    }
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
  }
  const float* base[2] = {r, r + 3 * stride};
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 p_lo = _mm256_loadu_ps(panel + k * kAvx2Width);
    const __m256 p_hi = _mm256_loadu_ps(panel + k * kAvx2Width + 8);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(base[i / 3] + (i % 3) * stride);
      lo[i] = _mm256_fmadd_ps(b, p_lo, lo[i]);
      hi[i] = _mm256_fmadd_ps(b, p_hi, hi[i]);
    }
    ++base[0];
    ++base[1];
  }
  if (c_column_stride == 1 && columns == kAvx2Width) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * c_row_stride;
      __m256 v_lo = lo[i], v_hi = hi[i];
      if (accumulate) {
        v_lo = _mm256_add_ps(_mm256_loadu_ps(ci), v_lo);
        v_hi = _mm256_add_ps(_mm256_loadu_ps(ci + 8), v_hi);
      }
      _mm256_storeu_ps(ci, v_lo);
      _mm256_storeu_ps(ci + 8, v_hi);
    }
    return;
  }
  alignas(32) float acc[MR][kAvx2Width];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(acc[i], lo[i]);
    _mm256_store_ps(acc[i] + 8, hi[i]);
  }
  write_tile_strided<kAvx2Width>(acc, MR, columns, c, c_row_stride, c_column_stride, accumulate);
}

using TileKernel = void (*)(const float*, const float*, int64_t, int64_t, int, const float*, float*, int64_t, int64_t,
                           bool);
constexpr TileKernel kAvx512Tiles[kAvx512Rows] = {
    tile_avx512<1>, tile_avx512<2>, tile_avx512<3>, tile_avx512<4>,  tile_avx512<5>,  tile_avx512<6>,
    tile_avx512<7>, tile_avx512<8>, tile_avx512<9>, tile_avx512<10>, tile_avx512<11>, tile_avx512<12>};
constexpr TileKernel kAvx2Tiles[kAvx2Rows] = {tile_avx2<1>, tile_avx2<2>, tile_avx2<3>,
                                              tile_avx2<4>, tile_avx2<5>, tile_avx2<6>};

}  // namespace
#endif

void gemm_rows_x_panels(const float* rows, int64_t row_count, int64_t row_stride, const GemmPanels& panels, float* c,
                        int64_t c_row_stride, int64_t c_column_stride, bool accumulate) {
  TORCH_CHECK(gemm_isa_available(panels.isa), "gemm: the ", cpu_isa_name(panels.isa),
              " kernel does not run on this CPU (or EYECOOL_CPU_ISA caps it)");
#if EYECOOL_X86
  const bool avx512 = panels.isa == CpuIsa::kAvx512;
  const int max_rows = avx512 ? kAvx512Rows : kAvx2Rows;
  const TileKernel* kernels = avx512 ? kAvx512Tiles : kAvx2Tiles;
  const int64_t width = panels.width, depth = panels.depth;
  const int64_t panel_count = (panels.columns + width - 1) / width;
  // Row blocks outside, then depth blocks, panels inside: a block's rows (one depth block of them) stay in L1
  // while the panels' slices stream from L2. Between depth blocks each (row, column)'s chain is kept in `partial`
  // exactly (a float stored and reloaded), so the result is the one sequential FMA chain over the whole depth
  // whatever kDepthBlock is.
  const int64_t depth_blocks = std::max<int64_t>(1, (depth + kDepthBlock - 1) / kDepthBlock);
  thread_local std::vector<float> partial;
  if (depth_blocks > 1) partial.resize(static_cast<size_t>(max_rows * panel_count * kStartStride));
  for (int64_t i0 = 0; i0 < row_count; i0 += max_rows) {
    const int count = static_cast<int>(std::min<int64_t>(max_rows, row_count - i0));
    const float* row_block = rows + i0 * row_stride;
    for (int64_t block = 0; block < depth_blocks; ++block) {
      const int64_t k0 = block * kDepthBlock, k_count = std::min(kDepthBlock, depth - k0);
      const bool first = block == 0, last = block == depth_blocks - 1;
      for (int64_t panel = 0; panel < panel_count; ++panel) {
        const int64_t j0 = panel * width;
        const int columns = static_cast<int>(std::min<int64_t>(width, panels.columns - j0));
        float* chains = depth_blocks > 1 ? partial.data() + panel * max_rows * kStartStride : nullptr;
        const float* panel_block = panels.data.data() + panel * depth * width + k0 * width;
        if (last) {
          kernels[count - 1](panel_block, row_block + k0, row_stride, k_count, columns, first ? nullptr : chains,
                             c + i0 * c_row_stride + j0 * c_column_stride, c_row_stride, c_column_stride, accumulate);
        } else {
          kernels[count - 1](panel_block, row_block + k0, row_stride, k_count, static_cast<int>(width),
                             first ? nullptr : chains, chains, kStartStride, 1, false);
        }
      }
    }
  }
#endif
}

namespace {

CpuIsa parse_isa(const std::string& name) {
  if (name == "best") return gemm_isa();
  if (name == "avx512") return CpuIsa::kAvx512;
  if (name == "avx2") return CpuIsa::kAvx2;
  TORCH_CHECK(false, "eyecool_cpu::gemm: isa must be 'best', 'avx512' or 'avx2', got '", name, "'");
}

// out[i, j] (+)= sum_k rows[i, k] * columns[j, k] through the kernel of `isa`; rows [I, K] with unit stride in k,
// columns [J, K] and out [I, J] with any strides (out is written in place).
at::Tensor gemm_op(at::Tensor out, const at::Tensor& rows, const at::Tensor& columns, bool accumulate,
                   const std::string& isa_name) {
  TORCH_CHECK(rows.dim() == 2 && columns.dim() == 2 && out.dim() == 2,
              "eyecool_cpu::gemm: expected out [I, J], rows [I, K], columns [J, K], got ", out.sizes(), ", ",
              rows.sizes(), ", ", columns.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kFloat && columns.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "eyecool_cpu::gemm: float32 tensors only");
  TORCH_CHECK(rows.device().is_cpu() && columns.device().is_cpu() && out.device().is_cpu(),
              "eyecool_cpu::gemm: CPU tensors only");
  TORCH_CHECK(rows.size(1) == columns.size(1) && out.size(0) == rows.size(0) && out.size(1) == columns.size(0),
              "eyecool_cpu::gemm: shapes do not match: out ", out.sizes(), ", rows ", rows.sizes(), ", columns ",
              columns.sizes());
  TORCH_CHECK(rows.size(1) <= 1 || rows.stride(1) == 1, "eyecool_cpu::gemm: rows must be contiguous in k, got strides ",
              rows.strides());
  const CpuIsa isa = parse_isa(isa_name);
  TORCH_CHECK(gemm_isa_available(isa), "eyecool_cpu::gemm: the ", cpu_isa_name(isa),
              " kernel does not run on this CPU (or EYECOOL_CPU_ISA caps it)");
  if (out.numel() == 0) return out;
  GemmPanels panels;
  gemm_pack_panels(isa, columns.data_ptr<float>(), columns.size(0), columns.size(1), columns.stride(0),
                   columns.stride(1), panels);
  gemm_rows_x_panels(rows.data_ptr<float>(), rows.size(0), rows.stride(0), panels, out.data_ptr<float>(),
                     out.stride(0), out.stride(1), accumulate);
  return out;
}

}  // namespace

}  // namespace eyecool

// Test and benchmark handles of the CPU GEMM (not part of the public API).
TORCH_LIBRARY(eyecool_cpu, m) {
  m.def("gemm(Tensor(a!) out, Tensor rows, Tensor columns, bool accumulate, str isa) -> Tensor(a!)",
        &eyecool::gemm_op);
  // The kernel deform_conv2d's float GEMMs run on this CPU now: "avx512", "avx2" or "baseline" (at::mm).
  m.def("gemm_isa() -> str", []() { return std::string(eyecool::cpu_isa_name(eyecool::gemm_isa())); });
}
