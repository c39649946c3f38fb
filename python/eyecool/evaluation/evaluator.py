"""PanopticEvaluator: PQ of in-memory predictions during training or inference, without writing PNGs.

    evaluator = PanopticEvaluator("panoptic_val.json", "panoptic_val/")
    for image_id, pred_id_map, segments_info in predictions:   # on every rank of a distributed run
        evaluator.update(image_id, pred_id_map, segments_info)
    results = evaluator.summarize()                            # panopticapi's dict; the table is printed

The evaluator owns the gt side: each ``update`` reads the image's gt PNG (once: the val data set yields images
only), counts the (gt, pred) pixel pairs with ``pq_pair_counts`` (on the prediction's device) and keeps only that
image's per-category statistics. The gt JSON is given as a path or as the annotations and categories a data set
has parsed already. ``summarize`` gathers them from
every rank (``torch.distributed.all_gather_object``), and computes the same numbers as
:func:`eyecool.evaluation.pq_compute` would on the same predictions written as PNGs.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from eyecool.evaluation.panoptic_quality import (CategoryTable, PQStatistics, format_per_class_table, format_table,
                                                 match_segments, pair_counts, segment_table, write_summary_json)
from eyecool.panoptic_format import PanopticFormatWarning, load_json, read_id_map


class PanopticEvaluator:
    """Accumulates PQ statistics image by image; distributed-aware.

    Args:
        gt_json: the gt COCO panoptic JSON: its path, or its contents (a dict with ``annotations`` and
            ``categories``, e.g. what ``CocoPanopticDataset`` has parsed, so that the file is not parsed again).
        gt_folder: folder of the gt PNGs; default: the JSON's path without ``.json`` (panopticapi's default;
            needed when ``gt_json`` is a dict).
        allow_missing_images: when False (default, as ``pq_compute``), ``summarize`` fails if a gt image got no
            prediction; when True it evaluates the images seen.
        output_json: if given, ``summarize`` writes the PQ/SQ/RQ (x100) summary there (rank 0 only).
        verbose: print the All / Things / Stuff table in ``summarize`` (rank 0 only).
        strict: as in ``pq_compute``: by default (False) inconsistent gt (a gt PNG and its ``segments_info``
            disagree, a gt segment of an unknown category) is scored as panopticapi scores it, with a
            ``PanopticFormatWarning`` from ``update`` naming the image and the segment; True raises
            ``PanopticFormatError`` instead.
    """

    def __init__(self, gt_json: Union[str, Mapping[str, Any]], gt_folder: Optional[str] = None, *,
                 allow_missing_images: bool = False, output_json: Optional[str] = None, verbose: bool = True,
                 strict: bool = False):
        if isinstance(gt_json, (str, os.PathLike)):
            gt_folder = gt_folder if gt_folder is not None else os.fspath(gt_json).replace(".json", "")
            gt_json = load_json(os.fspath(gt_json))
        elif gt_folder is None:
            raise ValueError("PanopticEvaluator: gt_folder is needed when gt_json is the JSON's contents, not its path")
        self.gt_folder = gt_folder
        self.category_list = gt_json["categories"]
        self.categories = CategoryTable(self.category_list)
        self.gt_annotations: Dict = {ann["image_id"]: ann for ann in gt_json["annotations"]}
        self.allow_missing_images = allow_missing_images
        self.output_json = output_json
        self.verbose = verbose
        self.strict = strict
        self._images: Dict = {}

    def reset(self) -> None:
        """Forgets every image seen (start of a new evaluation)."""
        self._images = {}

    def update(self, image_id, pred_id_map, segments_info: Sequence[Mapping]) -> None:
        """Adds one image's prediction.

        Args:
            image_id: the image's id in the gt JSON.
            pred_id_map: ``[H, W]`` integer segment ids (``Tensor`` on any device, or numpy array), 0 = void;
                the gt image's size.
            segments_info: one dict per predicted segment with ``id`` and ``category_id`` (extra keys are
                ignored); every non-void id of ``pred_id_map`` must be listed, and every listed id present.
        """
        if image_id not in self.gt_annotations:
            raise KeyError(f"image {image_id} is not in the gt JSON")
        gt_ann = self.gt_annotations[image_id]
        notes: List[str] = []
        gt_table = segment_table(gt_ann["segments_info"], self.categories, image_id, "gt", self.strict, notes)
        pred_table = segment_table(segments_info, self.categories, image_id, "prediction", self.strict, notes)
        gt_ids = read_id_map(os.path.join(self.gt_folder, gt_ann["file_name"]), image_id)
        if isinstance(pred_id_map, np.ndarray):
            pred_id_map = torch.from_numpy(np.ascontiguousarray(pred_id_map))
        if pred_id_map.dtype != torch.int32:
            pred_id_map = pred_id_map.long()
        pairs = pair_counts(torch.from_numpy(gt_ids), pred_id_map, image_id)
        self._images[image_id] = match_segments(pairs, gt_table, pred_table, len(self.categories), image_id,
                                                self.strict, notes)
        for note in notes:
            warnings.warn(note, PanopticFormatWarning, stacklevel=2)

    def _gathered_images(self) -> Dict:
        """Every rank's per-image statistics (the first copy of an image evaluated on several ranks, as a
        DistributedSampler's padding does, is kept)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dict(self._images)
        # Synchronisation point: every rank must call summarize(). Objects are pickled, so this works on gloo
        # and on NCCL (where the current CUDA device must be set, as in any NCCL program).
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, self._images)
        merged: Dict = {}
        for images in per_rank:
            for image_id, stats in images.items():
                merged.setdefault(image_id, stats)
        return merged

    def statistics(self) -> PQStatistics:
        """Sums over the images seen on every rank (collective under torch.distributed)."""
        images = self._gathered_images()
        missing = [image_id for image_id in self.gt_annotations if image_id not in images]
        if missing and not self.allow_missing_images:
            raise ValueError(f"no prediction for {len(missing)} of the {len(self.gt_annotations)} gt images "
                             f"(first: image {missing[0]}); pass allow_missing_images=True to evaluate the images "
                             f"seen only")
        stats = PQStatistics(self.categories)
        # gt JSON order, as pq_compute sums the images, so both give the same floating-point sums.
        for image_id in self.gt_annotations:
            if image_id in images:
                stats.add(images[image_id])
        return stats

    def summarize(self, per_class: bool = False) -> Dict:
        """panopticapi's result dict (on every rank); rank 0 prints the table(s) and writes ``output_json``.

        Under torch.distributed every rank must call it (it gathers the statistics).
        """
        results = self.statistics().results()
        is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        if is_main:
            if self.verbose:
                print(format_table(results))
                if per_class:
                    print(format_per_class_table(results, self.category_list))
            if self.output_json:
                write_summary_json(results, self.output_json, per_class=per_class)
        return results


__all__ = ["PanopticEvaluator"]
