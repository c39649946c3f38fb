"""Panoptic merges at inference: UPSNet's parameter-free panoptic head as one fused op, and the panopticapi /
Panoptic FPN heuristic merge for comparison.

``upsnet_panoptic_merge`` computes, per pixel, the argmax of UPSNet's logit stack (stuff logits, one logit per
instance, the unknown logit; docs/design.md section 6) without materialising the stack or the pasted masks; with
``output_size`` it also upsamples 1/4-scale semantic logits on the fly, so the full-resolution logits never
exist. The op is ``torch.ops.eyecool.upsnet_panoptic_merge`` (no gradient: inference only).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from eyecool_ext import _extension, reference
from eyecool_ext._utils import check_batch_lengths, check_panoptic_merge_args, per_image_sizes
from eyecool_ext.reference.panoptic_merge import heuristic_panoptic_merge

SizeLike = Optional[Union[int, Tuple[int, int]]]


def upsnet_panoptic_merge(sem_logits: Tensor, num_stuff: int, boxes: Tensor, classes: Tensor, mask_logits: Tensor,
                          output_size: SizeLike = None) -> Tensor:
    """UPSNet's panoptic merge for one image, fused: the per-pixel argmax of the panoptic logit stack.

    Stack per pixel: the S stuff logits ``X[0:S]``; per instance ``Y_i + M_i`` where ``Y_i = X[S + classes[i]]``
    and ``M_i`` the mask logit bilinearly pasted into box i (both 0 outside the box); the unknown logit
    ``max_{t >= S} X[t] - max_i Y_i``. Ties go to the first index. A pixel (px, py) is inside a box when its
    centre (px + 0.5, py + 0.5) satisfies ``x1 <= cx < x2`` and ``y1 <= cy < y2``; its mask logit is the
    bilinear sample (zero padding, align_corners=False) at ``((cx - x1) / (x2 - x1)) * 2 - 1`` (likewise y),
    detectron2's pasting convention.

    Args:
        sem_logits: ``Tensor[S + K, h, w]`` semantic logits (stuff first), at the output size or, with
            ``output_size``, at any scale (e.g. 1/4), upsampled bilinearly (align_corners=False) on the fly.
        num_stuff: S.
        boxes: ``Tensor[M, 4]`` (x1, y1, x2, y2) in output pixels; same dtype and device as ``sem_logits``.
        classes: ``Tensor[M]`` integer thing index (0..K-1) of each box.
        mask_logits: ``Tensor[M, s, s]`` mask logits (the box class's channel, before sigmoid), e.g. s = 28.
        output_size: ``(H, W)`` of the result; default ``(h, w)``.

    Returns:
        ``Tensor[H, W]`` int64: ``0..S-1`` stuff class, ``S..S+M-1`` instance ``value - S``, ``S + M`` unknown.
    """
    size = check_panoptic_merge_args(sem_logits, num_stuff, boxes, classes, mask_logits, output_size)
    if not _extension.use_compiled("upsnet_panoptic_merge", sem_logits, boxes, classes, mask_logits):
        return reference.upsnet_panoptic_merge(sem_logits, num_stuff, boxes, classes, mask_logits, size)
    height, width = size if size is not None else sem_logits.shape[-2:]
    if height == 0 or width == 0:  # nothing to label (the kernel refuses empty logits even for an empty output)
        return torch.empty((height, width), dtype=torch.int64, device=sem_logits.device)
    return torch.ops.eyecool.upsnet_panoptic_merge(sem_logits, int(num_stuff), boxes, classes.long(), mask_logits,
                                                   int(height), int(width))


def upsnet_panoptic_merge_batch(sem_logits: Union[Tensor, Sequence[Tensor]], num_stuff: int,
                                boxes: Sequence[Tensor], classes: Sequence[Tensor], mask_logits: Sequence[Tensor],
                                output_sizes=None) -> List[Tensor]:
    """:func:`upsnet_panoptic_merge` for a batch of images.

    Args:
        sem_logits: ``Tensor[N, S + K, h, w]`` or a list of N ``Tensor[S + K, h_n, w_n]``.
        num_stuff: S.
        boxes, classes, mask_logits: lists of N per-image tensors, as in :func:`upsnet_panoptic_merge`.
        output_sizes: None, one ``(H, W)`` for every image, or a list of N ``(H, W)`` (e.g. the original sizes
            of padded images).

    Returns:
        list of N ``Tensor[H_n, W_n]`` int64 label maps.
    """
    sem_list = list(sem_logits.unbind(0)) if isinstance(sem_logits, Tensor) else list(sem_logits)
    check_batch_lengths(sem_list, boxes, classes, mask_logits)
    sizes = per_image_sizes(output_sizes, len(sem_list))
    return [upsnet_panoptic_merge(s, num_stuff, b, c, m, o)
            for s, b, c, m, o in zip(sem_list, boxes, classes, mask_logits, sizes)]


__all__ = ["upsnet_panoptic_merge", "upsnet_panoptic_merge_batch", "heuristic_panoptic_merge"]


if _extension.has_op("upsnet_panoptic_merge"):

    @torch.library.register_fake("eyecool::upsnet_panoptic_merge")
    def _upsnet_panoptic_merge_fake(sem_logits, num_stuff, boxes, classes, mask_logits, height, width):
        torch._check(sem_logits.dim() == 3, lambda: "sem_logits must be [S + K, H, W]")
        return sem_logits.new_empty((height, width), dtype=torch.int64)
