"""Region proposal network over P2..P6, with the optional RFF gating of its objectness (Eyecool).

One shared head (3x3 conv + ReLU, objectness and box deltas) runs on every level; one anchor size per level
and three aspect ratios. With RFF the fused objectness (``fg_fusion`` of the semantic logits and the RPN
logits) replaces the plain one for both the loss and the ranking of proposals.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from eyecool.modeling.boxes import box_iou, clip_boxes, decode_boxes, encode_boxes, match_boxes, sample_balanced

_RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


class AnchorGenerator(nn.Module):
    """One anchor size per level, several aspect ratios; anchors ``[H_l * W_l * A, 4]`` in (y, x, a) order."""

    def __init__(self, *, sizes: Sequence[float], aspect_ratios: Sequence[float], strides: Sequence[int]):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"need one anchor size per level: {len(sizes)} sizes for {len(strides)} levels")
        self.strides = list(strides)
        cells = []
        for size in sizes:
            area = float(size) ** 2
            rows = []
            for ratio in aspect_ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                rows.append([-w / 2, -h / 2, w / 2, h / 2])
            cells.append(torch.tensor(rows, dtype=torch.float32))
        self.num_anchors = len(aspect_ratios)
        self._cells = cells
        self._cache: Dict[Tuple, List[Tensor]] = {}

    def forward(self, feature_sizes: Sequence[Tuple[int, int]], device: torch.device) -> List[Tensor]:
        """Sizes ``(H_l, W_l)`` of each level -> anchors per level, ``[H_l * W_l * A, 4]`` float32."""
        key = (tuple(feature_sizes), str(device))
        if key not in self._cache:
            anchors = []
            for (h, w), stride, cell in zip(feature_sizes, self.strides, self._cells):
                ys = torch.arange(h, dtype=torch.float32, device=device) * stride
                xs = torch.arange(w, dtype=torch.float32, device=device) * stride
                y, x = torch.meshgrid(ys, xs, indexing="ij")
                shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
                anchors.append((shifts + cell.to(device).view(1, -1, 4)).reshape(-1, 4))
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[key] = anchors
        return self._cache[key]


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 objectness (A) and box deltas (4A), shared over levels."""

    def __init__(self, *, in_channels: int, conv_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, conv_channels, 3, padding=1)
        self.objectness = nn.Conv2d(conv_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(conv_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """``[B, C, H_l, W_l]`` per level -> objectness ``[B, A, H_l, W_l]`` and deltas ``[B, 4A, H_l, W_l]``."""
        objectness, deltas = [], []
        for f in features:
            t = F.relu(self.conv(f))
            objectness.append(self.objectness(t))
            deltas.append(self.deltas(t))
        return objectness, deltas


def _flatten_level(t: Tensor, channels_per_anchor: int) -> Tensor:
    """``[B, A * c, H, W] -> [B, H * W * A, c]`` matching the anchors' (y, x, a) order."""
    b, _, h, w = t.shape
    return t.view(b, -1, channels_per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, channels_per_anchor)


class RPN(nn.Module):
    """Anchors, head, RFF, training losses and proposals.

    RFF: with ``fusion_mode`` ``logit`` or ``prob``, ``fg_fusion(sem_logits, [objectness_l], num_stuff,
    fusion_mode)`` (the signature of :func:`eyecool_ext.ops.fg_fusion`) gives the scores that replace the plain
    objectness logits; with ``prob`` they are probabilities (binary cross-entropy on probabilities). ``off``: the
    plain RPN.
    """

    def __init__(self, *, in_channels: int, conv_channels: int, anchor_sizes: Sequence[float],
                 aspect_ratios: Sequence[float], strides: Sequence[int], positive_iou: float = 0.7,
                 negative_iou: float = 0.3, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_topk: Tuple[int, int] = (2000, 1000), post_nms_topk: Tuple[int, int] = (1000, 1000),
                 nms_threshold: float = 0.7, fusion_mode: str = "off",
                 fg_fusion: Optional[Callable[..., List[Tensor]]] = None, num_stuff: int = 0):
        super().__init__()
        if fusion_mode not in ("off", "logit", "prob"):
            raise ValueError(f"fusion_mode must be off, logit or prob, got {fusion_mode!r}")
        if fusion_mode != "off" and fg_fusion is None:
            raise ValueError(f"fusion_mode={fusion_mode!r} needs the fg_fusion op")
        self.anchor_generator = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=aspect_ratios, strides=strides)
        self.head = RPNHead(in_channels=in_channels, conv_channels=conv_channels,
                            num_anchors=self.anchor_generator.num_anchors)
        self.positive_iou = positive_iou
        self.negative_iou = negative_iou
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_threshold = nms_threshold
        self.fusion_mode = fusion_mode
        self.fg_fusion = fg_fusion if fusion_mode != "off" else None
        self.num_stuff = num_stuff

    def forward(self, features: List[Tensor], image_sizes: Tensor, gt_boxes: Optional[List[Tensor]] = None,
                sem_logits: Optional[Tensor] = None) -> Dict[str, object]:
        """Run the RPN.

        Args:
            features: ``[P2..P6]``, ``[B, C, H_l, W_l]``.
            image_sizes: ``[B, 2]`` (H, W) of the unpadded images, in input pixels.
            gt_boxes: training only, one ``[M_i, 4]`` xyxy per image.
            sem_logits: ``[B, S + K, H/4, W/4]``, required with RFF (detach it before if fg is detached).

        Returns a dict: ``proposals`` (list of ``[N_i, 4]``, detached), ``objectness`` (plain logits per level,
        ``[B, A, H_l, W_l]``), ``scores`` (what the loss and ranking use: the RFF output, or the plain logits)
        and, in training, ``losses`` (``loss_rpn_cls``, ``loss_rpn_loc``, unweighted).
        """
        objectness, deltas = self.head(features)
        if self.fg_fusion is not None:
            if sem_logits is None:
                raise ValueError("RFF is on: the RPN needs sem_logits")
            with torch.autocast(sem_logits.device.type, enabled=False):
                scores = self.fg_fusion(sem_logits.float(), [o.float() for o in objectness], self.num_stuff,
                                        self.fusion_mode)
        else:
            scores = objectness
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in features], features[0].device)
        flat_scores = [_flatten_level(s, 1).squeeze(-1) for s in scores]  # [B, N_l]
        flat_deltas = [_flatten_level(d, 4) for d in deltas]  # [B, N_l, 4]
        out: Dict[str, object] = {"objectness": objectness, "scores": scores}
        with torch.no_grad():
            out["proposals"] = self._proposals(anchors, [s.detach() for s in flat_scores],
                                               [d.detach() for d in flat_deltas], image_sizes)
        if self.training:
            if gt_boxes is None:
                raise ValueError("training the RPN needs gt_boxes")
            out["losses"] = self._losses(torch.cat(anchors), torch.cat(flat_scores, 1), torch.cat(flat_deltas, 1),
                                         gt_boxes)
        return out

    def _proposals(self, anchors: List[Tensor], scores: List[Tensor], deltas: List[Tensor],
                   image_sizes: Tensor) -> List[Tensor]:
        """Per level top-k by score, decode, clip, then per image NMS over all levels and keep the best."""
        pre_nms_topk = self.pre_nms_topk[0 if self.training else 1]
        post_nms_topk = self.post_nms_topk[0 if self.training else 1]
        batch = scores[0].shape[0]
        level_boxes, level_scores, level_ids = [], [], []
        for level, (a, s, d) in enumerate(zip(anchors, scores, deltas)):
            k = min(pre_nms_topk, s.shape[1])
            top_scores, top_index = s.float().topk(k, dim=1)  # [B, k]
            top_deltas = d.gather(1, top_index.unsqueeze(-1).expand(-1, -1, 4))
            boxes = decode_boxes(top_deltas, a[top_index], _RPN_BOX_WEIGHTS)  # [B, k, 4]
            level_boxes.append(boxes)
            level_scores.append(top_scores)
            level_ids.append(torch.full((k,), level, dtype=torch.long, device=s.device))
        boxes = torch.cat(level_boxes, 1)
        scores_all = torch.cat(level_scores, 1)
        ids = torch.cat(level_ids)
        sizes = image_sizes.to(boxes)
        boxes = clip_boxes(boxes, sizes[:, 0].view(-1, 1), sizes[:, 1].view(-1, 1))
        proposals = []
        for i in range(batch):
            # The only host synchronisation of the RPN: NMS has a data-dependent output size.
            keep = ((boxes[i, :, 2] > boxes[i, :, 0]) & (boxes[i, :, 3] > boxes[i, :, 1])
                    & torch.isfinite(scores_all[i]))
            b, s, lvl = boxes[i][keep], scores_all[i][keep], ids[keep]
            kept = batched_nms(b, s, lvl, self.nms_threshold)[:post_nms_topk]
            proposals.append(b[kept])
        return proposals

    def _losses(self, anchors: Tensor, scores: Tensor, deltas: Tensor, gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """Objectness and box losses on ``batch_size_per_image`` sampled anchors per image (no host sync).

        anchors ``[N, 4]``, scores ``[B, N]``, deltas ``[B, N, 4]``. Both losses are sums normalised by
        ``batch_size_per_image * B`` (detectron2's convention); the box loss is L1 on the positives.
        """
        batch = scores.shape[0]
        cls_terms, loc_terms = [], []
        for i in range(batch):
            gt = gt_boxes[i].to(anchors)
            matched, label = match_boxes(box_iou(gt, anchors), self.positive_iou, self.negative_iou,
                                         allow_low_quality=True)
            index, is_positive, valid = sample_balanced(label, self.batch_size_per_image, self.positive_fraction)
            target = is_positive.to(torch.float32)
            score = scores[i, index].float()
            if self.fusion_mode == "prob":
                eps = 1e-6
                per_anchor = F.binary_cross_entropy(score.clamp(eps, 1 - eps), target, reduction="none")
            else:
                per_anchor = F.binary_cross_entropy_with_logits(score, target, reduction="none")
            cls_terms.append((per_anchor * valid).sum())
            if gt.shape[0] > 0:
                target_deltas = torch.nan_to_num(encode_boxes(anchors[index], gt[matched[index]], _RPN_BOX_WEIGHTS),
                                                 nan=0.0, posinf=0.0, neginf=0.0)
            else:
                target_deltas = torch.zeros_like(anchors[index])
            l1 = (deltas[i, index].float() - target_deltas).abs().sum(dim=1)
            loc_terms.append(torch.where(is_positive, l1, torch.zeros_like(l1)).sum())
        normaliser = float(self.batch_size_per_image * batch)
        return {"loss_rpn_cls": torch.stack(cls_terms).sum() / normaliser,
                "loss_rpn_loc": torch.stack(loc_terms).sum() / normaliser}
