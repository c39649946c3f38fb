"""UPSNet panoptic inference for one image: from the semantic logits and the detections to a COCO panoptic
prediction (an id map and its ``segments_info``).

Where it sits: the last step of ``PanopticModel`` at inference, after the box and mask heads. The per-pixel merge
is the fused ``eyecool_ext.ops.upsnet_panoptic_merge`` kernel (the plain-PyTorch reference merge
under ``model.ops=torchvision``); the steps around it (which detections take part, which segments survive, the
conversion to dataset category ids) are here, following docs/design.md section 6:

1. detections with score > ``score_threshold`` (0.6), class-agnostic NMS (``nms_threshold`` 0.5), at most
   ``max_instances`` (100), highest score first;
2. masks (pasted mask logits > 0 inside their box) that are empty, or whose pixels are more than
   ``overlap_threshold`` (30%) covered by higher-scored kept masks of the same class, are dropped;
3. the per-pixel argmax of UPSNet's logit stack (stuff, instances, unknown);
4. stuff regions smaller than ``stuff_area_limit`` (4096) pixels and unknown pixels become void (id 0).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import Tensor

import eyecool_ext
from eyecool.modeling.boxes import paste_mask_logits


def _pixel_range(low: float, high: float, size: int) -> Tuple[int, int]:
    """Pixels ``[first, stop)`` that may have their centre in ``[low, high)``; checked exactly afterwards."""
    first = max(0, int(torch.floor(torch.tensor(low - 0.5)).item()))
    stop = min(size, int(torch.ceil(torch.tensor(high)).item()) + 1)
    return first, max(first, stop)


def instance_masks(boxes: Tensor, mask_logits: Tensor, height: int, width: int) -> List[Tuple[int, int, Tensor]]:
    """Binary masks of the instances (pasted mask logit > 0, i.e. probability > 0.5, inside the box).

    Uses the pasting convention of the merge (``eyecool.modeling.boxes.paste_mask_logits``), restricted to each
    box's pixels so that no ``[M, H, W]`` tensor is built.

    Args:
        boxes: ``Tensor[M, 4]`` (x1, y1, x2, y2) in pixels.
        mask_logits: ``Tensor[M, s, s]``.

    Returns:
        per instance ``(y0, x0, mask)``: the crop's top-left pixel and a ``Tensor[h_i, w_i]`` bool crop.
    """
    out = []
    for box, logits in zip(boxes.tolist(), mask_logits):
        x0, x_stop = _pixel_range(box[0], box[2], width)
        y0, y_stop = _pixel_range(box[1], box[3], height)
        crop_box = torch.tensor([box], dtype=mask_logits.dtype, device=mask_logits.device)
        crop_box[:, 0::2] -= x0
        crop_box[:, 1::2] -= y0
        # Shifting box and pixel centres by the same whole number of pixels leaves cx - x1 and x2 - x1 exact
        # (Sterbenz), so the crop gets bit for bit the full-image paste.
        pasted = paste_mask_logits(logits.unsqueeze(0), crop_box, y_stop - y0, x_stop - x0)  # 0 outside the box
        out.append((y0, x0, (pasted > 0)[0]))
    return out


def select_instances(boxes: Tensor, scores: Tensor, classes: Tensor, mask_logits: Tensor, height: int, width: int,
                     score_threshold: float = 0.6, nms_threshold: float = 0.5, max_instances: int = 100,
                     overlap_threshold: float = 0.3) -> Tensor:
    """Indices (into the detections, highest score first) of the instances that take part in the merge.

    Score threshold, class-agnostic NMS, at most ``max_instances``, then the removal of empty masks and of masks
    more than ``overlap_threshold`` covered by higher-scored kept masks of the same class.
    """
    candidates = torch.nonzero(scores > score_threshold).flatten()
    if candidates.numel() == 0:
        return candidates
    order = torchvision.ops.nms(boxes[candidates].float(), scores[candidates].float(), nms_threshold)
    candidates = candidates[order[:max_instances]]
    masks = instance_masks(boxes[candidates], mask_logits[candidates], height, width)
    covered: Dict[int, Tensor] = {}  # class -> union of the kept masks of that class, [H, W] bool
    kept = []
    for index, cls, (y0, x0, mask) in zip(candidates.tolist(), classes[candidates].tolist(), masks):
        area = int(mask.sum())
        if area == 0:
            continue
        union = covered.setdefault(cls, torch.zeros((height, width), dtype=torch.bool, device=mask.device))
        window = union[y0:y0 + mask.size(0), x0:x0 + mask.size(1)]
        if int((window & mask).sum()) > overlap_threshold * area:
            continue
        window |= mask
        kept.append(index)
    return torch.tensor(kept, dtype=torch.long, device=scores.device)


def labels_to_panoptic(labels: Tensor, num_stuff: int, instance_classes: Tensor, instance_scores: Tensor,
                       stuff_category_ids: Sequence[int], thing_category_ids: Sequence[int],
                       stuff_area_limit: int = 4096) -> Tuple[Tensor, List[dict]]:
    """Merge labels (``0..S-1`` stuff, ``S + i`` instance i, ``S + M`` unknown) -> COCO panoptic prediction.

    Stuff regions smaller than ``stuff_area_limit`` pixels, empty instances and unknown pixels become void (0).
    Segment ids are 1, 2, ... (instances in their order, then stuff classes in theirs).

    Returns:
        ``(panoptic_seg, segments_info)``: ``Tensor[H, W]`` int64 segment ids and a list of dicts with ``id``,
        ``category_id`` (the dataset's id), ``isthing``, ``area`` and, for things, ``score``.
    """
    num_instances = int(instance_classes.numel())
    areas = torch.bincount(labels.flatten(), minlength=num_stuff + num_instances + 1).tolist()
    segment_of_label = [0] * (num_stuff + num_instances + 1)
    segments_info: List[dict] = []
    classes = instance_classes.tolist()
    scores = instance_scores.tolist()
    for i in range(num_instances):
        area = areas[num_stuff + i]
        if area == 0:
            continue
        segment_of_label[num_stuff + i] = len(segments_info) + 1
        segments_info.append({"id": len(segments_info) + 1, "category_id": int(thing_category_ids[classes[i]]),
                              "isthing": True, "score": float(scores[i]), "area": int(area)})
    for s in range(num_stuff):
        if areas[s] == 0 or areas[s] < stuff_area_limit:
            continue
        segment_of_label[s] = len(segments_info) + 1
        segments_info.append({"id": len(segments_info) + 1, "category_id": int(stuff_category_ids[s]),
                              "isthing": False, "area": int(areas[s])})
    lookup = torch.tensor(segment_of_label, dtype=torch.int64, device=labels.device)
    return lookup[labels], segments_info


def panoptic_inference(sem_logits: Tensor, boxes: Tensor, scores: Tensor, classes: Tensor, mask_logits: Tensor,
                       num_stuff: int, stuff_category_ids: Sequence[int], thing_category_ids: Sequence[int],
                       output_size: Optional[Tuple[int, int]] = None, score_threshold: float = 0.6,
                       nms_threshold: float = 0.5, max_instances: int = 100, overlap_threshold: float = 0.3,
                       stuff_area_limit: int = 4096,
                       merge: Callable[..., Tensor] = eyecool_ext.ops.upsnet_panoptic_merge
                       ) -> Tuple[Tensor, List[dict]]:
    """UPSNet panoptic inference for one image (docs/design.md section 6).

    Args:
        sem_logits: ``Tensor[S + K, h, w]`` semantic logits, stuff first; at the output size, or at any scale
            (e.g. 1/4) when ``output_size`` is given, in which case they are upsampled bilinearly inside the merge
            kernel (the full-resolution logits are never stored).
        boxes: ``Tensor[D, 4]`` detections (x1, y1, x2, y2) in output pixels.
        scores: ``Tensor[D]`` detection scores.
        classes: ``Tensor[D]`` integer thing index 0..K-1 of each detection.
        mask_logits: ``Tensor[D, s, s]`` mask logits of each detection's class (before sigmoid).
        num_stuff: S.
        stuff_category_ids: the dataset's category id of each of the S stuff channels.
        thing_category_ids: the dataset's category id of each of the K thing channels.
        output_size: ``(H, W)`` of the prediction; default the size of ``sem_logits``.
        score_threshold, nms_threshold, max_instances, overlap_threshold, stuff_area_limit: see the module doc.
        merge: the per-pixel merge, with the signature of ``eyecool_ext.ops.upsnet_panoptic_merge`` (that kernel by
            default; ``model.ops=torchvision`` passes the plain-PyTorch reference merge).

    Returns:
        ``(panoptic_seg, segments_info)``: ``Tensor[H, W]`` int64 segment ids (0 void) and one dict per segment
        (``id``, ``category_id``, ``isthing``, ``area``, ``score`` for things).
    """
    if sem_logits.dim() != 3:
        raise ValueError(f"sem_logits must be a Tensor[S + K, h, w], got {tuple(sem_logits.shape)}")
    num_things = sem_logits.size(0) - num_stuff
    if len(stuff_category_ids) != num_stuff or len(thing_category_ids) != num_things:
        raise ValueError(f"stuff_category_ids and thing_category_ids must have {num_stuff} and {num_things} "
                         f"entries, got {len(stuff_category_ids)} and {len(thing_category_ids)}")
    if not (boxes.dim() == 2 and boxes.size(1) == 4 and scores.shape == (boxes.size(0),)
            and classes.shape == (boxes.size(0),) and mask_logits.dim() == 3 and mask_logits.size(0) == boxes.size(0)):
        raise ValueError(f"detections must be boxes [D, 4], scores [D], classes [D], mask_logits [D, s, s], got "
                         f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(classes.shape)}, "
                         f"{tuple(mask_logits.shape)}")
    height, width = (int(v) for v in (output_size if output_size is not None else sem_logits.shape[-2:]))
    kept = select_instances(boxes, scores, classes, mask_logits, height, width, score_threshold, nms_threshold,
                            max_instances, overlap_threshold)
    kept_boxes = boxes[kept].to(sem_logits.dtype)
    kept_classes = classes[kept].long()
    labels = merge(sem_logits, num_stuff, kept_boxes, kept_classes, mask_logits[kept].to(sem_logits.dtype),
                   (height, width))
    return labels_to_panoptic(labels, num_stuff, kept_classes, scores[kept], stuff_category_ids, thing_category_ids,
                              stuff_area_limit)
