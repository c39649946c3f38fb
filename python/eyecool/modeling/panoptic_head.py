"""UPSNet's parameter-free panoptic head: its training target and loss, and the inference merge.

Training works at 1/4 scale on the ground-truth instances: a random ``keep_fraction`` of the non-crowd instances
is kept; the per-pixel logit stack is the S stuff logits, one logit per kept instance (its class's semantic logit
inside its box plus its mask logit pasted into the box) and the "unknown" logit; the target is the stuff class,
the kept instance, or unknown for pixels of dropped instances and of crowd regions. Inference is
:func:`eyecool.modeling.panoptic_inference.panoptic_inference` (docs/design.md section 6).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import eyecool_ext

from eyecool.modeling.boxes import box_masks, paste_mask_logits
from eyecool.modeling.panoptic_inference import panoptic_inference


def panoptic_logits(sem_logits: Tensor, boxes: Tensor, classes: Tensor, mask_logits: Tensor,
                    num_stuff: int) -> Tensor:
    """UPSNet's per-pixel logit stack for one image: ``[S + M + 1, h, w]``.

    Args:
        sem_logits: ``[S + K, h, w]``.
        boxes: ``[M, 4]`` xyxy in the pixels of ``sem_logits``; classes ``[M]`` in 0..K-1.
        mask_logits: ``[M, s, s]`` each instance's class mask logits.
        num_stuff: S.

    Channels: the S stuff logits; for instance i ``Y_i + M_i`` (``Y_i`` = its class's semantic logit inside its
    box, 0 outside; ``M_i`` = its mask logits pasted into its box); last, the unknown logit
    ``max_{t >= S} X[t] - max_i Y_i`` (the max over i includes the zeros outside boxes; 0 without instances).
    """
    sem_logits = sem_logits.float()
    h, w = sem_logits.shape[-2:]
    stuff = sem_logits[:num_stuff]
    inside = box_masks(boxes, h, w)
    thing_logits = sem_logits[num_stuff + classes.long()]  # [M, h, w]
    y = thing_logits * inside
    instance = y + paste_mask_logits(mask_logits, boxes, h, w)
    max_y = y.max(dim=0).values if boxes.shape[0] else sem_logits.new_zeros((h, w))
    unknown = sem_logits[num_stuff:].max(dim=0).values - max_y
    return torch.cat([stuff, instance, unknown.unsqueeze(0)])


def panoptic_training_target(sem_seg: Tensor, kept_masks: Tensor, dropped_masks: Tensor, crowd_mask: Tensor,
                             num_stuff: int, size: Tuple[int, int], stride: int = 4) -> Tensor:
    """UPSNet's panoptic target for one image on the ``size = (h, w)`` grid of stride ``stride``: ``[h, w]`` int64.

    Grid cell (y, x) takes the input pixel ``(stride * y + stride // 2, stride * x + stride // 2)``; cells outside
    the image are void (255). Values: the stuff class (0..S-1) of stuff pixels; ``S + i`` for pixels of kept
    instance i; ``S + M_kept`` (unknown) for thing pixels of no kept instance, pixels of dropped instances and
    crowd pixels; 255 for void.

    Args:
        sem_seg: ``[H, W]`` int64 semantic labels (stuff first, then things, 255 void).
        kept_masks: ``[M_kept, H, W]`` and dropped_masks ``[M_drop, H, W]``: instance masks (bool or uint8).
        crowd_mask: ``[H, W]`` bool.
    """
    height, width = sem_seg.shape[-2:]
    h, w = size
    device = sem_seg.device
    ys = torch.arange(h, device=device) * stride + stride // 2
    xs = torch.arange(w, device=device) * stride + stride // 2
    in_y, in_x = ys < height, xs < width
    ys, xs = ys.clamp(max=height - 1), xs.clamp(max=width - 1)

    def sample(t: Tensor) -> Tensor:
        return t[..., ys, :][..., xs]

    sem = sample(sem_seg).long()
    unknown = num_stuff + kept_masks.shape[0]
    target = torch.where(sem < num_stuff, sem, torch.full_like(sem, unknown))
    target = torch.where(sem == 255, torch.full_like(sem, 255), target)
    if kept_masks.shape[0]:
        kept = sample(kept_masks).bool()  # [M, h, w]
        first = kept.to(torch.uint8).argmax(dim=0)  # the first kept instance covering the cell
        target = torch.where(kept.any(dim=0), num_stuff + first, target)
    if dropped_masks.shape[0]:
        target = torch.where(sample(dropped_masks).bool().any(dim=0), torch.full_like(target, unknown), target)
    target = torch.where(sample(crowd_mask).bool(), torch.full_like(target, unknown), target)
    outside = ~(in_y.view(-1, 1) & in_x.view(1, -1))
    return torch.where(outside, torch.full_like(target, 255), target)


def choose_kept_instances(num_instances: int, keep_fraction: float, generator=None) -> Tuple[Tensor, Tensor]:
    """Random split of ``num_instances`` into kept (``round(keep_fraction * n)``) and dropped indices (CPU int64).

    Drawn on the host from the instance count alone, so choosing needs no device synchronisation.
    """
    order = torch.randperm(num_instances, generator=generator)
    num_kept = int(round(keep_fraction * num_instances))
    return order[:num_kept].sort().values, order[num_kept:].sort().values


class PanopticHead(nn.Module):
    """The panoptic head (no parameters): training loss, and the UPSNet merge at inference.

    Args:
        num_stuff: S; the semantic logits have S + K channels, stuff first.
        stride: scale of the semantic logits the training loss works on (4).
        keep_fraction: share of the non-crowd ground-truth instances kept in training (0.7).
        stuff_category_ids, thing_category_ids: the data set's category ids in contiguous order.
        score_threshold, nms_threshold, max_instances, overlap_threshold, stuff_area_limit, merge: see
            :func:`eyecool.modeling.panoptic_inference.panoptic_inference` (``merge``: the backend's, ``model.ops``).
    """

    def __init__(self, *, num_stuff: int, stuff_category_ids: Sequence[int], thing_category_ids: Sequence[int],
                 stride: int = 4, keep_fraction: float = 0.7, score_threshold: float = 0.6,
                 nms_threshold: float = 0.5, max_instances: int = 100, overlap_threshold: float = 0.3,
                 stuff_area_limit: int = 4096, merge: Callable[..., Tensor] = eyecool_ext.ops.upsnet_panoptic_merge):
        super().__init__()
        self.merge = merge
        self.num_stuff = num_stuff
        self.stuff_category_ids = list(stuff_category_ids)
        self.thing_category_ids = list(thing_category_ids)
        self.stride = stride
        self.keep_fraction = keep_fraction
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_instances = max_instances
        self.overlap_threshold = overlap_threshold
        self.stuff_area_limit = stuff_area_limit

    def sample_instances(self, targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """Per image, the (kept, dropped) ground-truth instance indices (CPU int64)."""
        return [choose_kept_instances(int(t["boxes"].shape[0]), self.keep_fraction) for t in targets]

    def loss(self, sem_logits: Tensor, targets: List[Dict[str, Tensor]], kept_dropped: List[Tuple[Tensor, Tensor]],
             kept_mask_logits: Tensor) -> Tensor:
        """Cross-entropy of the panoptic logit stack against the panoptic target, averaged over labelled cells.

        sem_logits ``[B, S + K, h, w]`` (1/4 scale of the padded batch); kept_mask_logits ``[sum M_kept, s, s]``,
        the class mask logits of the kept ground-truth instances of every image, in order.
        """
        h, w = sem_logits.shape[-2:]
        chunks = kept_mask_logits.split([int(k.numel()) for k, _ in kept_dropped])
        total = sem_logits.new_zeros((), dtype=torch.float32)
        count = sem_logits.new_zeros((), dtype=torch.float32)
        for logits, target, (kept, dropped), masks in zip(sem_logits, targets, kept_dropped, chunks):
            device = logits.device
            kept, dropped = kept.to(device), dropped.to(device)
            boxes = target["boxes"].to(device)[kept] / self.stride
            classes = target["classes"].to(device)[kept]
            gt_masks = target["masks"].to(device)
            stack = panoptic_logits(logits, boxes, classes, masks, self.num_stuff)
            goal = panoptic_training_target(target["sem_seg"].to(device), gt_masks[kept], gt_masks[dropped],
                                            target["crowd_mask"].to(device), self.num_stuff, (h, w), self.stride)
            total = total + F.cross_entropy(stack.unsqueeze(0), goal.unsqueeze(0), ignore_index=255, reduction="sum")
            count = count + (goal != 255).sum()
        return total / count.clamp(min=1)

    @torch.no_grad()
    def inference(self, sem_logits: Tensor, detections: Dict[str, Tensor], output_size: Tuple[int, int]):
        """One image: sem_logits ``[S + K, h, w]`` (any scale; resized bilinearly to ``output_size``), detections
        (``boxes`` in output pixels, ``scores``, ``classes``, ``mask_logits``) -> ``(panoptic_seg [H0, W0] int64,
        segments_info)`` at ``output_size = (H0, W0)``."""
        return panoptic_inference(sem_logits, detections["boxes"], detections["scores"], detections["classes"],
                                  detections["mask_logits"], self.num_stuff, self.stuff_category_ids,
                                  self.thing_category_ids, output_size=output_size,
                                  score_threshold=self.score_threshold, nms_threshold=self.nms_threshold,
                                  max_instances=self.max_instances, overlap_threshold=self.overlap_threshold,
                                  stuff_area_limit=self.stuff_area_limit, merge=self.merge)
