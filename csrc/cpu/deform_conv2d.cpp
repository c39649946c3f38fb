// Deformable convolution on the CPU as "sample, then GEMM", on a channels-last copy of the input so that every
// bilinear tap reads a contiguous run of channels.
//
//   forward:  parallel over tiles of output pixels. A tile builds its column matrix cols[pixel, k, c] (bilinear
//             weights computed once per pixel, kernel point and offset group, modulation folded in) and
//             multiplies it with the weight into its own output columns: out[:, tile] = W @ cols^T.
//   backward: parallel over blocks of input channels. A block walks every tile in the same order, rebuilds its
//             slice of the columns (in float, straight into the grad_w GEMM's packed panels), accumulates its
//             columns of grad_weight (grad_out^T @ cols), forms its column gradient with one GEMM (grad_out @ W)
//             and, in one pass per sample, scatters it into its own channels of grad_input and sums it against
//             the taps for the offset and mask gradients, which are per-block partial sums reduced in block
//             order. Every output has one owner,
//             and the block partition does not depend on the thread count, so the result is deterministic and
//             the same for any number of threads.
//
// The float GEMMs (the forward's and both of the backward's) run gemm.h's own kernels on AVX2 + FMA and AVX-512
// CPUs (cpu_isa(), capped by EYECOOL_CPU_ISA), at::mm on the baseline ISA and in double. The sampling arithmetic
// (position, taps, value, coordinate gradient) comes from deform_conv2d.h, shared with the CUDA kernels. Half
// and bfloat16 run in float.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "deform_conv2d.h"

namespace eyecool {
namespace {

// Column tiles of about a core's L2 cache: the GEMM packs the weight once per tile, so larger tiles amortise
// that over more pixels, while smaller ones keep the freshly sampled columns in cache for the GEMM.
constexpr int64_t kTileBytes = 1024 * 1024;
constexpr int64_t kMinTilePixels = 16;
constexpr int64_t kMaxTilePixels = 252;  // 21 x 12
constexpr int64_t kGemmRowBlock = 12;
// Channel blocks of the backward: at most 64 channels (kh * kw * 64 GEMM columns), and at least 32 unless the
// group is narrower, aiming at 4 blocks per layer so that a few threads share the work evenly. The partition
// depends on the shapes only, never on the thread count.
constexpr int64_t kMaxBlockChannels = 64;
constexpr int64_t kMinBlockChannels = 32;
constexpr int64_t kBlocksWanted = 4;
// Below this many multiply-adds a thread runs alone: waking the pool costs more than it saves on tiny layers.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;
// Samples ahead whose taps the backward's scatter loop prefetches.
constexpr int64_t kPrefetchAhead = 4;

// Runs body(item, scratch) for every item in [0, count) on the intra-op thread pool. Items are handed out one
// at a time from a shared counter, so a thread that falls behind (another process on its core) does not hold
// the others up, as a static split would. Every item owns its outputs, so the result does not depend on which
// thread ran it. make_scratch() builds one scratch object per worker (reused across its items).
template <typename MakeScratch, typename Body>
void parallel_items(int64_t count, int64_t work_per_item, const MakeScratch& make_scratch, const Body& body) {
  if (count <= 0) return;
  const int64_t by_work = std::max<int64_t>(1, count * work_per_item / kMinWorkPerThread);
  const int64_t workers = std::min<int64_t>({count, by_work, std::max<int64_t>(1, at::get_num_threads())});
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      auto scratch = make_scratch();
      for (int64_t item = next++; item < count; item = next++) body(item, scratch);
    }
  });
}

// ---- the hot channel loops ----
// Written once as always-inline bodies and compiled per ISA by cpu_features.h's dispatch_cpu_isa (baseline,
// AVX2+FMA, AVX-512; EYECOOL_CPU_ISA caps the choice), so they run at full vector width without a
// machine-specific build.

// Independent partial sums per lane let the compiler vectorise a dot product without reassociating it (which
// it may not do under IEEE rules); the lanes are added in a fixed order, so the result does not depend on the ISA
// beyond FMA contraction.
constexpr int kLanes = 16;

template <typename T>
EYECOOL_ALWAYS_INLINE inline void blend4_body(T* __restrict__ dest, const T* __restrict__ p1,
                                                       const T* __restrict__ p2, const T* __restrict__ p3,
                                                       const T* __restrict__ p4, T w1, T w2, T w3, T w4, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dest[c] = w1 * p1[c] + w2 * p2[c] + w3 * p3[c] + w4 * p4[c];
}

// The sum of a lane array in a fixed pairwise order (lanes l and l + w, halving w): the compiler turns it into a
// few vector shuffles and adds, where a sequential sum of 16 lanes is a chain of 16 dependent scalar adds.
template <typename T>
EYECOOL_ALWAYS_INLINE inline T lane_sum(T (&a)[kLanes]) {
#pragma GCC unroll 8
  for (int w = kLanes / 2; w > 0; w /= 2) {
#pragma GCC unroll 16
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  }
  return a[0];
}

// One pass over a sample's column gradient g (n channels) for its four taps v1..v4: the channel sums
// sums[i] = sum_c g[c] v_i[c] (the value and coordinate gradients are linear in them) and the scatter
// d_i[c] += w_i g[c] into grad_input. The d_i are distinct (a tap that must not be written points at scratch).
template <typename T>
EYECOOL_ALWAYS_INLINE inline void dot4_scatter4_body(const T* __restrict__ g, const T* __restrict__ v1,
                                                     const T* __restrict__ v2, const T* __restrict__ v3,
                                                     const T* __restrict__ v4, T* __restrict__ d1,
                                                     T* __restrict__ d2, T* __restrict__ d3, T* __restrict__ d4,
                                                     T w1, T w2, T w3, T w4, int64_t n, T* __restrict__ sums) {
  T a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {}, a4[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T gl = g[c + l];
      a1[l] += gl * v1[c + l];
      a2[l] += gl * v2[c + l];
      a3[l] += gl * v3[c + l];
      a4[l] += gl * v4[c + l];
      d1[c + l] += w1 * gl;
      d2[c + l] += w2 * gl;
      d3[c + l] += w3 * gl;
      d4[c + l] += w4 * gl;
    }
  }
  T s1 = lane_sum(a1), s2 = lane_sum(a2), s3 = lane_sum(a3), s4 = lane_sum(a4);
  for (; c < n; ++c) {
    const T gc = g[c];
    s1 += gc * v1[c];
    s2 += gc * v2[c];
    s3 += gc * v3[c];
    s4 += gc * v4[c];
    d1[c] += w1 * gc;
    d2[c] += w2 * gc;
    d3[c] += w3 * gc;
    d4[c] += w4 * gc;
  }
  sums[0] = s1;
  sums[1] = s2;
  sums[2] = s3;
  sums[3] = s4;
}

// Raw pointers of one call's sampling inputs.
template <typename scalar_t>
struct SamplingView {
  const scalar_t* image;   // [N, H, W, C_in] channels-last
  const scalar_t* offset;  // [N, offset_groups, K, 2, L] (the NCHW offset tensor, contiguous)
  const scalar_t* mask;    // [N, offset_groups, K, L], or nullptr for DCN v1
  CpuIsa isa;              // the channel loops' variant (cpu_isa(), read once per call)
};

// One sample's taps with the modulation of its kernel point (1 without mask).
template <typename scalar_t>
struct ModulatedTaps {
  DeformTaps<scalar_t> taps;
  scalar_t modulation;
};

template <typename scalar_t>
EYECOOL_ALWAYS_INLINE inline ModulatedTaps<scalar_t> sample(const DeformConv2dShape& s, const SamplingView<scalar_t>& v, int64_t n,
                               int64_t og, int64_t k, int64_t pixel) {
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t oy = pixel / s.out_w, ox = pixel - oy * s.out_w;
  const int64_t ki = k / s.kernel_w, kj = k - ki * s.kernel_w;
  const int64_t channel = (n * s.offset_groups + og) * taps + k;
  const scalar_t* off = v.offset + channel * 2 * plane + pixel;
  const scalar_t y = deform_sampling_position<scalar_t>(oy, ki, s.stride_h, s.pad_h, s.dilation_h, off[0]);
  const scalar_t x = deform_sampling_position<scalar_t>(ox, kj, s.stride_w, s.pad_w, s.dilation_w, off[plane]);
  ModulatedTaps<scalar_t> out;
  out.taps = deform_bilinear_taps<scalar_t>(s.height, s.width, y, x);
  out.modulation = v.mask ? v.mask[channel * plane + pixel] : scalar_t(1);
  return out;
}

// dest[c] = sum_i w_i * tap_i[c] for `count` contiguous channels; a sample wholly outside the image is 0. The
// body for a loop that is dispatched as a whole; write_sample dispatches per call.
template <typename scalar_t>
EYECOOL_ALWAYS_INLINE inline void write_sample_body(scalar_t* dest, const scalar_t* image_n, const DeformConv2dShape& s,
                                                    const ModulatedTaps<scalar_t>& mt, int64_t c0, int64_t count) {
  const DeformTaps<scalar_t>& t = mt.taps;
  if (!t.any) {
    for (int64_t c = 0; c < count; ++c) dest[c] = scalar_t(0);
    return;
  }
  const int64_t C = s.in_channels, W = s.width;
  const scalar_t m = mt.modulation;
  blend4_body(dest, image_n + (t.y_low * W + t.x_low) * C + c0, image_n + (t.y_low * W + t.x_high) * C + c0,
              image_n + (t.y_high * W + t.x_low) * C + c0, image_n + (t.y_high * W + t.x_high) * C + c0, m * t.w1,
              m * t.w2, m * t.w3, m * t.w4, count);
}

template <typename scalar_t>
inline void write_sample(CpuIsa isa, scalar_t* dest, const scalar_t* image_n, const DeformConv2dShape& s,
                         const ModulatedTaps<scalar_t>& mt, int64_t c0, int64_t count) {
  dispatch_cpu_isa(isa, [&]() EYECOOL_ALWAYS_INLINE { write_sample_body(dest, image_n, s, mt, c0, count); });
}

// Pixels per tile so that a tile's columns (row_elements values per pixel) take about kTileBytes.
int64_t cache_tile_pixels(int64_t row_elements, int64_t element_size, int64_t plane) {
  int64_t pixels = kTileBytes / std::max<int64_t>(1, row_elements * element_size);
  // A multiple of the GEMM kernel's 12 rows (AVX2: 6), so that no tile ends in a narrower, slower row block.
  if (pixels > kGemmRowBlock) pixels -= pixels % kGemmRowBlock;
  return std::min(std::min(std::max(pixels, kMinTilePixels), kMaxTilePixels), plane);
}

// Forward tiles: pixel ranges inside one image, cache-sized, and at least two per thread when the batch allows.
int64_t forward_tile_pixels(const DeformConv2dShape& s, int64_t row_elements, int64_t element_size) {
  const int64_t plane = s.out_h * s.out_w;
  int64_t pixels = cache_tile_pixels(row_elements, element_size, plane);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t images = std::max<int64_t>(1, s.batch);
  const int64_t per_image = (2 * threads + images - 1) / images;
  if (per_image > 1) pixels = std::min(pixels, std::max(kMinTilePixels, (plane + per_image - 1) / per_image));
  return std::min(pixels, plane);
}

template <typename scalar_t>
void forward_kernel(const DeformConv2dShape& s, const SamplingView<scalar_t>& v, const at::Tensor& weight_rows,
                    bool has_bias, at::Tensor& output) {
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t C = s.in_channels;
  const int64_t c_per_group = C / s.groups, c_per_offset_group = C / s.offset_groups;
  const int64_t out_per_group = s.out_channels / s.groups;
  const int64_t row = taps * C;  // cols layout [pixel, group, k, c_in_group]
  const int64_t tile = forward_tile_pixels(s, row, sizeof(scalar_t));
  const int64_t tiles_per_image = (plane + tile - 1) / tile;
  const int64_t work_per_tile = tile * row * (s.out_channels / s.groups + 4);
  const auto make_cols = [&] { return at::empty({tile, row}, output.options()); };
  // Float on an AVX2 or AVX-512 CPU: the weight packed once for gemm.h's kernel (see there why not at::mm).
  std::vector<GemmPanels> packed_weight;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const CpuIsa isa = v.isa;
    if (isa != CpuIsa::kBaseline) {
      packed_weight.resize(s.groups);
      for (int64_t g = 0; g < s.groups; ++g) {
        gemm_pack_panels(isa, weight_rows.data_ptr<float>() + g * out_per_group * taps * c_per_group, out_per_group,
                         taps * c_per_group, taps * c_per_group, 1, packed_weight[g]);
      }
    }
  }
  parallel_items(s.batch * tiles_per_image, work_per_tile, make_cols, [&](int64_t t, at::Tensor& cols) {
    scalar_t* cols_data = cols.data_ptr<scalar_t>();
    const int64_t n = t / tiles_per_image;
    const int64_t p0 = (t - n * tiles_per_image) * tile;
    const int64_t count = std::min(tile, plane - p0);
    const scalar_t* image_n = v.image + n * s.height * s.width * C;
    // One dispatch per tile (not per sample): the loop is compiled per ISA with the blend inlined. A pixel's
    // samples are computed while the pixel before it is blended, and their taps prefetched: the taps lie rows
    // apart, where the hardware prefetcher cannot guess them.
    const int64_t per_pixel = taps * s.offset_groups;
    std::vector<ModulatedTaps<scalar_t>> current(per_pixel), ahead(per_pixel);
    dispatch_cpu_isa(v.isa, [&]() EYECOOL_ALWAYS_INLINE {
      const auto sample_pixel = [&](int64_t pixel, ModulatedTaps<scalar_t>* out, bool prefetch) EYECOOL_ALWAYS_INLINE {
        for (int64_t k = 0; k < taps; ++k) {
          for (int64_t og = 0; og < s.offset_groups; ++og) {
            ModulatedTaps<scalar_t>& mt = out[k * s.offset_groups + og];
            mt = sample(s, v, n, og, k, pixel);
            if (prefetch && mt.taps.any) {
              const DeformTaps<scalar_t>& t = mt.taps;
              const scalar_t* row_low = image_n + t.y_low * s.width * C + og * c_per_offset_group;
              const scalar_t* row_high = image_n + t.y_high * s.width * C + og * c_per_offset_group;
              for (int64_t c = 0; c < c_per_offset_group; c += 64 / static_cast<int64_t>(sizeof(scalar_t))) {
                __builtin_prefetch(row_low + t.x_low * C + c);
                __builtin_prefetch(row_low + t.x_high * C + c);
                __builtin_prefetch(row_high + t.x_low * C + c);
                __builtin_prefetch(row_high + t.x_high * C + c);
              }
            }
          }
        }
      };
      sample_pixel(p0, current.data(), false);
      for (int64_t p = 0; p < count; ++p) {
        if (p + 1 < count) sample_pixel(p0 + p + 1, ahead.data(), true);
        scalar_t* cols_row = cols_data + p * row;
        for (int64_t k = 0; k < taps; ++k) {
          for (int64_t og = 0; og < s.offset_groups; ++og) {
            const ModulatedTaps<scalar_t>& mt = current[k * s.offset_groups + og];
            // The offset group's channels, split where they cross into another weight group.
            int64_t c = og * c_per_offset_group;
            const int64_t c_end = c + c_per_offset_group;
            while (c < c_end) {
              const int64_t g = c / c_per_group;
              const int64_t stop = std::min(c_end, (g + 1) * c_per_group);
              scalar_t* dest = cols_row + g * taps * c_per_group + k * c_per_group + (c - g * c_per_group);
              write_sample_body(dest, image_n, s, mt, c, stop - c);
              c = stop;
            }
          }
        }
        current.swap(ahead);
      }
    });
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (!packed_weight.empty()) {
        float* out_n = output.data_ptr<float>() + n * s.out_channels * plane;
        for (int64_t g = 0; g < s.groups; ++g) {
          // out[m, p0 + p] (+)= sum_k cols[p, k] W[m, k]: the column tile's pixels are the GEMM's rows.
          gemm_rows_x_panels(cols_data + g * taps * c_per_group, count, row, packed_weight[g],
                             out_n + g * out_per_group * plane + p0, 1, plane, has_bias);
        }
        return;
      }
    }
    at::Tensor out_n = output.select(0, n).view({s.out_channels, plane});
    for (int64_t g = 0; g < s.groups; ++g) {
      at::Tensor out_tile = out_n.narrow(0, g * out_per_group, out_per_group).narrow(1, p0, count);
      at::Tensor cols_g = cols.narrow(0, 0, count).narrow(1, g * taps * c_per_group, taps * c_per_group);
      at::Tensor w_g = weight_rows.narrow(0, g * out_per_group, out_per_group);
      if (has_bias) {
        out_tile.addmm_(w_g, cols_g.t());  // the output starts as the bias
      } else {
        at::mm_out(out_tile, w_g, cols_g.t());
      }
    }
  });
}

// ---- layout changes ----
// The channels-last copies of the input (both passes) and the channels-first copy of grad_input, as a transpose of
// each image's [rows, cols] plane in 32 x 32 tiles, parallel over tiles. permute().contiguous() walks the output
// in order and gathers with a stride: 7 ms for NCHW -> NHWC and 31 ms for NHWC -> NCHW of a 256 x 128 x 128 float
// image on one core here, against 3.9 and 2.6 ms tiled (a plain copy: 1.2 ms); at 2 threads the two directions
// were ~10% of the op's forward+backward.
constexpr int64_t kTransposeTile = 32;

template <typename scalar_t>
void transpose_tile(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t rows, int64_t cols,
                    int64_t r0, int64_t c0) {
  const int64_t r1 = std::min(r0 + kTransposeTile, rows), c1 = std::min(c0 + kTransposeTile, cols);
  if (r1 - r0 == kTransposeTile && c1 - c0 == kTransposeTile) {  // full tiles: constant trip counts
    for (int64_t c = 0; c < kTransposeTile; ++c) {
      for (int64_t r = 0; r < kTransposeTile; ++r) dst[(c0 + c) * rows + r0 + r] = src[(r0 + r) * cols + c0 + c];
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
  }
}

// src viewed as [N, rows, cols] (contiguous) -> a new contiguous [N, cols, rows] tensor.
at::Tensor transposed_planes(const at::Tensor& src, int64_t batch, int64_t rows, int64_t cols) {
  TORCH_INTERNAL_ASSERT(src.is_contiguous() && src.numel() == batch * rows * cols);
  at::Tensor dst = at::empty({batch, cols, rows}, src.options());
  const int64_t row_tiles = (rows + kTransposeTile - 1) / kTransposeTile;
  const int64_t col_tiles = (cols + kTransposeTile - 1) / kTransposeTile;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "transposed_planes", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    at::parallel_for(0, batch * row_tiles * col_tiles, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / (row_tiles * col_tiles), rt = t / col_tiles % row_tiles, ct = t % col_tiles;
        transpose_tile(in + n * rows * cols, out + n * rows * cols, rows, cols, rt * kTransposeTile,
                       ct * kTransposeTile);
      }
    });
  });
  return dst;
}

// [N, C, H, W] -> contiguous [N, H, W, C] (in the compute type).
at::Tensor channels_last_copy(const at::Tensor& input, at::ScalarType type) {
  const int64_t n = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  // A channels_last input of the compute type already is that layout: no copy.
  const at::Tensor nhwc = input.permute({0, 2, 3, 1});
  if (input.scalar_type() == type && nhwc.is_contiguous()) return nhwc;
  return transposed_planes(input.to(type).contiguous(), n, c, h * w).view({n, h, w, c});
}

// A backward channel block: channels [c0, c1), inside one weight group and one offset group.
struct ChannelBlock {
  int64_t c0, c1, group, offset_group;
};

std::vector<ChannelBlock> channel_blocks(const DeformConv2dShape& s) {
  const int64_t c_per_group = s.in_channels / s.groups, c_per_offset_group = s.in_channels / s.offset_groups;
  const int64_t block_channels = std::min(
      kMaxBlockChannels, std::max(kMinBlockChannels, (s.in_channels + kBlocksWanted - 1) / kBlocksWanted));
  std::vector<ChannelBlock> blocks;
  int64_t c = 0;
  while (c < s.in_channels) {
    // The next boundary of either partition ends this segment; split the segment into even blocks.
    const int64_t stop = std::min((c / c_per_group + 1) * c_per_group, (c / c_per_offset_group + 1) * c_per_offset_group);
    const int64_t pieces = (stop - c + block_channels - 1) / block_channels;
    for (int64_t i = 0; i < pieces; ++i) {
      const int64_t b0 = c + (stop - c) * i / pieces, b1 = c + (stop - c) * (i + 1) / pieces;
      blocks.push_back({b0, b1, b0 / c_per_group, b0 / c_per_offset_group});
    }
    c = stop;
  }
  return blocks;
}

// grad_input_cl: [N, H, W, C] zeroed; weight_perm: [C_out, K, C_in / groups]; grad_weight_perm: same shape;
// offset_partial: [blocks, N, K, 2, L] and mask_partial: [blocks, N, K, L] (when masked), zeroed.
template <typename scalar_t>
void backward_kernel(const DeformConv2dShape& s, const SamplingView<scalar_t>& v, const at::Tensor& grad,
                     const at::Tensor& weight_perm, const std::vector<ChannelBlock>& blocks, at::Tensor& grad_input_cl,
                     at::Tensor& grad_weight_perm, scalar_t* offset_partial, scalar_t* mask_partial) {
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const int64_t C = s.in_channels, W = s.width;
  const int64_t c_per_group = C / s.groups;
  const int64_t out_per_group = s.out_channels / s.groups;
  const int64_t work_per_block = s.batch * plane * taps * (C / static_cast<int64_t>(blocks.size())) *
                                 (2 * (s.out_channels / s.groups) + 12);
  // Float on an AVX2 or AVX-512 CPU: both GEMMs through gemm.h's kernel, which reads its row operand in place.
  // The grad tensor is laid out once for the two of them (not once per block and tile): grad_rows, [N, C_out,
  // plane + 16] (rows of the grad_w GEMM: grad_w += grad_tile @ cols; the padding keeps a tile's 12 rows out of one
  // L1 set, which rows a power-of-two plane apart would share) and grad_pixels, [N, plane, C_out] (rows of the
  // grad_cols GEMM: grad_cols = grad_tile^T @ W).
  const CpuIsa gemm_isa = std::is_same_v<scalar_t, float> ? v.isa : CpuIsa::kBaseline;
  const bool own_gemm = gemm_isa != CpuIsa::kBaseline;
  const int64_t grad_row_stride = plane + 16;
  at::Tensor grad_rows, grad_pixels;
  if (own_gemm) {
    grad_rows = at::empty({s.batch, s.out_channels, grad_row_stride}, grad.options());
    grad_rows.narrow(2, 0, plane).copy_(grad.view({s.batch, s.out_channels, plane}));
    grad_pixels = transposed_planes(grad, s.batch, s.out_channels, plane);
  }
  const auto no_scratch = [] { return 0; };
  parallel_items(static_cast<int64_t>(blocks.size()), work_per_block, no_scratch, [&](int64_t b, int) {
    const ChannelBlock& block = blocks[b];
    const int64_t width = block.c1 - block.c0;
    const int64_t row = taps * width;  // this block's columns, layout [pixel, k, c]
    const int64_t local0 = block.c0 - block.group * c_per_group;
    const at::Tensor w_block = weight_perm.narrow(0, block.group * out_per_group, out_per_group)
                                   .narrow(2, local0, width)
                                   .reshape({out_per_group, row})
                                   .contiguous();  // [C_out_g, row], read by raw pointer below
    at::Tensor grad_w_block = at::zeros({out_per_group, row}, grad.options());
    const int64_t tile = cache_tile_pixels(row, sizeof(scalar_t), plane);
    // The column tile: packed panels for the own GEMM, written there directly by the sampling; else [tile, row].
    at::Tensor cols = own_gemm ? at::Tensor() : at::empty({tile, row}, grad.options());
    at::Tensor grad_cols = at::empty({tile, row}, grad.options());
    std::vector<ModulatedTaps<scalar_t>> samples(tile * taps);
    // Where the scatter of a tap that must not be written goes (one row per tap: the four targets are distinct).
    std::vector<scalar_t> discard(static_cast<size_t>(4 * width));
    const scalar_t* grad_cols_data = grad_cols.data_ptr<scalar_t>();
    scalar_t* grad_in = grad_input_cl.data_ptr<scalar_t>();
    scalar_t* off_part = offset_partial + b * s.batch * taps * 2 * plane;
    scalar_t* mask_part = mask_partial ? mask_partial + b * s.batch * taps * plane : nullptr;
    GemmPanels weight_panels, cols_panels;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (own_gemm) gemm_pack_panels(gemm_isa, w_block.data_ptr<float>(), row, out_per_group, 1, row, weight_panels);
    }
    for (int64_t n = 0; n < s.batch; ++n) {
      const scalar_t* image_n = v.image + n * s.height * W * C;
      scalar_t* grad_in_n = grad_in + n * s.height * W * C;
      for (int64_t p0 = 0; p0 < plane; p0 += tile) {
        const int64_t count = std::min(tile, plane - p0);
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (own_gemm) {
            // cols[p, r] = P[r, p] of the grad_w GEMM's panels: each sample's channels in runs that end at a panel's
            // edge.
            gemm_reserve_panels(gemm_isa, row, count, cols_panels);
            // One dispatch per tile (not per sample): the loop is compiled per ISA with the blend inlined.
            dispatch_cpu_isa(v.isa, [&]() EYECOOL_ALWAYS_INLINE {
              for (int64_t p = 0; p < count; ++p) {
                for (int64_t k = 0; k < taps; ++k) {
                  ModulatedTaps<scalar_t>& mt = samples[p * taps + k];
                  mt = sample(s, v, n, block.offset_group, k, p0 + p);
                  for (int64_t j = k * width, j_end = (k + 1) * width; j < j_end;) {
                    const int64_t run = std::min(j_end - j, cols_panels.width - j % cols_panels.width);
                    write_sample_body(gemm_panel_entry(cols_panels, j, p), image_n, s, mt, block.c0 + j - k * width,
                                      run);
                    j += run;
                  }
                }
              }
            });
            // grad_w[m, r] += sum_p grad[m, p0 + p] cols[p, r]
            gemm_rows_x_panels(grad_rows.data_ptr<float>() + (n * s.out_channels + block.group * out_per_group) *
                                                                 grad_row_stride + p0,
                               out_per_group, grad_row_stride, cols_panels, grad_w_block.data_ptr<float>(), row, 1,
                               true);
            // grad_cols[p, r] = sum_m grad[m, p0 + p] W[m, r]
            gemm_rows_x_panels(grad_pixels.data_ptr<float>() + (n * plane + p0) * s.out_channels +
                                   block.group * out_per_group,
                               count, s.out_channels, weight_panels, grad_cols.data_ptr<float>(), row, 1, false);
          }
        }
        if (!own_gemm) {
          scalar_t* cols_data = cols.data_ptr<scalar_t>();
          for (int64_t p = 0; p < count; ++p) {
            for (int64_t k = 0; k < taps; ++k) {
              ModulatedTaps<scalar_t>& mt = samples[p * taps + k];
              mt = sample(s, v, n, block.offset_group, k, p0 + p);
              write_sample(v.isa, cols_data + p * row + k * width, image_n, s, mt, block.c0, width);
            }
          }
          const at::Tensor grad_tile = grad.select(0, n)
                                           .view({s.out_channels, plane})
                                           .narrow(0, block.group * out_per_group, out_per_group)
                                           .narrow(1, p0, count);  // [C_out_g, count]
          grad_w_block.addmm_(grad_tile, cols.narrow(0, 0, count));
          at::Tensor grad_cols_tile = grad_cols.narrow(0, 0, count);
          at::mm_out(grad_cols_tile, grad_tile.t(), w_block);
        }
        // The tile's value, coordinate and input gradients: one dispatch per tile, the channel loop inlined.
        dispatch_cpu_isa(v.isa, [&]() EYECOOL_ALWAYS_INLINE {
          for (int64_t p = 0; p < count; ++p) {
            const int64_t pixel = p0 + p;
            for (int64_t k = 0; k < taps; ++k) {
              const ModulatedTaps<scalar_t>& mt = samples[p * taps + k];
              const DeformTaps<scalar_t>& t = mt.taps;
              if (p * taps + k + kPrefetchAhead < count * taps) {
                // The taps of a sample a few ahead, into L1: their rows are scattered over the image, so the
                // hardware prefetcher cannot guess them, and this loop is bound by their latency from L2.
                const DeformTaps<scalar_t>& ahead = samples[p * taps + k + kPrefetchAhead].taps;
                const int64_t a[4] = {(ahead.y_low * W + ahead.x_low) * C + block.c0,
                                      (ahead.y_low * W + ahead.x_high) * C + block.c0,
                                      (ahead.y_high * W + ahead.x_low) * C + block.c0,
                                      (ahead.y_high * W + ahead.x_high) * C + block.c0};
                for (int64_t c = 0; c < width; c += 64 / static_cast<int64_t>(sizeof(scalar_t))) {
                  for (int q = 0; q < 4; ++q) {
                    __builtin_prefetch(image_n + a[q] + c);
                    __builtin_prefetch(grad_in_n + a[q] + c, 1);
                  }
                }
              }
              if (!t.touches) continue;  // the partial gradients stay 0
              const scalar_t* gc = grad_cols_data + p * row + k * width;
              const int64_t i1 = (t.y_low * W + t.x_low) * C + block.c0, i2 = (t.y_low * W + t.x_high) * C + block.c0;
              const int64_t i3 = (t.y_high * W + t.x_low) * C + block.c0, i4 = (t.y_high * W + t.x_high) * C + block.c0;
              // Scatter into this block's channels only; distinct taps never alias. On row or column -1 exactly
              // (touches but not any) every weight is 0, and nothing is written; a tap outside writes to scratch.
              const bool any = t.any;
              scalar_t* d1 = any && t.in1 ? grad_in_n + i1 : discard.data();
              scalar_t* d2 = any && t.in2 ? grad_in_n + i2 : discard.data() + width;
              scalar_t* d3 = any && t.in3 ? grad_in_n + i3 : discard.data() + 2 * width;
              scalar_t* d4 = any && t.in4 ? grad_in_n + i4 : discard.data() + 3 * width;
              const scalar_t m = mt.modulation;
              scalar_t sums[4];
              dot4_scatter4_body(gc, image_n + i1, image_n + i2, image_n + i3, image_n + i4, d1, d2, d3, d4, m * t.w1,
                                 m * t.w2, m * t.w3, m * t.w4, width, sums);
              scalar_t grad_y, grad_x;
              deform_coordinate_gradient(t, sums[0], sums[1], sums[2], sums[3], &grad_y, &grad_x);
              scalar_t* op = off_part + ((n * taps + k) * 2) * plane + pixel;
              op[0] = m * grad_y;
              op[plane] = m * grad_x;
              if (mask_part) {
                mask_part[(n * taps + k) * plane + pixel] =
                    deform_bilinear_value(t, sums[0], sums[1], sums[2], sums[3]);
              }
            }
          }
        });
      }
    }
    grad_weight_perm.narrow(0, block.group * out_per_group, out_per_group)
        .narrow(2, local0, width)
        .copy_(grad_w_block.view({out_per_group, taps, width}));
  });
}

template <typename scalar_t>
SamplingView<scalar_t> sampling_view(const at::Tensor& image_cl, const at::Tensor& offset, const at::Tensor& mask) {
  return {image_cl.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
          mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, cpu_isa()};
}

// Half and bfloat16 run the float kernels; the CPU has no faster path for them.
at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

at::Tensor deform_conv2d_forward_cpu(const at::Tensor& input_in, const at::Tensor& offset_in,
                                     const at::Tensor& weight_in, const c10::optional<at::Tensor>& mask_in,
                                     const c10::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DeformConv2dShape s =
      check_deform_conv2d_inputs(input_in, offset_in, weight_in, mask_in, bias_in, stride, padding, dilation);
  const auto type = compute_type(input_in.scalar_type());
  const bool has_bias = bias_in.has_value();
  at::Tensor output;
  if (has_bias) {
    // A fresh tensor: expand().contiguous() of a [1, C_out, 1, 1] output would be the caller's bias itself, and the
    // GEMM below would accumulate into it.
    output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input_in.options().dtype(type));
    output.copy_(bias_in->view({1, s.out_channels, 1, 1}));
  } else {
    output = at::zeros({s.batch, s.out_channels, s.out_h, s.out_w}, input_in.options().dtype(type));
  }
  if (s.batch > 0 && s.in_channels > 0 && s.out_channels > 0) {
    const at::Tensor image_cl = channels_last_copy(input_in, type);
    const at::Tensor offset = offset_in.to(type).contiguous();
    const at::Tensor mask = mask_in.has_value() ? mask_in->to(type).contiguous() : at::Tensor();
    // [C_out, C_in/groups, kh, kw] -> [C_out, kh * kw * C_in/groups]: rows matching the columns' (k, c) order.
    const at::Tensor weight_rows = weight_in.to(type).permute({0, 2, 3, 1}).reshape({s.out_channels, -1}).contiguous();
    AT_DISPATCH_FLOATING_TYPES(type, "deform_conv2d_forward_cpu", [&] {
      forward_kernel<scalar_t>(s, sampling_view<scalar_t>(image_cl, offset, mask), weight_rows, has_bias, output);
    });
  }
  return output.to(input_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& input_in, const at::Tensor& offset_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& mask_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const DeformConv2dShape s =
      check_deform_conv2d_inputs(input_in, offset_in, weight_in, mask_in, c10::nullopt, stride, padding, dilation);
  check_deform_conv2d_grad(grad_in, s, input_in);
  const auto type = compute_type(input_in.scalar_type());
  const auto options = input_in.options().dtype(type);
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t plane = s.out_h * s.out_w;
  const bool masked = mask_in.has_value();
  at::Tensor grad_input_cl = at::zeros({s.batch, s.height, s.width, s.in_channels}, options);
  at::Tensor grad_weight_perm = at::zeros({s.out_channels, taps, s.in_channels / s.groups}, options);
  at::Tensor grad_offset = at::zeros(offset_in.sizes(), options);
  at::Tensor grad_mask = masked ? at::zeros(mask_in->sizes(), options) : at::empty({0}, options);
  const at::Tensor grad = grad_in.to(type).contiguous();
  if (s.batch > 0 && s.in_channels > 0 && s.out_channels > 0) {
    const at::Tensor image_cl = channels_last_copy(input_in, type);
    const at::Tensor offset = offset_in.to(type).contiguous();
    const at::Tensor mask = masked ? mask_in->to(type).contiguous() : at::Tensor();
    const at::Tensor weight_perm = weight_in.to(type).permute({0, 2, 3, 1}).reshape({s.out_channels, taps, -1}).contiguous();
    const std::vector<ChannelBlock> blocks = channel_blocks(s);
    const int64_t num_blocks = static_cast<int64_t>(blocks.size());
    at::Tensor offset_partial = at::zeros({num_blocks, s.batch, taps, 2, plane}, options);
    at::Tensor mask_partial = masked ? at::zeros({num_blocks, s.batch, taps, plane}, options) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(type, "deform_conv2d_backward_cpu", [&] {
      backward_kernel<scalar_t>(s, sampling_view<scalar_t>(image_cl, offset, mask), grad, weight_perm, blocks,
                                grad_input_cl, grad_weight_perm, offset_partial.data_ptr<scalar_t>(),
                                masked ? mask_partial.data_ptr<scalar_t>() : nullptr);
    });
    // Reduce the partial sums of each offset group's blocks, always in block order.
    at::Tensor grad_offset_view = grad_offset.view({s.batch, s.offset_groups, taps, 2, plane});
    at::Tensor grad_mask_view = masked ? grad_mask.view({s.batch, s.offset_groups, taps, plane}) : at::Tensor();
    for (int64_t b = 0; b < num_blocks; ++b) {
      grad_offset_view.select(1, blocks[b].offset_group).add_(offset_partial[b]);
      if (masked) grad_mask_view.select(1, blocks[b].offset_group).add_(mask_partial[b]);
    }
  }
  const auto out_type = input_in.scalar_type();
  at::Tensor grad_input = transposed_planes(grad_input_cl, s.batch, s.height * s.width, s.in_channels)
                              .view({s.batch, s.in_channels, s.height, s.width})
                              .to(out_type);
  at::Tensor grad_weight = grad_weight_perm.view({s.out_channels, s.kernel_h, s.kernel_w, -1})
                               .permute({0, 3, 1, 2})
                               .to(out_type)
                               .contiguous();
  at::Tensor grad_bias = grad.sum({0, 2, 3}).to(out_type);
  return {grad_input, grad_offset.to(out_type), grad_weight, grad_mask.to(out_type), grad_bias};
}

}  // namespace
}  // namespace eyecool

TORCH_LIBRARY_IMPL(eyecool, CPU, m) {
  m.impl("deform_conv2d", &eyecool::deform_conv2d_forward_cpu);
  m.impl("_deform_conv2d_backward", &eyecool::deform_conv2d_backward_cpu);
}
