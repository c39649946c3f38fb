// The pair encoding behind panoptic quality, shared by the CPU and CUDA kernels of pq_pair_counts.
//
// A (gt_id, pred_id) pair of segment ids is packed into one int64 key, gt in the high 32 bits and pred in the
// low 32, so that sorting keys sorts pairs by (gt, pred) and counting equal keys counts pixels per pair.
// Segment ids must lie in [0, 2^31): every id an RGB panoptic PNG can hold (R + 256 G + 256^2 B < 2^24) and
// every id a model writes into an int32 map. An id outside that range encodes to kInvalidPairKey, which the
// kernels turn into an error instead of a silently wrong pair.
#pragma once

#include <cstdint>

#include "common.h"

namespace eyecool {

constexpr int64_t kMaxSegmentId = 0x7FFFFFFF;
constexpr int64_t kInvalidPairKey = -1;

EYECOOL_HD bool valid_segment_id(int64_t id) { return id >= 0 && id <= kMaxSegmentId; }

EYECOOL_HD int64_t encode_pair(int64_t gt_id, int64_t pred_id) {
  if (!valid_segment_id(gt_id) || !valid_segment_id(pred_id)) return kInvalidPairKey;
  return (gt_id << 32) | pred_id;
}

EYECOOL_HD int64_t pair_gt_id(int64_t key) { return key >> 32; }

EYECOOL_HD int64_t pair_pred_id(int64_t key) { return key & 0xFFFFFFFFLL; }

// ---- input checks (host only), shared by the CPU and CUDA entry points ----

inline void check_pq_pair_counts_inputs(const at::Tensor& gt_ids, const at::Tensor& pred_ids) {
  TORCH_CHECK(gt_ids.dim() == 3, "pq_pair_counts: gt_ids must be a [B, H, W] id map, got shape ", gt_ids.sizes());
  TORCH_CHECK(pred_ids.sizes() == gt_ids.sizes(), "pq_pair_counts: pred_ids must have the shape of gt_ids ",
              gt_ids.sizes(), ", got ", pred_ids.sizes());
  TORCH_CHECK(at::isIntegralType(gt_ids.scalar_type(), /*includeBool=*/false),
              "pq_pair_counts: gt_ids must be an integer tensor, got ", gt_ids.scalar_type());
  check_same_dtype(gt_ids, "gt_ids", pred_ids, "pred_ids");
  check_same_device(gt_ids, "gt_ids", pred_ids, "pred_ids");
}

// The error for an id outside [0, kMaxSegmentId] at flat pixel index `at_pixel` of the [B, H, W] maps, naming the
// ids and where they are (on every device: reading two values costs nothing on the error path).
inline void fail_invalid_segment_id(const at::Tensor& gt_ids, const at::Tensor& pred_ids, int64_t at_pixel) {
  const int64_t width = std::max<int64_t>(gt_ids.size(2), 1);
  const int64_t pixels = std::max<int64_t>(gt_ids.size(1) * gt_ids.size(2), 1);
  const int64_t image = at_pixel / pixels, rest = at_pixel % pixels;
  const auto gt_value = gt_ids.reshape(-1)[at_pixel].item<int64_t>();
  const auto pred_value = pred_ids.reshape(-1)[at_pixel].item<int64_t>();
  TORCH_CHECK(false, "pq_pair_counts: segment ids must be in [0, ", kMaxSegmentId, "], got gt_id ", gt_value,
              " and pred_id ", pred_value, " at image ", image, ", pixel (", rest / width, ", ", rest % width, ")");
}

}  // namespace eyecool
