// The float GEMM of the deformable convolution's CPU forward and backward, with an AVX-512 and an AVX2 + FMA
// kernel picked at run time (cpu_features.h's cpu_isa(); EYECOOL_CPU_ISA caps the choice):
//
//   C[i, j] = (accumulate ? C[i, j] : 0) + sum_k R[i, k] * P[j, k]
//
// R ("rows", read in place, each row contiguous in k, rows a fixed stride apart) is broadcast one value at a
// time; P ("panels") is repacked once into panels of [depth][panel width] floats that the kernel loads as whole
// vectors; C is written through any two strides (a vector store when its j stride is 1).
//
// Why not at::mm: torch's BLAS (MKL) runs its AVX2 code on AMD CPUs, half the speed the AVX-512 units allow,
// and it needs a copy of whichever operand is not in one of its layouts (the column tile is [pixel, k] but the
// output is [channel, pixel]). The kernel computes tiles of up to kMaxRows rows x one panel: per k step the
// panel's vector loads, one broadcast per row and an FMA per (row, vector), all in registers.
//
// Determinism: every C element is one sequential FMA chain over k = 0 .. depth - 1 started from 0, then added
// to C (when accumulating); the depth runs in blocks (gemm.cpp's kDepthBlock) whose chains are stored and reloaded
// as floats in between, which changes nothing. Nothing depends on the thread count (one call runs on one thread); the ISA changes
// the rounding of a product only through FMA contraction.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/cpu_features.h"

namespace eyecool {

// The kernel cpu_isa() selects: kAvx512 or kAvx2, or kBaseline on a CPU without AVX2 + FMA (or capped to the
// baseline), where there is no kernel and callers use at::mm.
inline CpuIsa gemm_isa() { return cpu_isa(); }
// Whether `isa` has a kernel that runs here under the cap (kBaseline: never).
inline bool gemm_isa_available(CpuIsa isa) { return isa != CpuIsa::kBaseline && isa <= cpu_isa(); }

// P[j, k] (j < columns, k < depth) repacked for one ISA's kernel: ceil(columns / width) panels of [depth][width]
// floats, columns past `columns` zero.
struct GemmPanels {
  CpuIsa isa = CpuIsa::kBaseline;
  int64_t columns = 0, depth = 0, width = 0;
  std::vector<float> data;
};

// Packs P[j, k] = src[j * column_stride + k * depth_stride]. Reuses `out`'s storage (no allocation when it is
// already large enough), so a per-tile repack costs only the copy.
void gemm_pack_panels(CpuIsa isa, const float* src, int64_t columns, int64_t depth, int64_t column_stride,
                      int64_t depth_stride, GemmPanels& out);

// Sets `out` up to be written in place (P[j, k] at gemm_panel_entry), for a producer that can write the packed
// layout directly instead of a source to pack: the storage is reused, and the padding columns of a partial last
// panel are zeroed.
void gemm_reserve_panels(CpuIsa isa, int64_t columns, int64_t depth, GemmPanels& out);

// Where P[j, k] lives in panels set up by gemm_reserve_panels (or packed); P[j + 1, k] follows it up to the end of
// j's panel (j % panels.width + run <= panels.width).
inline float* gemm_panel_entry(GemmPanels& panels, int64_t j, int64_t k) {
  return panels.data.data() + (j / panels.width) * panels.depth * panels.width + k * panels.width + j % panels.width;
}

// C[i, j] (+)= sum_k rows[i * row_stride + k] * P[j, k] for i < row_count, j < panels.columns; C[i, j] is
// c[i * c_row_stride + j * c_column_stride]. Runs the kernel of panels.isa (which must be available).
void gemm_rows_x_panels(const float* rows, int64_t row_count, int64_t row_stride, const GemmPanels& panels, float* c,
                        int64_t c_row_stride, int64_t c_column_stride, bool accumulate);

}  // namespace eyecool
