// Deformable convolution on the CPU as "sample, then GEMM", on a channels-last copy of the input so that every
// bilinear tap reads a contiguous run of channels.
//
//   forward:  parallel over tiles of output pixels. A tile builds its column matrix cols[pixel, k, c] (bilinear
//             weights computed once per pixel, kernel point and offset group, modulation folded in) and
//             multiplies it with the weight into its own output columns: out[:, tile] = W @ cols^T.
//   backward: parallel over blocks of input channels. A block walks every tile in the same order, rebuilds its
//             slice of the columns, accumulates its columns of grad_weight (grad_out^T @ cols), forms its column
//             gradient with one GEMM (grad_out @ W) and scatters it into its own channels of grad_input; offset
//             and mask gradients are per-block partial sums reduced in block order. Every output has one owner,
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
constexpr int64_t kMaxTilePixels = 256;
// Channel blocks of the backward: at most 64 channels (kh * kw * 64 GEMM columns), and at least 32 unless the
// group is narrower, aiming at 4 blocks per layer so that a few threads share the work evenly. The partition
// depends on the shapes only, never on the thread count.
constexpr int64_t kMaxBlockChannels = 64;
constexpr int64_t kMinBlockChannels = 32;
constexpr int64_t kBlocksWanted = 4;
// Below this many multiply-adds a thread runs alone: waking the pool costs more than it saves on tiny layers.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;

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

template <typename T>
EYECOOL_ALWAYS_INLINE inline void dot4_body(const T* __restrict__ g, const T* __restrict__ v1,
                                                     const T* __restrict__ v2, const T* __restrict__ v3,
                                                     const T* __restrict__ v4, int64_t n, T* __restrict__ sums) {
  T a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {}, a4[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T gl = g[c + l];
      a1[l] += gl * v1[c + l];
      a2[l] += gl * v2[c + l];
      a3[l] += gl * v3[c + l];
      a4[l] += gl * v4[c + l];
    }
  }
  T s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  for (int l = 0; l < kLanes; ++l) {
    s1 += a1[l];
    s2 += a2[l];
    s3 += a3[l];
    s4 += a4[l];
  }
  for (; c < n; ++c) {
    s1 += g[c] * v1[c];
    s2 += g[c] * v2[c];
    s3 += g[c] * v3[c];
    s4 += g[c] * v4[c];
  }
  sums[0] = s1;
  sums[1] = s2;
  sums[2] = s3;
  sums[3] = s4;
}

template <typename T>
EYECOOL_ALWAYS_INLINE inline void axpy_body(T* __restrict__ dst, T a, const T* __restrict__ x, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] += a * x[c];
}

// dest[c] = w1 p1[c] + w2 p2[c] + w3 p3[c] + w4 p4[c]
template <typename T>
void blend4(CpuIsa isa, T* dest, const T* p1, const T* p2, const T* p3, const T* p4, T w1, T w2, T w3, T w4,
            int64_t n) {
  dispatch_cpu_isa(isa, [&]() EYECOOL_ALWAYS_INLINE { blend4_body(dest, p1, p2, p3, p4, w1, w2, w3, w4, n); });
}
// sums[i] = sum_c g[c] v_i[c]
template <typename T>
void dot4(CpuIsa isa, const T* g, const T* v1, const T* v2, const T* v3, const T* v4, int64_t n, T* sums) {
  dispatch_cpu_isa(isa, [&]() EYECOOL_ALWAYS_INLINE { dot4_body(g, v1, v2, v3, v4, n, sums); });
}
// dst[c] += a x[c]
template <typename T>
void axpy(CpuIsa isa, T* dst, T a, const T* x, int64_t n) {
  dispatch_cpu_isa(isa, [&]() EYECOOL_ALWAYS_INLINE { axpy_body(dst, a, x, n); });
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
ModulatedTaps<scalar_t> sample(const DeformConv2dShape& s, const SamplingView<scalar_t>& v, int64_t n,
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

// dest[c] = sum_i w_i * tap_i[c] for `count` contiguous channels; a sample wholly outside the image is 0.
template <typename scalar_t>
inline void write_sample(CpuIsa isa, scalar_t* dest, const scalar_t* image_n, const DeformConv2dShape& s,
                         const ModulatedTaps<scalar_t>& mt, int64_t c0, int64_t count) {
  const DeformTaps<scalar_t>& t = mt.taps;
  if (!t.any) {
    std::fill(dest, dest + count, scalar_t(0));
    return;
  }
  const int64_t C = s.in_channels, W = s.width;
  const scalar_t m = mt.modulation;
  blend4(isa, dest, image_n + (t.y_low * W + t.x_low) * C + c0, image_n + (t.y_low * W + t.x_high) * C + c0,
         image_n + (t.y_high * W + t.x_low) * C + c0, image_n + (t.y_high * W + t.x_high) * C + c0, m * t.w1,
         m * t.w2, m * t.w3, m * t.w4, count);
}

// Pixels per tile so that a tile's columns (row_elements values per pixel) take about kTileBytes.
int64_t cache_tile_pixels(int64_t row_elements, int64_t element_size, int64_t plane) {
  const int64_t pixels = kTileBytes / std::max<int64_t>(1, row_elements * element_size);
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
    for (int64_t p = 0; p < count; ++p) {
      scalar_t* cols_row = cols_data + p * row;
      for (int64_t k = 0; k < taps; ++k) {
        for (int64_t og = 0; og < s.offset_groups; ++og) {
          const ModulatedTaps<scalar_t> mt = sample(s, v, n, og, k, p0 + p);
          // The offset group's channels, split where they cross into another weight group.
          int64_t c = og * c_per_offset_group;
          const int64_t c_end = c + c_per_offset_group;
          while (c < c_end) {
            const int64_t g = c / c_per_group;
            const int64_t stop = std::min(c_end, (g + 1) * c_per_group);
            scalar_t* dest = cols_row + g * taps * c_per_group + k * c_per_group + (c - g * c_per_group);
            write_sample(v.isa, dest, image_n, s, mt, c, stop - c);
            c = stop;
          }
        }
      }
    }
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
    at::Tensor cols = at::empty({tile, row}, grad.options());
    at::Tensor grad_cols = at::empty({tile, row}, grad.options());
    std::vector<ModulatedTaps<scalar_t>> samples(tile * taps);
    scalar_t* cols_data = cols.data_ptr<scalar_t>();
    const scalar_t* grad_cols_data = grad_cols.data_ptr<scalar_t>();
    scalar_t* grad_in = grad_input_cl.data_ptr<scalar_t>();
    scalar_t* off_part = offset_partial + b * s.batch * taps * 2 * plane;
    scalar_t* mask_part = mask_partial ? mask_partial + b * s.batch * taps * plane : nullptr;
    // Float on an AVX2 or AVX-512 CPU: both GEMMs through gemm.h's kernel. The block's weight is packed once
    // (grad_cols = grad_tile^T @ W: its columns r, depth the output channels); per tile the column tile is packed
    // (grad_w += grad_tile @ cols: its columns r, depth the pixels) and the grad tile transposed to pixel rows.
    CpuIsa isa = CpuIsa::kBaseline;
    GemmPanels weight_panels, cols_panels;
    std::vector<float> grad_tile_t, grad_tile_rows;
    if constexpr (std::is_same_v<scalar_t, float>) {
      isa = v.isa;
      if (isa != CpuIsa::kBaseline) {
        gemm_pack_panels(isa, w_block.data_ptr<float>(), row, out_per_group, 1, row, weight_panels);
        grad_tile_t.resize(static_cast<size_t>(tile * out_per_group));
        grad_tile_rows.resize(static_cast<size_t>((tile + 16) * out_per_group));
      }
    }
    for (int64_t n = 0; n < s.batch; ++n) {
      const scalar_t* image_n = v.image + n * s.height * W * C;
      scalar_t* grad_in_n = grad_in + n * s.height * W * C;
      const at::Tensor grad_n = grad.select(0, n).view({s.out_channels, plane}).narrow(0, block.group * out_per_group,
                                                                                       out_per_group);
      for (int64_t p0 = 0; p0 < plane; p0 += tile) {
        const int64_t count = std::min(tile, plane - p0);
        for (int64_t p = 0; p < count; ++p) {
          for (int64_t k = 0; k < taps; ++k) {
            ModulatedTaps<scalar_t>& mt = samples[p * taps + k];
            mt = sample(s, v, n, block.offset_group, k, p0 + p);
            write_sample(v.isa, cols_data + p * row + k * width, image_n, s, mt, block.c0, width);
          }
        }
        bool own_gemm = false;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (isa != CpuIsa::kBaseline) {
            own_gemm = true;
            const float* grad_rows = grad_n.data_ptr<float>() + p0;  // [C_out_g] rows of `plane` pixels
            // grad_w[m, r] += sum_p grad[m, p0 + p] cols[p, r], from the grad tile copied to rows of count + 16:
            // read in place, its rows lie a whole plane apart (a power of two here), so a tile's 12 rows would
            // share one L1 set.
            const int64_t grad_tile_stride = count + 16;
            for (int64_t m = 0; m < out_per_group; ++m) {
              std::copy(grad_rows + m * plane, grad_rows + m * plane + count,
                        grad_tile_rows.data() + m * grad_tile_stride);
            }
            gemm_pack_panels(isa, cols_data, row, count, 1, row, cols_panels);
            gemm_rows_x_panels(grad_tile_rows.data(), out_per_group, grad_tile_stride, cols_panels,
                               grad_w_block.data_ptr<float>(), row, 1, true);
            // grad_cols[p, r] = sum_m grad[m, p0 + p] W[m, r], from the grad tile transposed to [count, C_out_g]
            for (int64_t m = 0; m < out_per_group; ++m) {
              const float* src = grad_rows + m * plane;
              for (int64_t p = 0; p < count; ++p) grad_tile_t[p * out_per_group + m] = src[p];
            }
            gemm_rows_x_panels(grad_tile_t.data(), count, out_per_group, weight_panels, grad_cols.data_ptr<float>(),
                               row, 1, false);
          }
        }
        if (!own_gemm) {
          const at::Tensor grad_tile = grad_n.narrow(1, p0, count);  // [C_out_g, count]
          grad_w_block.addmm_(grad_tile, cols.narrow(0, 0, count));
          at::Tensor grad_cols_tile = grad_cols.narrow(0, 0, count);
          at::mm_out(grad_cols_tile, grad_tile.t(), w_block);
        }
        for (int64_t p = 0; p < count; ++p) {
          const int64_t pixel = p0 + p;
          for (int64_t k = 0; k < taps; ++k) {
            const ModulatedTaps<scalar_t>& mt = samples[p * taps + k];
            const DeformTaps<scalar_t>& t = mt.taps;
            if (!t.touches) continue;  // the partial gradients stay 0
            const scalar_t* gc = grad_cols_data + p * row + k * width;
            const int64_t i1 = (t.y_low * W + t.x_low) * C + block.c0;
            const int64_t i2 = (t.y_low * W + t.x_high) * C + block.c0;
            const int64_t i3 = (t.y_high * W + t.x_low) * C + block.c0;
            const int64_t i4 = (t.y_high * W + t.x_high) * C + block.c0;
            // Channel sums sum_c gc[c] * tap_i[c]: the value and coordinate gradients are linear in the taps.
            scalar_t sums[4];
            dot4(v.isa, gc, image_n + i1, image_n + i2, image_n + i3, image_n + i4, width, sums);
            const scalar_t s1 = sums[0], s2 = sums[1], s3 = sums[2], s4 = sums[3];
            const scalar_t m = mt.modulation;
            scalar_t grad_y, grad_x;
            deform_coordinate_gradient(t, s1, s2, s3, s4, &grad_y, &grad_x);
            scalar_t* op = off_part + ((n * taps + k) * 2) * plane + pixel;
            op[0] = m * grad_y;
            op[plane] = m * grad_x;
            if (mask_part) mask_part[(n * taps + k) * plane + pixel] = deform_bilinear_value(t, s1, s2, s3, s4);
            // Scatter into this block's channels only; distinct taps never alias.
            const scalar_t ws[4] = {m * t.w1, m * t.w2, m * t.w3, m * t.w4};
            const bool in[4] = {t.in1, t.in2, t.in3, t.in4};
            const int64_t idx[4] = {i1, i2, i3, i4};
            for (int q = 0; q < 4; ++q) {
              if (!in[q] || !t.any) continue;  // on row or column -1 exactly every weight is 0
              axpy(v.isa, grad_in_n + idx[q], ws[q], gc, width);
            }
          }
        }
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
    const at::Tensor image_cl = input_in.to(type).permute({0, 2, 3, 1}).contiguous();
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
    const at::Tensor image_cl = input_in.to(type).permute({0, 2, 3, 1}).contiguous();
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
  at::Tensor grad_input = grad_input_cl.permute({0, 3, 1, 2}).to(out_type).contiguous();
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
