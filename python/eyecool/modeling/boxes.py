"""Box arithmetic shared by the RPN and the ROI heads: delta coding, IoU matching and balanced sampling; and the
pasting of mask logits into boxes shared by the panoptic head's training stack and panoptic inference.

Matching and sampling are written without host synchronisation (no ``nonzero``, no ``.item()``): sampling
draws a random priority per candidate and keeps the top ones with ``topk``, so the number of positives is a
tensor, never a Python int.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Deltas larger than this (in log space) would overflow exp(): detectron2's clamp.
_SCALE_CLAMP = math.log(1000.0 / 16)


def encode_boxes(reference: Tensor, target: Tensor, weights: Sequence[float]) -> Tensor:
    """Deltas ``(dx, dy, dw, dh) * weights`` that move ``reference`` onto ``target``; both ``[..., 4]`` xyxy."""
    wx, wy, ww, wh = weights
    rw = reference[..., 2] - reference[..., 0]
    rh = reference[..., 3] - reference[..., 1]
    rx = reference[..., 0] + 0.5 * rw
    ry = reference[..., 1] + 0.5 * rh
    tw = target[..., 2] - target[..., 0]
    th = target[..., 3] - target[..., 1]
    tx = target[..., 0] + 0.5 * tw
    ty = target[..., 1] + 0.5 * th
    return torch.stack([wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw), wh * torch.log(th / rh)],
                       dim=-1)


def decode_boxes(deltas: Tensor, reference: Tensor, weights: Sequence[float]) -> Tensor:
    """Inverse of :func:`encode_boxes`: deltas ``[..., 4]`` applied to ``reference [..., 4]`` -> xyxy ``[..., 4]``."""
    wx, wy, ww, wh = weights
    deltas = deltas.float()
    reference = reference.float()
    rw = reference[..., 2] - reference[..., 0]
    rh = reference[..., 3] - reference[..., 1]
    rx = reference[..., 0] + 0.5 * rw
    ry = reference[..., 1] + 0.5 * rh
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=_SCALE_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=_SCALE_CLAMP)
    cx, cy = dx * rw + rx, dy * rh + ry
    w, h = torch.exp(dw) * rw, torch.exp(dh) * rh
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def clip_boxes(boxes: Tensor, height, width) -> Tensor:
    """Clamp xyxy ``boxes [..., 4]`` to the image; height, width are numbers or tensors broadcasting to ``[...]``."""
    x1 = boxes[..., 0].clamp(min=0).minimum(torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device))
    y1 = boxes[..., 1].clamp(min=0).minimum(torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device))
    x2 = boxes[..., 2].clamp(min=0).minimum(torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device))
    y2 = boxes[..., 3].clamp(min=0).minimum(torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device))
    return torch.stack([x1, y1, x2, y2], dim=-1)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair: ``[N, 4] x [M, 4] -> [N, M]`` (0 for empty unions)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def match_boxes(iou: Tensor, positive_iou: float, negative_iou: float,
                allow_low_quality: bool) -> Tuple[Tensor, Tensor]:
    """Match candidates (columns) to ground truth (rows) of ``iou [M, N]``.

    Returns ``(matched_index [N] int64, label [N] int8)``: label 1 when the best IoU >= positive_iou, 0 when it is
    < negative_iou, -1 (ignored) in between; with ``allow_low_quality`` every ground truth also makes its best
    candidates (ties included) positive. With no ground truth (M == 0) every candidate is negative.
    """
    n = iou.shape[1]
    if iou.shape[0] == 0:
        return (torch.zeros(n, dtype=torch.long, device=iou.device),
                torch.zeros(n, dtype=torch.int8, device=iou.device))
    best, matched = iou.max(dim=0)
    label = torch.full((n,), -1, dtype=torch.int8, device=iou.device)
    label = torch.where(best >= positive_iou, torch.ones_like(label), label)
    label = torch.where(best < negative_iou, torch.zeros_like(label), label)
    if allow_low_quality:
        best_per_gt = iou.max(dim=1, keepdim=True).values
        is_best = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=0)
        label = torch.where(is_best, torch.ones_like(label), label)
    return matched, label


def sample_balanced(label: Tensor, batch_size: int, positive_fraction: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Pick at most ``batch_size`` candidates, at most ``positive_fraction`` of them positive, at random.

    ``label [N]``: 1 positive, 0 negative, -1 ignored. Returns ``(index [S], is_positive [S], valid [S])`` with
    ``S = min(batch_size, N)`` slots: the sampled positives come first, then negatives; ``valid`` is False for
    slots left over when there are too few candidates. No host synchronisation.
    """
    n = label.numel()
    slots = min(batch_size, n)
    num_pos_max = min(int(batch_size * positive_fraction), n)
    rand = torch.rand(n, device=label.device)
    is_pos = label == 1
    is_neg = label == 0
    # Positives within the quota get priority 2 + u, the remaining negatives 1 + u, everything else -1: one
    # topk then takes the chosen positives first and fills the rest of the batch with random negatives.
    pos_priority = torch.where(is_pos, rand, torch.full_like(rand, -1.0))
    chosen_pos = torch.zeros(n, dtype=torch.bool, device=label.device)
    if num_pos_max > 0:
        top_value, top_index = pos_priority.topk(num_pos_max)
        chosen_pos = chosen_pos.scatter(0, top_index, top_value >= 0)
    priority = torch.where(chosen_pos, rand + 2.0, torch.where(is_neg, rand + 1.0, torch.full_like(rand, -1.0)))
    value, index = priority.topk(slots)
    return index, value >= 2.0, value >= 1.0


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """``[M, height, width]`` float: 1 where the pixel centre (x + 0.5, y + 0.5) lies in the box ``[x1, x2) x
    [y1, y2)`` (boxes ``[M, 4]`` xyxy in pixels), else 0."""
    return _inside_boxes(boxes.to(torch.float32), height, width).to(torch.float32)


def _inside_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5
    inside_x = (xs.view(1, -1) >= boxes[:, 0:1]) & (xs.view(1, -1) < boxes[:, 2:3])
    inside_y = (ys.view(1, -1) >= boxes[:, 1:2]) & (ys.view(1, -1) < boxes[:, 3:4])
    return inside_y.unsqueeze(2) & inside_x.unsqueeze(1)


def paste_mask_logits(mask_logits: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Resample ``[M, s, s]`` mask logits bilinearly into their boxes on an ``height x width`` grid, 0 outside.

    boxes ``[M, 4]`` xyxy in the grid's pixel units; a pixel inside its box (see :func:`box_masks`) samples the
    mask at its centre's relative position in the box (bilinear, zero padding, align_corners=False): the
    convention of the UPSNet merge kernel, so that training, the instance selection of inference and the merge
    see the same logits. Computed in float32; returns ``[M, height, width]`` float32.
    """
    m = mask_logits.shape[0]
    if m == 0:
        return mask_logits.new_zeros((0, height, width), dtype=torch.float32)
    boxes = boxes.to(torch.float32)
    inside = _inside_boxes(boxes, height, width)
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    x1, y1, x2, y2 = (boxes[:, i].view(-1, 1) for i in range(4))
    gx = ((xs.view(1, -1) - x1) / (x2 - x1)) * 2 - 1  # [M, W]
    gy = ((ys.view(1, -1) - y1) / (y2 - y1)) * 2 - 1  # [M, H]
    grid = torch.stack([gx.view(m, 1, width).expand(m, height, width),
                        gy.view(m, height, 1).expand(m, height, width)], dim=-1)
    grid = torch.where(inside.unsqueeze(-1), grid, torch.zeros_like(grid))  # keeps NaN/inf of empty boxes out
    pasted = F.grid_sample(mask_logits.float().unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False).squeeze(1)
    return torch.where(inside, pasted, torch.zeros_like(pasted))
