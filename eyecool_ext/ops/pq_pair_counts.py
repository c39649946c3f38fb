"""pq_pair_counts: the pixel count of every (gt segment, predicted segment) pair, the inner loop of panoptic
quality (``eyecool.evaluation``).

The op is registered in C++ (``torch.ops.eyecool.pq_pair_counts``, always batched); this module adds the typed
wrappers for one image and for a batch, and the fake kernel (its output length is data dependent). There is
no gradient: ids are integers.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from eyecool_ext import _extension, reference

def _check_id_maps(gt_ids: Tensor, pred_ids: Tensor, dims: int, layout: str) -> None:
    for name, t in (("gt_ids", gt_ids), ("pred_ids", pred_ids)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a Tensor{layout}, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must be a Tensor{layout} id map, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"pred_ids must have the shape of gt_ids {tuple(gt_ids.shape)}, got {tuple(pred_ids.shape)}")
    if gt_ids.dtype != pred_ids.dtype:
        raise ValueError(f"gt_ids and pred_ids must have the same dtype, got {gt_ids.dtype} and {pred_ids.dtype}")
    if gt_ids.device != pred_ids.device:
        raise ValueError(f"gt_ids and pred_ids must be on the same device, got {gt_ids.device} and {pred_ids.device}")


def batched_pq_pair_counts(gt_ids: Tensor, pred_ids: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Distinct (image, gt_id, pred_id) triples of a batch of id maps and their pixel counts, in one pass.

    Args:
        gt_ids: ``Tensor[B, H, W]`` ground-truth segment ids (any integer dtype; ids in ``[0, 2^31)``, 0 = void).
        pred_ids: ``Tensor[B, H, W]`` predicted segment ids, same dtype and device.

    Returns:
        ``(image_index, gt_id, pred_id, count)``, each ``int64 Tensor[P]``, sorted by (image, gt_id, pred_id);
        ``count`` is the number of pixels of image ``image_index`` where gt has ``gt_id`` and pred ``pred_id``.

    The CPU kernel counts runs of equal pairs in a hash table (multithreaded over images and row bands); the
    CUDA kernel sorts the encoded pairs on the device. Both give identical results.
    """
    _check_id_maps(gt_ids, pred_ids, 3, "[B, H, W]")
    if not _extension.use_compiled("pq_pair_counts", gt_ids, pred_ids):
        return reference.batched_pq_pair_counts(gt_ids, pred_ids)
    image, gt, pred, counts = torch.ops.eyecool.pq_pair_counts(gt_ids, pred_ids)
    return image, gt, pred, counts


def pq_pair_counts(gt_ids: Tensor, pred_ids: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Distinct (gt_id, pred_id) pairs of two id maps and their pixel counts, in one pass.

    Args:
        gt_ids: ``Tensor[H, W]`` ground-truth segment ids (any integer dtype; ids in ``[0, 2^31)``, 0 = void).
        pred_ids: ``Tensor[H, W]`` predicted segment ids, same dtype and device.

    Returns:
        ``(gt_id, pred_id, count)``, each ``int64 Tensor[P]``, sorted by (gt_id, pred_id). ``count.sum()`` is
        ``H * W``; the rows with ``gt_id == 0`` give each prediction's overlap with void.
    """
    _check_id_maps(gt_ids, pred_ids, 2, "[H, W]")
    _, gt, pred, counts = batched_pq_pair_counts(gt_ids.unsqueeze(0), pred_ids.unsqueeze(0))
    return gt, pred, counts


if _extension.has_op("pq_pair_counts"):

    @torch.library.register_fake("eyecool::pq_pair_counts")
    def _pq_pair_counts_fake(gt_ids, pred_ids):
        torch._check(gt_ids.dim() == 3, lambda: "gt_ids must be [B, H, W]")
        torch._check(gt_ids.shape == pred_ids.shape, lambda: "pred_ids must have the shape of gt_ids")
        torch._check(gt_ids.dtype == pred_ids.dtype, lambda: "gt_ids and pred_ids must have the same dtype")
        pairs = torch.library.get_ctx().new_dynamic_size()
        return tuple(gt_ids.new_empty((pairs,), dtype=torch.int64) for _ in range(4))
