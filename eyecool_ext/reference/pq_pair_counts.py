"""pq_pair_counts in plain PyTorch: ``torch.unique`` over the rows (image, gt_id, pred_id) of every pixel."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def batched_pq_pair_counts(gt_ids: Tensor, pred_ids: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``[B, H, W]`` integer id maps -> ``(image_index, gt_id, pred_id, count)``, each ``int64 [P]``, sorted by
    (image, gt_id, pred_id)."""
    batch = gt_ids.shape[0]
    image = torch.arange(batch, device=gt_ids.device).view(batch, 1).expand(batch, gt_ids.shape[1] * gt_ids.shape[2])
    rows = torch.stack([image.reshape(-1), gt_ids.reshape(-1).long(), pred_ids.reshape(-1).long()], dim=1)
    if rows.shape[0] == 0:
        empty = rows.new_zeros((0,))
        return empty, empty.clone(), empty.clone(), empty.clone()
    if rows[:, 1:].min() < 0 or rows[:, 1:].max() > 2**31 - 1:
        raise ValueError("pq_pair_counts: segment ids must be in [0, 2147483647]")
    unique_rows, counts = torch.unique(rows, dim=0, sorted=True, return_counts=True)
    return unique_rows[:, 0], unique_rows[:, 1], unique_rows[:, 2], counts


def pq_pair_counts(gt_ids: Tensor, pred_ids: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``[H, W]`` integer id maps -> ``(gt_id, pred_id, count)``, each ``int64 [P]``, sorted by (gt_id, pred_id)."""
    _, gt, pred, counts = batched_pq_pair_counts(gt_ids.unsqueeze(0), pred_ids.unsqueeze(0))
    return gt, pred, counts
