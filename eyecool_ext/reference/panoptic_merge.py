"""Panoptic merges in plain PyTorch: UPSNet's parameter-free panoptic head at inference (the oracle and fallback
of the fused kernel) and the panopticapi / Panoptic FPN heuristic merge (for the ablation).

Label encoding shared by both merges, for one image with S stuff classes and M instances: a ``[H, W]`` int64 map
whose values ``0..S-1`` are stuff classes, ``S..S+M-1`` instance ``value - S`` and ``S+M`` unknown / void.

Pasting convention (detectron2's): pixel (px, py) lies inside box (x1, y1, x2, y2) when its centre
(px + 0.5, py + 0.5) satisfies ``x1 <= cx < x2`` and ``y1 <= cy < y2``; its mask logit is the bilinear sample
(zero padding, align_corners=False) of the 28x28 mask at ``((cx - x1) / (x2 - x1)) * 2 - 1`` (likewise y).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from eyecool_ext._autocast import reference_policy
from eyecool_ext._utils import check_batch_lengths, check_panoptic_merge_args, per_image_sizes


def semantic_at_size(sem_logits: Tensor, output_size: Optional[Tuple[int, int]]) -> Tensor:
    """``[C, h, w]`` -> ``[C, H, W]``: bilinear (align_corners=False) resize, or the logits as they are."""
    if output_size is None or tuple(output_size) == tuple(sem_logits.shape[-2:]):
        return sem_logits
    return F.interpolate(sem_logits.unsqueeze(0), size=tuple(output_size), mode="bilinear",
                         align_corners=False).squeeze(0)


def paste_mask_logits(boxes: Tensor, mask_logits: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """Mask logits resampled into their boxes on a ``height x width`` image.

    Args:
        boxes: ``Tensor[M, 4]`` (x1, y1, x2, y2) in pixels.
        mask_logits: ``Tensor[M, s, s]``.

    Returns:
        ``(inside, pasted)``: ``Tensor[M, H, W]`` bool (pixel centre inside the box) and ``Tensor[M, H, W]``
        logits (0 outside the box).
    """
    m = boxes.size(0)
    dtype, device = mask_logits.dtype, mask_logits.device
    cx = torch.arange(width, dtype=dtype, device=device) + 0.5
    cy = torch.arange(height, dtype=dtype, device=device) + 0.5
    x1, y1, x2, y2 = (boxes[:, i].view(m, 1) for i in range(4))
    in_x = (cx >= x1) & (cx < x2)  # [M, W]
    in_y = (cy >= y1) & (cy < y2)  # [M, H]
    inside = in_y[:, :, None] & in_x[:, None, :]
    gx = ((cx - x1) / (x2 - x1)) * 2 - 1
    gy = ((cy - y1) / (y2 - y1)) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(m, height, width), gy[:, :, None].expand(m, height, width)], dim=-1)
    grid = torch.where(inside[..., None], grid, torch.zeros_like(grid))  # keeps NaN/inf of empty boxes out
    pasted = F.grid_sample(mask_logits.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False).squeeze(1)
    return inside, torch.where(inside, pasted, torch.zeros_like(pasted))


def upsnet_logit_stack(sem_logits: Tensor, num_stuff: int, boxes: Tensor, classes: Tensor,
                       mask_logits: Tensor) -> Tensor:
    """UPSNet's panoptic logit stack ``[S + M + 1, H, W]`` for one image (docs/design.md section 6).

    Rows: the S stuff logits; ``Y_i + M_i`` per instance (semantic logit of its class and the pasted mask logit,
    both 0 outside the box); the unknown logit ``max_{t >= S} X[t] - max_i Y_i`` (0 where M = 0).
    """
    channels, height, width = sem_logits.shape
    inside, pasted = paste_mask_logits(boxes, mask_logits, height, width)
    thing_logits = sem_logits[num_stuff + classes.long()]  # [M, H, W]
    y = torch.where(inside, thing_logits, torch.zeros_like(thing_logits))
    max_y = y.max(dim=0).values if boxes.size(0) else sem_logits.new_zeros((height, width))
    unknown = sem_logits[num_stuff:].max(dim=0).values - max_y
    return torch.cat([sem_logits[:num_stuff], y + pasted, unknown.unsqueeze(0)], dim=0)


@reference_policy("upsnet_panoptic_merge", ("sem_logits", "boxes", "mask_logits"))
def upsnet_panoptic_merge(sem_logits: Tensor, num_stuff: int, boxes: Tensor, classes: Tensor, mask_logits: Tensor,
                          output_size=None) -> Tensor:
    """Reference UPSNet merge: materialise the logit stack and take its argmax (first index on ties).

    See ``eyecool_ext.ops.upsnet_panoptic_merge`` for the contract. Returns ``Tensor[H, W]`` int64.
    """
    size = check_panoptic_merge_args(sem_logits, num_stuff, boxes, classes, mask_logits, output_size)
    sem = semantic_at_size(sem_logits, size)
    return upsnet_logit_stack(sem, num_stuff, boxes, classes, mask_logits).argmax(dim=0)


def upsnet_panoptic_merge_batch(sem_logits: Sequence[Tensor], num_stuff: int, boxes: Sequence[Tensor],
                                classes: Sequence[Tensor], mask_logits: Sequence[Tensor],
                                output_sizes=None) -> List[Tensor]:
    """Reference batched UPSNet merge: one :func:`upsnet_panoptic_merge` per image."""
    sizes = per_image_sizes(output_sizes, len(sem_logits))
    check_batch_lengths(sem_logits, boxes, classes, mask_logits)
    return [upsnet_panoptic_merge(s, num_stuff, b, c, m, o)
            for s, b, c, m, o in zip(sem_logits, boxes, classes, mask_logits, sizes)]


def heuristic_panoptic_merge(sem_seg: Tensor, num_stuff: int, masks: Tensor, scores: Tensor,
                             overlap_threshold: float = 0.5, stuff_area_limit: int = 4096,
                             score_threshold: float = 0.5) -> Tensor:
    """The panopticapi / Panoptic FPN merge (detectron2's ``combine_semantic_and_instance_outputs``).

    Instances in decreasing score order: stop below ``score_threshold``; skip empty masks and masks whose pixels
    are more than ``overlap_threshold`` already taken; the rest take their free pixels. Then every stuff class of
    the semantic prediction takes its free pixels when they number at least ``stuff_area_limit``.

    Args:
        sem_seg: ``Tensor[H, W]`` int64 semantic prediction (argmax of the logits; values ``>= num_stuff`` are
            things and are never pasted as stuff).
        num_stuff: S.
        masks: ``Tensor[M, H, W]`` bool instance masks.
        scores: ``Tensor[M]`` instance scores.

    Returns:
        ``Tensor[H, W]`` int64 in the encoding of :func:`upsnet_panoptic_merge`: ``0..S-1`` stuff, ``S + i``
        instance i, ``S + M`` void.
    """
    if sem_seg.dim() != 2 or sem_seg.is_floating_point():
        raise ValueError(f"sem_seg must be an integer Tensor[H, W], got {tuple(sem_seg.shape)} {sem_seg.dtype}")
    m = masks.size(0) if masks.dim() == 3 else -1
    if masks.dim() != 3 or masks.shape[1:] != sem_seg.shape:
        raise ValueError(f"masks must be a Tensor[M, {sem_seg.size(0)}, {sem_seg.size(1)}], got "
                         f"{tuple(masks.shape)}")
    if scores.shape != (m,):
        raise ValueError(f"scores must be a Tensor[{m}], got {tuple(scores.shape)}")
    void = num_stuff + m
    out = torch.full_like(sem_seg, void, dtype=torch.int64)
    taken = torch.zeros_like(sem_seg, dtype=torch.bool)
    if out.numel() == 0:  # an empty image: nothing to paste (and no row to reduce over below)
        return out
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        if not float(scores[i]) >= score_threshold:  # also a NaN score, which argsort puts first
            continue
        mask = masks[i].bool()
        # Work on the rows the mask occupies (a contiguous slab; instances are small against the image), with
        # count_nonzero and masked_fill_ rather than .sum() and out[mask] = v: a bool sum widens to int64 and
        # boolean indexing gathers the indices first (4x and 2x slower on a COCO-sized image).
        rows = torch.nonzero(mask.view(torch.uint8).amax(1)).flatten()
        if rows.numel() == 0:  # an empty mask
            continue
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        mask, taken_rows = mask[y0:y1], taken[y0:y1]
        area = int(torch.count_nonzero(mask))
        overlap = int(torch.count_nonzero(mask & taken_rows))
        if overlap / area > overlap_threshold:
            continue
        mask = mask & ~taken_rows
        out[y0:y1].masked_fill_(mask, num_stuff + i)
        taken_rows |= mask
    free_stuff = (~taken) & (sem_seg < num_stuff) & (sem_seg >= 0)
    areas = torch.bincount(sem_seg[free_stuff], minlength=num_stuff)
    kept = areas >= stuff_area_limit
    paste = free_stuff & kept.take(sem_seg.clamp(0, num_stuff - 1)) if num_stuff else free_stuff
    return torch.where(paste, sem_seg, out)
