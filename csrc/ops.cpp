// Every op's schema, in one place. Kernels register themselves per device at the end of the file that holds
// them (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu); fake kernels and autograd formulas live in eyecool_ext/ops/,
// except fg_fusion's autograd formula (csrc/fg_fusion_autograd.cpp: the Python one cost a quarter of its step).
// Backward passes are ops of their own (eyecool::_<op>_backward) so that they get fake kernels too and work
// under torch.compile.
#include <torch/library.h>

#include <vector>

namespace {

struct OpSchema {
  const char* schema;
  bool has_cuda_kernel;  // csrc/cuda/<op>.cu implements it, so the CUDA emulation registers it too
};

constexpr OpSchema kSchemas[] = {
    // ROIAlign (torchvision's schema and semantics).
    {"roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
     "int sampling_ratio, bool aligned) -> Tensor",
     true},
    {"_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
     "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
     "bool aligned) -> Tensor",
     true},
    // The FPN pooler: each ROI pooled from the level its size selects, in one call.
    {"multilevel_roi_align(Tensor[] features, Tensor rois, SymInt pooled_height, SymInt pooled_width, "
     "float[] scales, int sampling_ratio, bool aligned, float canonical_box_size, int canonical_level) -> Tensor",
     true},
    {"_multilevel_roi_align_backward(Tensor grad, Tensor rois, SymInt pooled_height, SymInt pooled_width, "
     "float[] scales, int sampling_ratio, bool aligned, float canonical_box_size, int canonical_level, "
     "SymInt batch_size, SymInt channels, SymInt[] heights, SymInt[] widths) -> Tensor[]",
     true},
    // Panoptic quality's inner loop: for [B, H, W] gt and pred id maps, every distinct (image, gt_id, pred_id)
    // triple and its pixel count, sorted by (image, gt_id, pred_id): (image_index, gt_id, pred_id, count), all
    // int64 of one data-dependent length P.
    {"pq_pair_counts(Tensor gt_ids, Tensor pred_ids) -> (Tensor, Tensor, Tensor, Tensor)",
     true},
    // The panoptic PNG reader (cpu/panoptic_png_reader.cpp): the file at `path` -> int32 [H, W] segment ids
    // R + 256 G + 256^2 B; an empty [0, 0] tensor for a file it does not handle (unreadable, corrupt, not an
    // 8-bit RGB / RGBA PNG, no inflater found), which the caller then gives to PIL. CPU only.
    {"read_panoptic_png(str path) -> Tensor",
     false},
    // One image's PQ statistics (panopticapi's matching rules) from its gt and predicted PNG files, in one call
    // that reads, inflates, pair-counts (without writing either id map) and matches: gt_segments int64 [4, G]
    // (ids ascending, category index, iscrowd, area), pred_segments [2, S] (ids ascending, category index),
    // crowd_of_category int64 [C] (the gt crowd id per category or -1). Returns (problem [1], category [k],
    // iou_sum [k] float64, tp [k], fp [k], fn [k]) over the k categories the image touches; problem != 0 (no
    // statistics): 1-4 a PNG and its segments disagree, 5 a file the reader does not handle or two sizes. CPU
    // only.
    {"panoptic_png_file_pq_statistics(str gt_path, str pred_path, Tensor gt_segments, Tensor pred_segments, "
     "Tensor crowd_of_category, int num_categories) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
     false},
    // The inflater the PNG reader found (cpu/png_inflate.h): "libdeflate", "zlib", or "" for none.
    {"_png_inflater() -> str",
     false},
    // Deformable convolution, DCN v1 (mask None) and modulated v2; torchvision's semantics with the weight groups
    // and offset groups inferred from the shapes. The backward returns (grad_input, grad_offset, grad_weight,
    // grad_mask, grad_bias); grad_mask is an empty [0] tensor when mask is None.
    {"deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? mask, Tensor? bias, int[2] stride, "
     "int[2] padding, int[2] dilation) -> Tensor",
     true},
    {"_deform_conv2d_backward(Tensor grad, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
     "int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
     true},
    // RPN-FCN fusion: the RPN logits of every level gated by the pooled foreground probability of the semantic
    // logits (the sum of the thing channels' softmax). mode is "logit" (the paper) or "prob". The second output,
    // softmax_stats [3, N, H, W] (op-math dtype: each pixel's softmax max, sum of exp(x - max), and fg), is what
    // the backward reads instead of recomputing the softmax.
    {"fg_fusion(Tensor sem_logits, Tensor[] rpn_logits, int num_stuff, str mode) -> (Tensor[], Tensor)",
     true},
    {"_fg_fusion_backward(Tensor[] grads, Tensor sem_logits, Tensor[] rpn_logits, Tensor softmax_stats, "
     "int num_stuff, str mode) -> (Tensor, Tensor[])",
     true},
    // UPSNet's panoptic merge for one image: per-pixel argmax of the (stuff, instances, unknown) logit stack,
    // with sem_logits bilinearly resized to (height, width) on the fly. Inference only (no backward).
    {"upsnet_panoptic_merge(Tensor sem_logits, int num_stuff, Tensor boxes, Tensor classes, Tensor mask_logits, "
     "SymInt height, SymInt width) -> Tensor",
     true},
};

}  // namespace

TORCH_LIBRARY(eyecool, m) {
  for (const OpSchema& op : kSchemas) m.def(op.schema);
}

#ifdef EYECOOL_WITH_CUDA_EMULATION
#include "emulation/cuda_emulation.h"

// The CUDA kernels run on the CPU (csrc/emulation/): the ops that have a CUDA kernel, under the same schemas, as
// torch.ops.eyecool_emu.<op>, plus the test settings of the emulated launches.
TORCH_LIBRARY(eyecool_emu, m) {
  for (const OpSchema& op : kSchemas) {
    if (op.has_cuda_kernel) m.def(op.schema);
  }
  // Caps the emulated grid at max_blocks blocks and the deformable convolution's column buffer at
  // max_column_elements (0: the real limits), and forces the 64-bit index path of the kernels that have a 32-bit
  // one; returns the previous three settings (the last as 0 or 1).
  m.def("_set_launch_limits(int max_blocks, int max_column_elements, bool force_64bit_index=False) -> int[]",
        [](int64_t max_blocks, int64_t max_column_elements, bool force_64bit_index) {
          TORCH_CHECK(max_blocks >= 0 && max_column_elements >= 0,
                      "_set_launch_limits: limits must be >= 0 (0: the real limit), got ", max_blocks, " and ",
                      max_column_elements);
          auto& limits = eyecool::emulation::launch_limits();
          const std::vector<int64_t> previous{limits.max_blocks, limits.max_column_elements,
                                              limits.force_64bit_index ? 1 : 0};
          limits.max_blocks = max_blocks;
          limits.max_column_elements = max_column_elements;
          limits.force_64bit_index = force_64bit_index;
          return previous;
        });
  // Emulated kernel launches since the extension was loaded.
  m.def("_launch_count() -> int", []() { return eyecool::emulation::launch_count(); });
}
#endif
