// Panoptic quality's per-image matching (panopticapi's pq_compute_single_core), in C++ so that pq_compute's
// worker threads run a whole image without the GIL. It is the same computation, in the same order, as the numpy
// reference eyecool.evaluation.panoptic_quality.match_segments (the rules are in that module's docstring and
// docs/design.md section 8); the floating-point IoU sums add up in the same order, so the results are bit-identical.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/pair_counter.h"

namespace eyecool {

// One image's segment tables, as eyecool.evaluation.SegmentTable holds them: rows sorted by segment id.
struct SegmentRows {
  const int64_t* ids;       // [n], ascending, no void (0)
  const int64_t* category;  // [n], category index in [0, num_categories)
  const int64_t* iscrowd;   // [n], 0 or 1 (gt only)
  const int64_t* area;      // [n], the JSON's area (gt only)
  int64_t n;

  // The row of segment `id`, or -1 when the table does not list it.
  int64_t find(int64_t id) const {
    const int64_t* it = std::lower_bound(ids, ids + n, id);
    return it != ids + n && *it == id ? it - ids : -1;
  }
};

// Why an image cannot be matched: the PNG and its segments_info disagree. The caller then runs the reference,
// which raises the error that names the image and the segments.
enum class MatchProblem : int64_t {
  kNone = 0,
  kGtIdNotListed = 1,    // a non-void id of the gt PNG is not in the gt segments_info
  kGtIdNotInPng = 2,     // a gt segments_info entry does not appear in the gt PNG
  kPredIdNotListed = 3,  // likewise for the prediction
  kPredIdNotInPng = 4,
};

// Per category: the sum of the matches' IoUs, TP, FP and FN.
struct CategoryStatistics {
  std::vector<double> iou;
  std::vector<int64_t> tp, fp, fn;
  explicit CategoryStatistics(int64_t num_categories)
      : iou(num_categories, 0.0), tp(num_categories, 0), fp(num_categories, 0), fn(num_categories, 0) {}
};

// pairs: (encode_pair(gt_id, pred_id), pixels), sorted by key (gt id, then pred id). crowd_of_category: per
// category, the gt crowd segment id that counts for it, or -1.
inline MatchProblem match_image_segments(const std::vector<KeyCount>& pairs, const SegmentRows& gt,
                                         const SegmentRows& pred, const int64_t* crowd_of_category,
                                         CategoryStatistics& out) {
  constexpr int64_t kVoid = 0;
  const int64_t num_pairs = static_cast<int64_t>(pairs.size());
  std::vector<int64_t> gi(num_pairs), pi(num_pairs);
  std::vector<char> gt_seen(gt.n, 0), pred_seen(pred.n, 0);
  for (int64_t k = 0; k < num_pairs; ++k) {
    const int64_t gt_id = pair_gt_id(pairs[k].first), pred_id = pair_pred_id(pairs[k].first);
    gi[k] = gt.find(gt_id);
    pi[k] = pred.find(pred_id);
    if (gi[k] < 0 && gt_id != kVoid) return MatchProblem::kGtIdNotListed;
    if (pi[k] < 0 && pred_id != kVoid) return MatchProblem::kPredIdNotListed;
    if (gi[k] >= 0) gt_seen[gi[k]] = 1;
    if (pi[k] >= 0) pred_seen[pi[k]] = 1;
  }
  if (std::find(gt_seen.begin(), gt_seen.end(), 0) != gt_seen.end()) return MatchProblem::kGtIdNotInPng;
  if (std::find(pred_seen.begin(), pred_seen.end(), 0) != pred_seen.end()) return MatchProblem::kPredIdNotInPng;

  // Each prediction's area (from its PNG), its pixels on void, and its pixels on the crowd region of its category.
  std::vector<int64_t> pred_area(pred.n, 0), pred_void(pred.n, 0), pred_crowd(pred.n, 0);
  for (int64_t k = 0; k < num_pairs; ++k) {
    if (pi[k] < 0) continue;
    const int64_t gt_id = pair_gt_id(pairs[k].first), count = pairs[k].second;
    pred_area[pi[k]] += count;
    if (gt_id == kVoid) pred_void[pi[k]] = count;  // one (void, pred) pair per prediction
    if (gi[k] >= 0 && gt_id == crowd_of_category[pred.category[pi[k]]]) pred_crowd[pi[k]] += count;
  }
  // Matches: same category, gt not crowd, IoU > 0.5 with the gt's void pixels of the prediction left out of the
  // union. Pairs are visited in order, so the IoU sums add up as np.bincount adds them.
  std::vector<char> gt_matched(gt.n, 0), pred_matched(pred.n, 0);
  for (int64_t k = 0; k < num_pairs; ++k) {
    const int64_t g = gi[k], p = pi[k];
    if (g < 0 || p < 0 || gt.iscrowd[g] != 0 || gt.category[g] != pred.category[p]) continue;
    const int64_t intersection = pairs[k].second;
    const int64_t union_ = pred_area[p] + gt.area[g] - intersection - pred_void[p];
    const double iou = static_cast<double>(intersection) / static_cast<double>(union_);
    if (!(iou > 0.5)) continue;
    out.tp[gt.category[g]] += 1;
    out.iou[gt.category[g]] += iou;
    gt_matched[g] = 1;
    pred_matched[p] = 1;
  }
  for (int64_t g = 0; g < gt.n; ++g) {
    if (!gt_matched[g] && gt.iscrowd[g] == 0) out.fn[gt.category[g]] += 1;
  }
  // An unmatched prediction mostly on void or on its category's crowd region is ignored, otherwise it is a FP.
  for (int64_t p = 0; p < pred.n; ++p) {
    if (pred_matched[p]) continue;
    const double ignored_fraction =
        static_cast<double>(pred_void[p] + pred_crowd[p]) / static_cast<double>(pred_area[p]);
    if (!(ignored_fraction > 0.5)) out.fp[pred.category[p]] += 1;
  }
  return MatchProblem::kNone;
}

}  // namespace eyecool
