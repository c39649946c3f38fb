"""Reading COCO panoptic PNGs in C++, the I/O half of panoptic quality.

One reader (``csrc/cpu/panoptic_png_reader.cpp``) parses a PNG file's chunks, checks their CRCs, inflates the
image data and unfilters the rows; it handles what panoptic PNGs are (8-bit RGB or RGBA, not interlaced). Its
inflater is found one way (``csrc/cpu/png_inflate.h``): the dynamic loader's search for libdeflate
(``libdeflate.so.0``), else zlib (``libz.so.1``); :func:`png_inflater` says which. Two ops use it, each one
GIL-free call (so that a thread pool reads several files at once):

* :func:`read_panoptic_png`: a file -> ``int32 [H, W]`` segment ids;
* :func:`panoptic_png_file_pq_statistics`: a gt and a prediction file -> the image's PQ statistics (pair counts
  row by row, without writing either id map, then panopticapi's matching), ``pq_compute``'s call per image.

Whatever the reader does not handle (other kinds of PNG, corrupt files, no compiled extension, no inflater), the
callers (``eyecool.panoptic_format.read_id_map``, ``eyecool.evaluation.pq_compute``) give to PIL, which decodes
it or names its problem.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from eyecool_ext import _extension


def png_inflater() -> str:
    """The inflater the compiled reader found: ``"libdeflate"``, ``"zlib"``, or ``""`` (none, or no compiled
    extension: the reader then handles no file)."""
    if not _extension.has_op("_png_inflater"):
        return ""
    return torch.ops.eyecool._png_inflater()


def read_panoptic_png(path: str) -> Optional[Tensor]:
    """The panoptic PNG file at ``path`` -> ``int32 Tensor[H, W]`` segment ids (``R + 256 G + 256^2 B``), or
    None when the compiled reader does not handle it (not an 8-bit RGB/RGBA PNG, unreadable, corrupt or
    truncated, no compiled extension or inflater): the caller then decodes it with PIL, which also names the
    problem of a broken file."""
    if not _extension.use_compiled("read_panoptic_png") or not png_inflater():
        return None
    ids = torch.ops.eyecool.read_panoptic_png(os.fspath(path))
    return ids if ids.numel() else None


def file_pq_statistics_available() -> bool:
    """Whether :func:`panoptic_png_file_pq_statistics` can run: the compiled kernel and an inflater."""
    return _extension.use_compiled("panoptic_png_file_pq_statistics") and bool(png_inflater())


def panoptic_png_file_pq_statistics(gt_path: str, pred_path: str, gt_segments: Tensor, pred_segments: Tensor,
                                    crowd_of_category: Tensor, num_categories: int):
    """One image's panoptic-quality statistics from its gt and predicted PNG files, in one GIL-free C++ call:
    reading, chunk CRCs, inflation, pair counts row by row (no id map is written) and panopticapi's matching
    (the numpy reference is ``eyecool.evaluation.panoptic_quality.match_segments``). Needs
    :func:`file_pq_statistics_available`.

    Args:
        gt_path, pred_path: the two PNG files.
        gt_segments: ``int64 Tensor[4, G]``: segment ids (ascending), category indices, iscrowd (0/1), areas.
        pred_segments: ``int64 Tensor[2, S]``: segment ids (ascending), category indices.
        crowd_of_category: ``int64 Tensor[C]``: per category, the gt crowd segment that counts for it, or -1.
        num_categories: C.

    Returns:
        ``(problem, category, iou_sum, tp, fp, fn)``: ``problem`` an int, nonzero when there are no statistics
        (1/2: a gt id only in the PNG / only in the table, 3/4: likewise for the prediction, 5: a file the reader
        does not handle, or two sizes); otherwise int64 / float64 ``Tensor[k]`` over the k categories the image
        touches, ascending.
    """
    problem, *stats = torch.ops.eyecool.panoptic_png_file_pq_statistics(
        os.fspath(gt_path), os.fspath(pred_path), gt_segments, pred_segments, crowd_of_category, num_categories)
    return (int(problem), *stats)


if _extension.has_op("panoptic_png_file_pq_statistics"):

    @torch.library.register_fake("eyecool::panoptic_png_file_pq_statistics")
    def _panoptic_png_file_pq_statistics_fake(gt_path, pred_path, gt_segments, pred_segments, crowd_of_category,
                                              num_categories):
        touched = torch.library.get_ctx().new_dynamic_size()
        category, tp, fp, fn = (gt_segments.new_empty((touched,)) for _ in range(4))
        return gt_segments.new_empty((1,)), category, gt_segments.new_empty((touched,), dtype=torch.float64), tp, fp, fn


if _extension.has_op("read_panoptic_png"):

    @torch.library.register_fake("eyecool::read_panoptic_png")
    def _read_panoptic_png_fake(path):
        ctx = torch.library.get_ctx()
        return torch.empty((ctx.new_dynamic_size(), ctx.new_dynamic_size()), dtype=torch.int32)
