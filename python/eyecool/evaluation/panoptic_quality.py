"""Panoptic quality (PQ), computed exactly as panopticapi's ``pq_compute`` does, only faster.

The rules (docs/design.md section 8, panopticapi's ``pq_compute_single_core``), per image:

* intersections of every (gt segment, predicted segment) pair come from one pass over the two id maps
  (``eyecool_ext.ops.pq_pair_counts``);
* a gt and a predicted segment of the same category match when IoU > 0.5 (strictly), with
  ``union = area_gt + area_pred - intersection - (pixels of the prediction that are void in the gt)``; gt areas
  come from the gt JSON, predicted areas from the prediction PNG;
* crowd gt segments never match and are never false negatives; every other unmatched gt segment is a false
  negative;
* an unmatched prediction is ignored when more than half of its pixels are void or belong to the crowd
  region of its category (the last crowd segment of that category in the gt ``segments_info``, as in
  panopticapi); otherwise it is a false positive.

Per category, ``PQ = sum IoU / (TP + FP/2 + FN/2)``, ``SQ = sum IoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``;
categories with no TP, FP or FN are left out of the averages; Things and Stuff average over ``isthing``.

:func:`pq_compute` evaluates a folder of prediction PNGs (panopticapi's signature and return value): images
are processed in parallel threads, and each gt / prediction PNG pair is read, inflated, unfiltered, pair-counted
and matched in one C++ call with the GIL released, without either id map being written
(``ops.panoptic_png_file_pq_statistics``, whose matching is :func:`match_segments` in C++). What that call does
not handle (no compiled extension or inflater, another kind of PNG, a broken file, an inconsistent image) takes
the one fallback: ``eyecool.panoptic_format.read_id_map`` of both files, ``pq_pair_counts`` and
:func:`match_segments`, which also name the problem. :class:`eyecool.evaluation.PanopticEvaluator` uses
``pq_pair_counts`` and :func:`match_segments` on id maps in memory (on the prediction's device).

Inconsistent ground truth is scored as panopticapi scores it (``strict=False``, the default of :func:`pq_compute`
and ``PanopticEvaluator``), with a :class:`PanopticFormatWarning` naming the image and the segment: a gt PNG id
that its ``segments_info`` does not list is neither void nor a segment (it matches nothing, is no false negative,
and does not excuse a prediction lying on it), a listed gt segment missing from the PNG is a false negative (unless
crowd), a gt segment of a category the JSON does not list is such an unlisted id (panopticapi counts it under
a category it never averages), and a segment id listed twice (gt or prediction) keeps its last entry.
``strict=True`` refuses all of these with :class:`PanopticFormatError`, as
``eyecool validate-data`` does. Predictions are held to panopticapi's checks either way: a prediction PNG and its
``segments_info`` must agree and name known categories.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from eyecool.panoptic_format import (VOID_ID, PanopticFormatError, PanopticFormatWarning, load_json, read_id_map,
                                     segment_mismatches)
from eyecool_ext import ops

# Result keys of the JSON summary (x100), as detectron2 and the ecosystem report them: per average (All, Things,
# Stuff) its PQ, SQ and RQ keys.
SUMMARY_KEYS = {"All": ("PQ", "SQ", "RQ"), "Things": ("PQ_th", "SQ_th", "RQ_th"), "Stuff": ("PQ_st", "SQ_st", "RQ_st")}
# The nine keys of summary(), in order.
PQ_KEYS: Tuple[str, ...] = tuple(key for keys in SUMMARY_KEYS.values() for key in keys)


# At most this many PanopticFormatWarnings per pq_compute call name their image; one more gives the total.
MAX_WARNINGS = 20


# ---------------------------------------------------------------------------------------------------------------
# Categories and segments


class CategoryTable:
    """The categories of the gt JSON, in its order; arrays are indexed by this position (``category index``)."""

    def __init__(self, categories: Sequence[Mapping]):
        by_id: Dict[int, Mapping] = {}
        for cat in categories:
            if "isthing" not in cat:
                raise PanopticFormatError(f"category {cat.get('id')!r} ({cat.get('name', '?')}) has no 'isthing'")
            by_id[int(cat["id"])] = cat  # a repeated id keeps the last entry, as panopticapi's dict does
        self.ids = np.array(list(by_id), dtype=np.int64)
        self.isthing = np.array([by_id[i]["isthing"] == 1 for i in by_id], dtype=bool)
        self.names = [str(by_id[i].get("name", i)) for i in by_id]
        self._sorted = np.argsort(self.ids, kind="stable")
        self._position = {cat_id: pos for pos, cat_id in enumerate(self.ids.tolist())}  # for segment_table

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, category_ids: np.ndarray) -> np.ndarray:
        """Category ids -> category indices; -1 for an id the gt JSON does not list."""
        category_ids = np.asarray(category_ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(category_ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self.ids, category_ids, sorter=self._sorted)
        pos = np.minimum(pos, len(self.ids) - 1)
        found = self._sorted[pos]
        return np.where(self.ids[found] == category_ids, found, -1)


@dataclass
class SegmentTable:
    """One image's ``segments_info`` as arrays, sorted by segment id."""

    ids: np.ndarray  # int64 [S]
    category: np.ndarray  # int64 [S], category index
    iscrowd: np.ndarray  # bool [S]
    area: np.ndarray  # int64 [S], the JSON's area (used for gt segments only)
    crowd_of_category: np.ndarray  # int64 [C], the gt crowd segment that counts for each category, or -1
    # ids left out because of an unknown category (segment_table(strict=False)); their pixels are unlisted ids
    unknown_category_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    _packed: Dict[bool, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def packed(self, gt: bool) -> torch.Tensor:
        """The rows the C++ matching reads (computed once): ``int64 [4, S]`` (ids, category, iscrowd, area) for
        a gt table, ``[2, S]`` (ids, category) for a prediction's."""
        if gt not in self._packed:
            rows = (self.ids, self.category, self.iscrowd, self.area) if gt else (self.ids, self.category)
            self._packed[gt] = torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))
        return self._packed[gt]


def segment_table(segments_info: Sequence[Mapping], categories: CategoryTable, image_id, what: str,
                  strict: bool = True, notes: Optional[List[str]] = None) -> SegmentTable:
    """``segments_info`` -> :class:`SegmentTable`; ``what`` ("gt" or "prediction") names the side in errors.

    With ``strict=True`` a segment whose ``category_id`` the categories do not list, a repeated id and id 0
    raise :class:`PanopticFormatError`. With ``strict=False`` two of them are scored as panopticapi scores them,
    with a message naming them appended to ``notes``: a repeated id keeps its last entry (panopticapi reads
    segments_info into a dict), and a gt segment of an unknown category is left out of the table, so that its
    pixels are an unlisted id (panopticapi counts it under a category that it never averages). A prediction of
    an unknown category and id 0 raise either way (panopticapi raises KeyError for the former).
    """
    table = _plain_segment_table(segments_info, categories)
    if table is not None:
        return table
    return _general_segment_table(segments_info, categories, image_id, what, strict, notes)


def _general_segment_table(segments_info: Sequence[Mapping], categories: CategoryTable, image_id, what: str,
                           strict: bool, notes: Optional[List[str]]) -> SegmentTable:
    """:func:`segment_table` of any ``segments_info``, with numpy (repeats, unknown categories, other types)."""
    count = len(segments_info)
    ids = np.empty(count, dtype=np.int64)
    category_ids = np.empty(count, dtype=np.int64)
    iscrowd = np.zeros(count, dtype=bool)
    area = np.zeros(count, dtype=np.int64)
    crowd_of_category = np.full(len(categories), -1, dtype=np.int64)
    for i, seg in enumerate(segments_info):
        ids[i] = seg["id"]
        category_ids[i] = seg["category_id"]
        iscrowd[i] = seg.get("iscrowd", 0) == 1
        area[i] = seg.get("area", 0)
    # (a set of a few dozen ints is the cheapest test: this runs for every image, the repeats almost never)
    if not strict and count > 1 and len(set(ids.tolist())) < count:
        unique, first = np.unique(ids, return_index=True)
        # panopticapi's {el["id"]: el for el in segments_info}: the last entry of an id, at the place of its
        # first one (the order in which the crowd segments of a category overwrite one another).
        last = count - 1 - np.unique(ids[::-1], return_index=True)[1]
        counts = np.bincount(np.searchsorted(unique, ids))
        if notes is not None:
            notes.append(f"image {image_id}: {what} segments_info lists segment {int(unique[counts > 1][0])} "
                         f"{int(counts[counts > 1][0])} times (repeated ids: {unique[counts > 1].tolist()}); "
                         f"scored as panopticapi does: the last entry counts")
        rows = last[np.argsort(first, kind="stable")]
        ids, category_ids, iscrowd, area = ids[rows], category_ids[rows], iscrowd[rows], area[rows]
        count = len(ids)
    category = categories.index(category_ids)
    if count and (category < 0).any():
        unknown = np.flatnonzero(category < 0)
        bad = int(unknown[0])
        message = f"image {image_id}: {what} segment {int(ids[bad])} has unknown category_id {int(category_ids[bad])}"
        if strict or what != "gt":
            raise PanopticFormatError(message)
        others = [f"{int(ids[i])} ({int(category_ids[i])})" for i in unknown[1:]]
        if notes is not None:
            notes.append(message + (f" (also segments {', '.join(others)})" if others else "") +
                         "; scored as panopticapi does: as pixels of no listed segment")
        known = category >= 0
        unknown_category_ids = np.sort(ids[~known])
        ids, category, iscrowd, area = ids[known], category[known], iscrowd[known], area[known]
        count = len(ids)
    else:
        unknown_category_ids = np.empty(0, dtype=np.int64)
    if count and (ids == VOID_ID).any():
        raise PanopticFormatError(f"image {image_id}: {what} segments_info lists segment id 0, which means void")
    order = np.argsort(ids, kind="stable")
    if count > 1 and (np.diff(ids[order]) == 0).any():
        dup = int(ids[order][1:][np.diff(ids[order]) == 0][0])
        raise PanopticFormatError(f"image {image_id}: {what} segments_info lists segment {dup} twice")
    # panopticapi keeps, per category, the last crowd segment of segments_info (a dict overwritten in order).
    for i in np.flatnonzero(iscrowd):
        crowd_of_category[category[i]] = ids[i]
    return SegmentTable(ids[order], category[order], iscrowd[order], area[order], crowd_of_category,
                        unknown_category_ids=unknown_category_ids)


def _plain_segment_table(segments_info: Sequence[Mapping], categories: CategoryTable) -> Optional[SegmentTable]:
    """:func:`segment_table` of the usual ``segments_info`` (int ids and areas, each id once, none 0, every
    category listed) with a few list operations and one array; None for anything else, which the general path
    takes (and explains). pq_compute builds two tables per image on the thread that feeds the C++ workers: with
    ~30 small numpy calls per table that thread, not the PNG reading, was the bottleneck on 2 cores."""
    position = categories._position
    ids, category, iscrowd, area = [], [], [], []
    for seg in segments_info:
        seg_id, seg_area = seg["id"], seg.get("area", 0)
        if type(seg_id) is not int or type(seg_area) is not int or seg_id == VOID_ID:
            return None
        ids.append(seg_id)
        category.append(position.get(seg["category_id"], -1))
        iscrowd.append(int(seg.get("iscrowd", 0) == 1))
        area.append(seg_area)
    if -1 in category or len(set(ids)) != len(ids):
        return None
    crowd_of_category = np.full(len(categories), -1, dtype=np.int64)
    for seg_id, cat, crowd in zip(ids, category, iscrowd):
        if crowd:  # the last crowd segment of a category counts, as in the general path
            crowd_of_category[cat] = seg_id
    order = sorted(range(len(ids)), key=ids.__getitem__)
    rows = np.array([[column[i] for i in order] for column in (ids, category, iscrowd, area)],
                    dtype=np.int64).reshape(4, len(ids))
    table = SegmentTable(rows[0], rows[1], rows[2].astype(bool), rows[3], crowd_of_category)
    # The packed rows the C++ matching reads, as views of the one array (rows 0-1 of it are contiguous).
    table._packed[True], table._packed[False] = torch.from_numpy(rows), torch.from_numpy(rows[:2])
    return table


def _segment_index(table: SegmentTable, ids: np.ndarray) -> np.ndarray:
    """Segment ids -> rows of ``table``; -1 for ids it does not list (and for void)."""
    if len(table.ids) == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(table.ids, ids), len(table.ids) - 1)
    return np.where(table.ids[pos] == ids, pos, -1)


def _segment_mismatches(png_ids: np.ndarray, table: SegmentTable, image_id, what: str) -> List[str]:
    """The segment rule (``panoptic_format.segment_mismatches``) between the ids seen in a PNG (repeats allowed)
    and its segment table; the ids left out of the table for an unknown category are reported already."""
    return segment_mismatches(png_ids, table.ids, f"image {image_id}", f"{what} ", table.unknown_category_ids)


def _check_same_segments(png_ids: np.ndarray, table: SegmentTable, image_id, what: str) -> None:
    """The non-void ids of a PNG and its segments_info must be the same set (:class:`PanopticFormatError`
    naming the first difference otherwise)."""
    messages = _segment_mismatches(png_ids, table, image_id, what)
    if messages:
        raise PanopticFormatError(messages[0])


# ---------------------------------------------------------------------------------------------------------------
# Per-image statistics


@dataclass
class ImageStatistics:
    """One image's contribution, for the categories it touches only (so that gathering it is cheap)."""

    category: np.ndarray  # int64 [k], category indices
    iou: np.ndarray  # float64 [k], sum of the IoUs of the matches
    tp: np.ndarray  # int64 [k]
    fp: np.ndarray  # int64 [k]
    fn: np.ndarray  # int64 [k]


def match_segments(pairs: Tuple[np.ndarray, np.ndarray, np.ndarray], gt: SegmentTable, pred: SegmentTable,
                   num_categories: int, image_id, strict: bool = True,
                   notes: Optional[List[str]] = None) -> ImageStatistics:
    """PQ statistics of one image from its pair counts.

    Args:
        pairs: ``(gt_id, pred_id, count)`` int64 arrays ``[P]`` from ``pq_pair_counts`` (sorted by gt, pred).
        gt, pred: the image's segment tables.
        num_categories: length of the category table.
        image_id: names the image in errors.
        strict: a gt PNG id missing from ``gt`` or a ``gt`` segment missing from the PNG raises
            :class:`PanopticFormatError`; with False it is scored as panopticapi scores it (an unlisted id matches
            nothing, is no false negative and is not void; a segment without pixels is a false negative unless
            crowd) and the message is appended to ``notes``. The prediction must agree with its PNG either way.
    """
    gt_id, pred_id, count = pairs
    gi = _segment_index(gt, gt_id)
    pi = _segment_index(pred, pred_id)
    if strict:
        _check_same_segments(gt_id, gt, image_id, "gt")
    else:
        # The rules below already treat an unlisted gt id as panopticapi does: it never becomes a candidate
        # (gi < 0), it is not void (only id 0 is), and it is not the crowd region of any category.
        mismatches = _segment_mismatches(gt_id, gt, image_id, "gt")
        if notes is not None:
            notes.extend(m + "; scored as panopticapi does" for m in mismatches)
    _check_same_segments(pred_id, pred, image_id, "prediction")
    num_pred = len(pred.ids)

    has_pred = pi >= 0
    pred_area = np.bincount(pi[has_pred], weights=count[has_pred], minlength=num_pred).astype(np.int64)
    on_void = has_pred & (gt_id == VOID_ID)
    pred_void = np.zeros(num_pred, dtype=np.int64)
    pred_void[pi[on_void]] = count[on_void]  # each prediction has at most one (void, pred) pair

    # Candidate matches: both sides listed, gt not crowd, same category.
    both = has_pred & (gi >= 0)
    cand = np.flatnonzero(both)
    cand = cand[~gt.iscrowd[gi[cand]] & (gt.category[gi[cand]] == pred.category[pi[cand]])]
    g, p, inter = gi[cand], pi[cand], count[cand]
    union = pred_area[p] + gt.area[g] - inter - pred_void[p]
    iou = inter / union
    matched = iou > 0.5
    g, p, iou = g[matched], p[matched], iou[matched]
    categories_tp = gt.category[g]

    gt_matched = np.zeros(len(gt.ids), dtype=bool)
    gt_matched[g] = True
    pred_matched = np.zeros(num_pred, dtype=bool)
    pred_matched[p] = True

    fn_mask = ~gt_matched & ~gt.iscrowd
    # Pixels of each prediction on the crowd region of its own category.
    crowd_gt = gt.crowd_of_category[pred.category[pi[both]]]
    on_crowd = gt_id[both] == crowd_gt
    pred_crowd = np.zeros(num_pred, dtype=np.int64)
    np.add.at(pred_crowd, pi[both][on_crowd], count[both][on_crowd])
    unmatched = np.flatnonzero(~pred_matched)
    ignored = (pred_void[unmatched] + pred_crowd[unmatched]) / pred_area[unmatched] > 0.5
    fp_pred = unmatched[~ignored]

    tp = np.bincount(categories_tp, minlength=num_categories)
    iou_sum = np.bincount(categories_tp, weights=iou, minlength=num_categories)
    fn = np.bincount(gt.category[fn_mask], minlength=num_categories)
    fp = np.bincount(pred.category[fp_pred], minlength=num_categories)
    touched = np.flatnonzero(tp + fp + fn)
    return ImageStatistics(touched, iou_sum[touched], tp[touched], fp[touched], fn[touched])


class PQStatistics:
    """Sums of IoU, TP, FP and FN per category over the images seen, and the PQ averages computed from them."""

    def __init__(self, categories: CategoryTable):
        self.categories = categories
        self.iou = np.zeros(len(categories), dtype=np.float64)
        self.tp = np.zeros(len(categories), dtype=np.int64)
        self.fp = np.zeros(len(categories), dtype=np.int64)
        self.fn = np.zeros(len(categories), dtype=np.int64)

    def add(self, stats: ImageStatistics) -> None:
        # stats.category holds each category once, so plain fancy-indexed addition is exact.
        self.iou[stats.category] += stats.iou
        self.tp[stats.category] += stats.tp
        self.fp[stats.category] += stats.fp
        self.fn[stats.category] += stats.fn

    def average(self, isthing: Optional[bool]) -> Tuple[Dict[str, float], Dict[int, Dict[str, float]]]:
        """panopticapi's ``pq_average``: ``({"pq","sq","rq","n"}, per-category {"pq","sq","rq"})`` over the
        things (True), the stuff (False) or all categories (None). With no category to average (panopticapi
        divides by zero there) pq, sq and rq are 0.0."""
        pq = sq = rq = 0.0
        n = 0
        per_class: Dict[int, Dict[str, float]] = {}
        for c, cat_id in enumerate(self.categories.ids.tolist()):
            if isthing is not None and bool(self.categories.isthing[c]) != isthing:
                continue
            iou, tp, fp, fn = float(self.iou[c]), int(self.tp[c]), int(self.fp[c]), int(self.fn[c])
            if tp + fp + fn == 0:
                per_class[cat_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
            sq_class = iou / tp if tp != 0 else 0.0
            rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[cat_id] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq += pq_class
            sq += sq_class
            rq += rq_class
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class

    def results(self) -> Dict:
        """panopticapi's return value: ``{"All", "Things", "Stuff": {"pq","sq","rq","n"}, "per_class": ...}``."""
        results: Dict = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            results[name], per_class = self.average(isthing)
            if name == "All":
                results["per_class"] = per_class
        return results


# ---------------------------------------------------------------------------------------------------------------
# Pair counts


def _size_mismatch(image_id, pred_width_height, gt_width_height) -> PanopticFormatError:
    return PanopticFormatError(f"image {image_id}: the prediction is {tuple(pred_width_height)} (width, height) but "
                               f"the gt is {tuple(gt_width_height)}")


def pair_counts(gt_ids, pred_ids, image_id=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gt_id, pred_id, count)`` int64 numpy arrays of two ``[H, W]`` id maps (numpy arrays or tensors, CUDA
    tensors stay on their device for the counting)."""
    gt = torch.as_tensor(gt_ids)
    pred = torch.as_tensor(pred_ids)
    if gt.shape != pred.shape:
        raise _size_mismatch(image_id, tuple(pred.shape[-2:])[::-1], tuple(gt.shape[-2:])[::-1])
    if pred.device != gt.device:
        gt = gt.to(pred.device)
    if gt.dtype != pred.dtype:
        gt, pred = gt.long(), pred.long()
    gt_id, pred_id, count = ops.pq_pair_counts(gt, pred)
    return gt_id.cpu().numpy(), pred_id.cpu().numpy(), count.cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# pq_compute


def file_statistics(gt_path: str, pred_path: str, gt: SegmentTable, pred: SegmentTable, num_categories: int,
                    image_id=None, strict: bool = True, notes: Optional[List[str]] = None) -> ImageStatistics:
    """One image's PQ statistics from its gt and predicted PNG files and segment tables, computed in one GIL-free
    C++ call when the kernel is compiled and an inflater is found (``ops.panoptic_png_file_pq_statistics``:
    reading, chunk CRCs, inflation, pair counts and matching). Otherwise, and for what that call leaves alone
    (missing, corrupt or other kinds of PNG, two sizes) or finds inconsistent (a PNG that disagrees with its
    table), the fallback runs: both id maps read (``read_id_map``), :func:`pair_counts` and :func:`match_segments`,
    which also raise the errors naming the image and the segment. ``strict`` and ``notes`` are
    :func:`match_segments`'s: the C++ call reports a gt that disagrees with its PNG as a problem code, and the
    numpy rules then score it leniently."""
    if ops.file_pq_statistics_available():
        problem, category, iou, tp, fp, fn = ops.panoptic_png_file_pq_statistics(
            gt_path, pred_path, gt.packed(True), pred.packed(False), torch.from_numpy(gt.crowd_of_category),
            num_categories)
        if problem == 0:
            return ImageStatistics(category.numpy(), iou.numpy(), tp.numpy(), fp.numpy(), fn.numpy())
    pairs = pair_counts(read_id_map(gt_path, image_id), read_id_map(pred_path, image_id), image_id)
    return match_segments(pairs, gt, pred, num_categories, image_id, strict, notes)


def _evaluate_folders(matched: Sequence[Tuple[Mapping, Mapping]], gt_folder: str, pred_folder: str,
                      categories: CategoryTable, stats: "PQStatistics", workers: int, strict: bool = True) -> None:
    """Adds every image's statistics to ``stats``, in image order; the first image, in order, with an error
    raises it. With ``strict=False`` inconsistent gt is scored as panopticapi scores it, and this thread warns
    (:class:`PanopticFormatWarning`), in image order, for the first :data:`MAX_WARNINGS` images concerned.

    This thread builds the segment tables of a block of images (Python) and hands the block to the worker
    threads, in contiguous chunks: one C++ call per image that reads, inflates, pair-counts and matches with the
    GIL released (:func:`file_statistics`). While they work, this thread builds the next block's tables. Building
    the tables inside the workers is slower on few cores: every kernel call then waits to get the GIL back from
    a thread that is busy in Python. Chunks rather than single images, because every finished task wakes this
    thread, which then competes with the workers for the GIL.
    """
    num_categories = len(categories)
    chunk = max(1, min(16, len(matched) // (4 * workers)))
    block = 64 * workers

    def tables_of(block_pairs):
        tables = []
        for gt_ann, pred_ann in block_pairs:
            image_id = gt_ann["image_id"]
            notes: List[str] = []
            try:
                gt_table = segment_table(gt_ann["segments_info"], categories, image_id, "gt", strict, notes)
                pred_table = segment_table(pred_ann["segments_info"], categories, image_id, "prediction", strict,
                                           notes)
                gt_table.packed(True), pred_table.packed(False)  # here, not in the workers
                tables.append((gt_table, pred_table, notes))
            except Exception as exc:  # noqa: BLE001 - raised in image order, by collect()
                tables.append(exc)
        return tables

    def evaluate(gt_ann, pred_ann, image_tables):
        if isinstance(image_tables, Exception):
            return image_tables
        gt_table, pred_table, notes = image_tables
        try:
            image_stats = file_statistics(os.path.join(gt_folder, gt_ann["file_name"]),
                                          os.path.join(pred_folder, pred_ann["file_name"]), gt_table, pred_table,
                                          num_categories, gt_ann["image_id"], strict, notes)
            return image_stats, notes
        except Exception as exc:  # noqa: BLE001 - raised by this thread, in image order
            return exc

    def submit(pool, block_pairs):
        tables = tables_of(block_pairs)

        def evaluate_chunk(begin: int):
            return [evaluate(*block_pairs[i], tables[i]) for i in range(begin, min(begin + chunk, len(block_pairs)))]

        return pool.map(evaluate_chunk, range(0, len(block_pairs), chunk))

    warned = [0]  # images with warnings so far

    def collect(results):
        for chunk_stats in results:
            for result in chunk_stats:
                if isinstance(result, Exception):
                    raise result
                image_stats, notes = result
                if notes:
                    warned[0] += 1
                    if warned[0] <= MAX_WARNINGS:
                        for note in notes:
                            # stacklevel 4: collect <- _evaluate_folders <- pq_compute <- its caller
                            warnings.warn(note, PanopticFormatWarning, stacklevel=4)
                stats.add(image_stats)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = None
        for block_begin in range(0, len(matched), block):
            results = submit(pool, matched[block_begin:block_begin + block])
            if pending is not None:
                collect(pending)
            pending = results
        if pending is not None:
            collect(pending)
    if warned[0] > MAX_WARNINGS:
        warnings.warn(f"{warned[0]} images have inconsistent annotations (the first {MAX_WARNINGS} are named above); "
                      f"they are scored as panopticapi scores them, strict=True refuses them", PanopticFormatWarning,
                      stacklevel=3)


def pq_compute(gt_json_file: str, pred_json_file: str, gt_folder: Optional[str] = None,
               pred_folder: Optional[str] = None, num_workers: Optional[int] = None,
               verbose: bool = True, strict: bool = False) -> Dict:
    """panopticapi's ``pq_compute``: same signature, folder defaults, rules, return value and numbers, much
    faster.

    Args:
        gt_json_file, pred_json_file: COCO panoptic JSON files (``annotations`` with ``image_id``,
            ``file_name``, ``segments_info``; the gt one also ``categories``).
        gt_folder, pred_folder: folders of the PNGs; default: the JSON path without ``.json``.
        num_workers: threads decoding PNGs and matching (default: the number of CPUs).
        verbose: print the All / Things / Stuff table.
        strict: refuse inconsistent gt (:class:`PanopticFormatError`) instead of scoring it as panopticapi does:
            a gt PNG id missing from its ``segments_info``, a listed gt segment missing from its PNG (an empty
            ``segments_info`` for a PNG with segments is the first case), a gt segment of an unknown category,
            and (gt or prediction) a segment id listed twice.
            By default (False) these are scored as panopticapi scores them (see the module docstring), each
            image concerned with a :class:`PanopticFormatWarning` naming it and the segment (the first
            :data:`MAX_WARNINGS` images, then one warning with their number).

    Returns:
        ``{"All": {"pq", "sq", "rq", "n"}, "Things": ..., "Stuff": ..., "per_class": {category_id: {"pq",
        "sq", "rq"}}}`` (fractions, not x100).

    Raises:
        PanopticFormatError: a prediction PNG and its segments_info disagree, a predicted segment of an unknown
            category (panopticapi raises KeyError for both), a size mismatch, a segment id 0 in segments_info;
            with ``strict=True`` also the problems above.
        FileNotFoundError: a folder or PNG is missing. ValueError: a gt image has no prediction.
    """
    start = time.perf_counter()
    gt_json, pred_json = load_json(gt_json_file), load_json(pred_json_file)
    if gt_folder is None:
        gt_folder = gt_json_file.replace(".json", "")
    if pred_folder is None:
        pred_folder = pred_json_file.replace(".json", "")
    for what, folder in (("ground truth", gt_folder), ("prediction", pred_folder)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"folder {folder} with {what} segmentations doesn't exist")
    categories = CategoryTable(gt_json["categories"])
    pred_annotations = {ann["image_id"]: ann for ann in pred_json["annotations"]}
    matched = []
    for gt_ann in gt_json["annotations"]:
        if gt_ann["image_id"] not in pred_annotations:
            raise ValueError(f"no prediction for the image with id: {gt_ann['image_id']}")
        matched.append((gt_ann, pred_annotations[gt_ann["image_id"]]))

    stats = PQStatistics(categories)
    _evaluate_folders(matched, gt_folder, pred_folder, categories, stats, num_workers or os.cpu_count() or 1,
                      strict)
    results = stats.results()
    if verbose:
        print(format_table(results))
        print(f"Time elapsed: {time.perf_counter() - start:0.2f} seconds")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def format_table(results: Mapping) -> str:
    """The All / Things / Stuff table (PQ, SQ, RQ x100 and the number of categories), as panopticapi prints it."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * (10 + 7 * 4)]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(name, 100 * r["pq"], 100 * r["sq"],
                                                                     100 * r["rq"], r["n"]))
    return "\n".join(lines)


def format_per_class_table(results: Mapping, categories: Optional[Iterable[Mapping]] = None) -> str:
    """One row per category (id, name when ``categories`` is given, PQ, SQ, RQ x100)."""
    names = {int(c["id"]): str(c.get("name", "")) for c in (categories or [])}
    lines = ["{:>6s} {:24s}| {:>5s}  {:>5s}  {:>5s}".format("id", "category", "PQ", "SQ", "RQ"), "-" * 52]
    for cat_id, r in results["per_class"].items():
        lines.append("{:6d} {:24s}| {:5.1f}  {:5.1f}  {:5.1f}".format(int(cat_id), names.get(int(cat_id), "")[:24],
                                                                   100 * r["pq"], 100 * r["sq"], 100 * r["rq"]))
    return "\n".join(lines)


def summary(results: Mapping) -> Dict[str, float]:
    """The :data:`PQ_KEYS` (``"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"``) x100, as detectron2 and the ecosystem
    report them."""
    out: Dict[str, float] = {}
    for name, keys in SUMMARY_KEYS.items():
        for key, metric in zip(keys, ("pq", "sq", "rq")):
            out[key] = 100.0 * float(results[name][metric])
    return out


def write_summary_json(results: Mapping, path: str, per_class: bool = False) -> None:
    """Writes :func:`summary` (and the per-class figures x100 when asked) to ``path`` as JSON."""
    payload: Dict = dict(summary(results))
    if per_class:
        payload["per_class"] = {str(cat_id): {k.upper(): 100.0 * float(v) for k, v in r.items()}
                                for cat_id, r in results["per_class"].items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


__all__ = ["pq_compute", "PQStatistics", "ImageStatistics", "CategoryTable", "SegmentTable", "segment_table",
           "match_segments", "pair_counts", "format_table", "format_per_class_table", "summary",
           "write_summary_json", "PQ_KEYS", "SUMMARY_KEYS"]
