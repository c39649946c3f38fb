"""Mask R-CNN's second stage: box head (classification + class-specific regression) and mask head.

Both pool from the instance branch's pyramid P2..P5 with the multilevel ROIAlign op; with DAM the mask head
pools from the balanced levels plus the semantic features (DAM part 2), the box head from the balanced levels
alone. Sampling and losses run without host synchronisation: every image contributes a fixed number of ROI
slots, with validity masks instead of data-dependent indexing. Only NMS at inference synchronises.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from eyecool.modeling.boxes import box_iou, clip_boxes, decode_boxes, encode_boxes, match_boxes, sample_balanced
from eyecool.modeling.operators import OpBackend, pool_rois


class BoxHead(nn.Module):
    """``[R, C, s, s]`` pooled features -> ``num_fc`` FC layers + ReLU -> class logits ``[R, K + 1]`` (background
    last) and class-specific box deltas ``[R, 4K]``."""

    def __init__(self, *, in_channels: int, pooler_size: int, fc_dim: int, num_fc: int, num_classes: int):
        super().__init__()
        dims = [in_channels * pooler_size * pooler_size] + [fc_dim] * num_fc
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.class_logits = nn.Linear(dims[-1], num_classes + 1)
        self.box_deltas = nn.Linear(dims[-1], 4 * num_classes)
        for fc in self.fcs:
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.class_logits.weight, std=0.01)
        nn.init.normal_(self.box_deltas.weight, std=0.001)
        nn.init.zeros_(self.class_logits.bias)
        nn.init.zeros_(self.box_deltas.bias)

    def forward(self, pooled: Tensor) -> Tuple[Tensor, Tensor]:
        x = pooled.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.class_logits(x), self.box_deltas(x)


class MaskHead(nn.Module):
    """``[R, C, s, s]`` -> ``num_conv`` x (3x3 conv + ReLU) -> 2x2 deconv stride 2 + ReLU -> 1x1 to K mask logits
    ``[R, K, 2s, 2s]``."""

    def __init__(self, *, in_channels: int, conv_dim: int, num_conv: int, num_classes: int):
        super().__init__()
        dims = [in_channels] + [conv_dim] * num_conv
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(dims[:-1], dims[1:]))
        self.deconv = nn.ConvTranspose2d(dims[-1], conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        for layer in list(self.convs) + [self.deconv]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        x = pooled
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.predictor(F.relu(self.deconv(x)))


def _with_batch_index(boxes: List[Tensor]) -> Tensor:
    """One ``[L_i, 4]`` per image -> ``[sum L_i, 5]`` rows (image index, x1, y1, x2, y2)."""
    rows = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(rows) if rows else torch.zeros((0, 5))


class ROIHeads(nn.Module):
    """Proposal sampling, box and mask heads, their losses, and detection at inference.

    Args:
        num_classes: K thing classes (the box head adds background at index K).
        scales: ``1 / stride`` of the pooled levels, P2..P5: ``(1/4, 1/8, 1/16, 1/32)``.
        backend: the op backend (:func:`eyecool.modeling.operators.op_backend`).
    """

    def __init__(self, *, in_channels: int, num_classes: int, scales: Sequence[float], backend: OpBackend,
                 box_pooler_size: int = 7, box_fc_dim: int = 1024, box_num_fc: int = 2,
                 box_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), mask_pooler_size: int = 14,
                 mask_conv_dim: int = 256, mask_num_conv: int = 4, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, positive_iou: float = 0.5, score_threshold: float = 0.05,
                 nms_threshold: float = 0.5, detections_per_image: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.scales = list(scales)
        self.backend = backend
        self.box_pooler_size = box_pooler_size
        self.mask_pooler_size = mask_pooler_size
        self.box_reg_weights = tuple(box_reg_weights)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.positive_iou = positive_iou
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.box_head = BoxHead(in_channels=in_channels, pooler_size=box_pooler_size, fc_dim=box_fc_dim,
                                num_fc=box_num_fc, num_classes=num_classes)
        self.mask_head = MaskHead(in_channels=in_channels, conv_dim=mask_conv_dim, num_conv=mask_num_conv,
                                  num_classes=num_classes)

    @property
    def mask_size(self) -> int:
        return 2 * self.mask_pooler_size

    def mask_logits(self, mask_features: List[Tensor], rois: Tensor, classes: Tensor) -> Tensor:
        """Mask logits of the given class for each ROI: rois ``[R, 5]``, classes ``[R]`` -> ``[R, 28, 28]``."""
        pooled = pool_rois(self.backend, mask_features, rois, self.mask_pooler_size, self.scales)
        logits = self.mask_head(pooled)
        index = classes.clamp(0, self.num_classes - 1).view(-1, 1, 1, 1).expand(-1, 1, *logits.shape[-2:])
        return logits.gather(1, index).squeeze(1)

    # ---------------------------------------------------------------------------------------------- training

    def forward_train(self, box_features: List[Tensor], mask_features: List[Tensor], proposals: List[Tensor],
                      targets: List[Dict[str, Tensor]],
                      extra_mask_boxes: Optional[List[Tuple[Tensor, Tensor]]] = None
                      ) -> Tuple[Dict[str, Tensor], Optional[Tensor]]:
        """Sample ROIs, compute the box and mask losses.

        Args:
            box_features, mask_features: ``[P2..P5]``, ``[B, C, H_l, W_l]``.
            proposals: one ``[N_i, 4]`` per image (detached); the ground-truth boxes are added to them.
            targets: per image ``boxes [M_i, 4]``, ``classes [M_i]`` (0..K-1), ``masks [M_i, H, W]``.
            extra_mask_boxes: optional per image ``(boxes [L_i, 4], classes [L_i])`` whose class mask logits are
                also computed, in the same mask head call (the panoptic head's ground-truth instances).

        Returns ``({loss_cls, loss_box_reg, loss_mask}, extra mask logits [sum L_i, 28, 28] or None)``.
        """
        k = self.num_classes
        rois, cls_targets, reg_targets, positives, valids = [], [], [], [], []
        mask_rois, mask_classes, mask_targets, mask_positive = [], [], [], []
        num_pos_slots = int(self.batch_size_per_image * self.positive_fraction)
        for i, (props, target) in enumerate(zip(proposals, targets)):
            gt_boxes = target["boxes"].to(props)
            gt_classes = target["classes"].to(props.device)
            candidates = torch.cat([props, gt_boxes])
            matched, label = match_boxes(box_iou(gt_boxes, candidates), self.positive_iou, self.positive_iou,
                                         allow_low_quality=False)
            index, is_positive, valid = sample_balanced(label, self.batch_size_per_image, self.positive_fraction)
            boxes = candidates[index]
            has_gt = gt_boxes.shape[0] > 0
            gt_index = matched[index]
            matched_classes = gt_classes[gt_index] if has_gt else torch.zeros_like(gt_index)
            matched_boxes = gt_boxes[gt_index] if has_gt else boxes
            rois.append(torch.cat([torch.full_like(boxes[:, :1], i), boxes], dim=1))
            cls_targets.append(torch.where(is_positive, matched_classes, torch.full_like(matched_classes, k)))
            # Only positives use their targets; a degenerate box elsewhere must not put a NaN into the backward.
            reg_targets.append(torch.nan_to_num(encode_boxes(boxes, matched_boxes, self.box_reg_weights),
                                                nan=0.0, posinf=0.0, neginf=0.0))
            positives.append(is_positive)
            valids.append(valid)
            # Positives come first among the sampled slots: the mask head sees the first num_pos_slots.
            p = min(num_pos_slots, boxes.shape[0])
            mask_rois.append(rois[-1][:p])
            mask_classes.append(matched_classes[:p])
            mask_positive.append(is_positive[:p])
            mask_targets.append(self._mask_targets(target["masks"], boxes[:p], gt_index[:p], has_gt))
        rois_t, positive, valid = torch.cat(rois), torch.cat(positives), torch.cat(valids)
        class_logits, box_deltas = self.box_head(pool_rois(self.backend, box_features, rois_t, self.box_pooler_size,
                                                           self.scales))
        cls_target = torch.cat(cls_targets)
        num_valid = valid.sum().clamp(min=1).float()
        ce = F.cross_entropy(class_logits.float(), cls_target, reduction="none")
        loss_cls = torch.where(valid, ce, torch.zeros_like(ce)).sum() / num_valid
        deltas = box_deltas.float().view(-1, k, 4).gather(
            1, cls_target.clamp(max=k - 1).view(-1, 1, 1).expand(-1, 1, 4)).squeeze(1)
        l1 = (deltas - torch.cat(reg_targets)).abs().sum(dim=1)
        loss_box_reg = torch.where(positive, l1, torch.zeros_like(l1)).sum() / num_valid

        mask_rois_t = torch.cat(mask_rois)
        mask_classes_t = torch.cat(mask_classes)
        num_mask_rois = mask_rois_t.shape[0]
        if extra_mask_boxes is not None:
            extra_rois = _with_batch_index([b.to(mask_rois_t) for b, _ in extra_mask_boxes])
            mask_rois_t = torch.cat([mask_rois_t, extra_rois.to(mask_rois_t)])
            mask_classes_t = torch.cat([mask_classes_t] + [c.to(mask_classes_t.device) for _, c in extra_mask_boxes])
        logits = self.mask_logits(mask_features, mask_rois_t, mask_classes_t)
        roi_logits = logits[:num_mask_rois].float()
        bce = F.binary_cross_entropy_with_logits(roi_logits, torch.cat(mask_targets), reduction="none").mean(dim=(1, 2))
        mask_positive_t = torch.cat(mask_positive)
        loss_mask = (torch.where(mask_positive_t, bce, torch.zeros_like(bce)).sum()
                     / mask_positive_t.sum().clamp(min=1).float())
        losses = {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}
        return losses, (logits[num_mask_rois:] if extra_mask_boxes is not None else None)

    def _mask_targets(self, gt_masks: Tensor, boxes: Tensor, gt_index: Tensor, has_gt: bool) -> Tensor:
        """Binary ``[P, 28, 28]`` targets: each box's matched ground-truth mask, ROIAligned and thresholded."""
        size = self.mask_size
        if not has_gt or boxes.shape[0] == 0:
            return boxes.new_zeros((boxes.shape[0], size, size))
        rois = torch.cat([gt_index.to(boxes).view(-1, 1), boxes], dim=1)
        masks = gt_masks.to(device=boxes.device, dtype=torch.float32).unsqueeze(1)
        with torch.autocast(boxes.device.type, enabled=False):
            pooled = self.backend.roi_align(masks, rois.float(), (size, size), 1.0, 0, True)
        return (pooled.squeeze(1) >= 0.5).to(torch.float32)

    # --------------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def forward_test(self, box_features: List[Tensor], mask_features: List[Tensor], proposals: List[Tensor],
                     image_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """Detections per image: ``boxes [D, 4]``, ``scores [D]``, ``classes [D]`` (0..K-1) and ``mask_logits
        [D, 28, 28]`` (the predicted class's channel, before sigmoid), in input-image pixels."""
        k = self.num_classes
        rois = _with_batch_index(proposals).to(box_features[0].device, torch.float32)
        class_logits, box_deltas = self.box_head(pool_rois(self.backend, box_features, rois, self.box_pooler_size,
                                                           self.scales))
        probs = torch.softmax(class_logits.float(), dim=1)[:, :k]
        boxes = decode_boxes(box_deltas.float().view(-1, k, 4), rois[:, None, 1:].expand(-1, k, 4),
                             self.box_reg_weights)
        sizes = image_sizes.to(boxes)[rois[:, 0].long()]
        boxes = clip_boxes(boxes, sizes[:, 0:1], sizes[:, 1:2])
        results = []
        start = 0
        for props in proposals:
            end = start + props.shape[0]
            scores_i = probs[start:end].reshape(-1)
            boxes_i = boxes[start:end].reshape(-1, 4)
            classes_i = torch.arange(k, device=probs.device).repeat(end - start)
            start = end
            keep = ((scores_i > self.score_threshold) & (boxes_i[:, 2] > boxes_i[:, 0])
                    & (boxes_i[:, 3] > boxes_i[:, 1]))
            boxes_i, scores_i, classes_i = boxes_i[keep], scores_i[keep], classes_i[keep]
            kept = batched_nms(boxes_i, scores_i, classes_i, self.nms_threshold)[: self.detections_per_image]
            results.append({"boxes": boxes_i[kept], "scores": scores_i[kept], "classes": classes_i[kept]})
        det_rois = _with_batch_index([r["boxes"] for r in results]).to(rois)
        det_classes = torch.cat([r["classes"] for r in results])
        logits = (self.mask_logits(mask_features, det_rois, det_classes).float() if det_rois.shape[0]
                  else det_rois.new_zeros((0, self.mask_size, self.mask_size)))
        for r, chunk in zip(results, logits.split([r["boxes"].shape[0] for r in results])):
            r["mask_logits"] = chunk
        return results
