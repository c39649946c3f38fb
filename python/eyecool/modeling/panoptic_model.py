"""The Eyecool panoptic network: ResNet-FPN, UPSNet's semantic branch, Mask R-CNN, UPSNet's panoptic head, and
the two fusion modules of Eyecool: RFF (the semantic foreground gates the RPN objectness) and DAM (balanced
pyramid with a non-local block for the instance branch, and semantic features added to the mask head's input).

Data flow (``B`` images padded to ``Hp x Wp``, multiples of 32)::

    images -> backbone (C2..C5) -> FPN (P2..P6) -+-> semantic head (P2..P5) -> sem_logits, sem_feat (1/4 scale)
                                                 +-> [DAM: balanced pyramid] -> RPN (+ RFF with sem_logits)
                                                       -> proposals -> box head
                                                       -> mask head (pools from [+ DAM: sem_feat])
    sem_logits + boxes + mask logits -> panoptic head (loss at 1/4 scale; UPSNet merge at inference)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eyecool.modeling.backbone import ResNetBackbone
from eyecool.modeling.balanced_pyramid import BalancedPyramid
from eyecool.modeling.fpn import FPN
from eyecool.modeling.boxes import paste_mask_logits
from eyecool.modeling.panoptic_head import PanopticHead
from eyecool.modeling.roi_heads import ROIHeads
from eyecool.modeling.rpn import RPN
from eyecool.modeling.semantic_head import SemanticHead, semantic_loss

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask", "loss_sem", "loss_panoptic")
SizeLike = Union[Sequence[Tuple[int, int]], Tensor]


class SemanticToMask(nn.Module):
    """DAM part 2: ``sem_feat [B, C_sem, H/4, W/4]`` -> 1x1 conv (zero-initialised, so training starts at the
    baseline) -> resized to each level (average pooling) -> added to the levels the mask head pools from."""

    def __init__(self, *, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, sem_feat: Tensor, levels: List[Tensor]) -> List[Tensor]:
        projected = self.proj(sem_feat)
        return [level + F.adaptive_avg_pool2d(projected, level.shape[-2:]) for level in levels]


class PanopticModel(nn.Module):
    """The whole network. Built from its parts by :func:`eyecool.modeling.build_model`.

    Args:
        balanced_pyramid, semantic_to_mask: the two parts of DAM, or both None (DAM off).
        detach_fg: RFF reads detached semantic logits (no RPN gradient into the semantic branch).
        loss_weights: multiplier per loss name (``rpn_cls``, ``rpn_loc``, ``cls``, ``box_reg``, ``mask``, ``sem``,
            ``panoptic``); the returned losses are weighted.
        size_divisibility: the padded input size is made a multiple of it (the data pipeline already pads to 32).

    Images come normalised by the data pipeline (``eyecool.data.transforms.Normalize``: torchvision's
    ``(x / 255 - mean) / std``, the convention of its ImageNet weights) and zero-padded.
    """

    def __init__(self, *, backbone: ResNetBackbone, fpn: FPN, semantic_head: SemanticHead, rpn: RPN,
                 roi_heads: ROIHeads, panoptic_head: PanopticHead, balanced_pyramid: Optional[BalancedPyramid],
                 semantic_to_mask: Optional[SemanticToMask], num_stuff: int, num_things: int,
                 loss_weights: Dict[str, float], detach_fg: bool = True, size_divisibility: int = 32):
        super().__init__()
        if (balanced_pyramid is None) != (semantic_to_mask is None):
            raise ValueError("DAM is both the balanced pyramid and the semantic-to-mask path: pass both or neither")
        self.backbone = backbone
        self.fpn = fpn
        self.semantic_head = semantic_head
        self.balanced_pyramid = balanced_pyramid
        self.semantic_to_mask = semantic_to_mask
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.panoptic_head = panoptic_head
        self.num_stuff = num_stuff
        self.num_things = num_things
        self.loss_weights = dict(loss_weights)
        self.detach_fg = detach_fg
        self.size_divisibility = size_divisibility

    # ------------------------------------------------------------------------------------------------ inputs

    def pad(self, images: Tensor) -> Tensor:
        """Zero-pad ``[B, 3, H, W]`` on the bottom and right to multiples of the size divisibility."""
        if not images.is_floating_point():
            raise ValueError(f"images must be normalised floating point tensors (the data pipeline's output), got "
                             f"{images.dtype}")
        div = self.size_divisibility
        pad_h, pad_w = (-images.shape[-2]) % div, (-images.shape[-1]) % div
        return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images

    @staticmethod
    def _sizes_tensor(image_sizes: SizeLike, device: torch.device) -> Tensor:
        if isinstance(image_sizes, Tensor):
            return image_sizes.to(device=device, dtype=torch.long).view(-1, 2)
        return torch.tensor([[int(h), int(w)] for h, w in image_sizes], dtype=torch.long, device=device).view(-1, 2)

    # ----------------------------------------------------------------------------------------------- network

    def branch_features(self, x: Tensor) -> Tuple[List[Tensor], Tensor, Tensor, List[Tensor], List[Tensor]]:
        """The two branches' features of a padded batch ``x`` ``[B, 3, Hp, Wp]``: (pyramid [P2..P6], sem_logits
        ``[B, S + K, Hp/4, Wp/4]``, sem_feat, instance_features (balanced with DAM, [P2..P6]), mask_features
        ([P2..P5], with the semantic-to-mask path under DAM)). Shared by the model and its export wrapper."""
        pyramid = self.fpn(self.backbone(x))
        sem_logits, sem_feat = self.semantic_head(pyramid[:4])
        if self.balanced_pyramid is not None:
            balanced = self.balanced_pyramid(pyramid[:4])
            instance_features = balanced + [F.max_pool2d(balanced[-1], kernel_size=1, stride=2)]
            mask_features = self.semantic_to_mask(sem_feat, balanced)
        else:
            instance_features = pyramid
            mask_features = pyramid[:4]
        return pyramid, sem_logits, sem_feat, instance_features, mask_features

    def forward_features(self, images: Tensor, image_sizes: SizeLike,
                         gt_boxes: Optional[List[Tensor]] = None) -> Dict[str, object]:
        """Everything up to the proposals, exposed for tests and analysis.

        Returns a dict: ``fpn`` ([P2..P6]), ``sem_logits`` ``[B, S + K, Hp/4, Wp/4]``, ``sem_feat``,
        ``instance_features`` (the levels the RPN and box head read: balanced with DAM, [P2..P6]),
        ``mask_features`` ([P2..P5] the mask head pools from), ``rpn`` (see :meth:`RPN.forward`),
        ``image_sizes`` ``[B, 2]`` and ``padded_size`` (Hp, Wp).
        """
        sizes = self._sizes_tensor(image_sizes, images.device)
        x = self.pad(images)
        pyramid, sem_logits, sem_feat, instance_features, mask_features = self.branch_features(x)
        rff_input = sem_logits.detach() if self.detach_fg else sem_logits
        rpn = self.rpn(instance_features, sizes, gt_boxes, rff_input if self.rpn.fg_fusion is not None else None)
        return {"fpn": pyramid, "sem_logits": sem_logits, "sem_feat": sem_feat, "instance_features": instance_features,
                "mask_features": mask_features, "rpn": rpn, "image_sizes": sizes, "padded_size": tuple(x.shape[-2:])}

    def forward(self, images: Tensor, image_sizes: SizeLike, targets: Optional[List[Dict[str, Tensor]]] = None,
                orig_sizes: Optional[SizeLike] = None):
        """Training: the dict of weighted losses (:data:`LOSS_NAMES`). Evaluation: one result dict per image.

        Args:
            images: ``[B, 3, Hp, Wp]`` normalised RGB, zero-padded; Hp, Wp multiples of 32.
            image_sizes: (H, W) of each image before padding (list of pairs or ``[B, 2]``).
            targets (training): per image ``sem_seg [H, W]`` int64 (stuff first, then things, 255 void),
                ``boxes [M, 4]`` xyxy float, ``classes [M]`` int64 in 0..K-1, ``masks [M, H, W]`` bool/uint8,
                ``crowd_mask [H, W]`` bool.
            orig_sizes (evaluation): (H0, W0) to resize the outputs to; default the image sizes.

        Evaluation results per image: ``panoptic_seg [H0, W0]`` int64 (0 void), ``segments_info`` (list of
        dicts ``id``, ``category_id``, ``isthing``, ``score`` for things, ``area``), ``instances`` (``boxes [D, 4]``
        in original pixels, ``scores [D]``, ``classes [D]`` 0..K-1, ``masks [D, H0, W0]`` bool) and
        ``sem_seg [H0, W0]`` int64 labels (argmax of the semantic logits).
        """
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets (call model.eval() for inference)")
            return self._losses(images, image_sizes, targets)
        return self._inference(images, image_sizes, orig_sizes)

    def _losses(self, images: Tensor, image_sizes: SizeLike, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        device = images.device
        gt_boxes = [t["boxes"].to(device=device, dtype=torch.float32) for t in targets]
        out = self.forward_features(images, image_sizes, gt_boxes)
        rpn = out["rpn"]
        kept_dropped = self.panoptic_head.sample_instances(targets)
        kept_gt = [(t["boxes"].to(device)[kept.to(device)], t["classes"].to(device)[kept.to(device)])
                   for t, (kept, _) in zip(targets, kept_dropped)]
        roi_losses, kept_mask_logits = self.roi_heads.forward_train(
            out["instance_features"][:4], out["mask_features"], rpn["proposals"], targets, kept_gt)
        sem_targets = self._padded_semantic_targets(targets, out["padded_size"], device)
        losses = dict(rpn["losses"])
        losses.update(roi_losses)
        losses["loss_sem"] = semantic_loss(out["sem_logits"], sem_targets)
        losses["loss_panoptic"] = self.panoptic_head.loss(out["sem_logits"], targets, kept_dropped, kept_mask_logits)
        return {name: losses[name] * self.loss_weights[name[len("loss_"):]] for name in LOSS_NAMES}

    @staticmethod
    def _padded_semantic_targets(targets: List[Dict[str, Tensor]], padded_size: Tuple[int, int],
                                 device: torch.device) -> Tensor:
        canvas = torch.full((len(targets), *padded_size), 255, dtype=torch.long, device=device)
        for canvas_i, t in zip(canvas, targets):
            sem = t["sem_seg"]
            canvas_i[: sem.shape[0], : sem.shape[1]] = sem.to(device)
        return canvas

    @torch.no_grad()
    def _inference(self, images: Tensor, image_sizes: SizeLike, orig_sizes: Optional[SizeLike]) -> List[Dict]:
        out = self.forward_features(images, image_sizes)
        sizes = out["image_sizes"]
        detections = self.roi_heads.forward_test(out["instance_features"][:4], out["mask_features"],
                                                 out["rpn"]["proposals"], sizes)
        sem_full = F.interpolate(out["sem_logits"].float(), size=out["padded_size"], mode="bilinear",
                                 align_corners=False)
        input_sizes = [tuple(int(v) for v in s) for s in sizes.tolist()]
        outputs = [tuple(int(v) for v in s) for s in (self._sizes_tensor(orig_sizes, torch.device("cpu")).tolist()
                                                       if orig_sizes is not None else input_sizes)]
        results = []
        for i, ((h, w), (h0, w0), det) in enumerate(zip(input_sizes, outputs, detections)):
            sem_i = sem_full[i, :, :h, :w]
            scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], device=det["boxes"].device)
            boxes = det["boxes"] * scale
            panoptic_seg, segments_info = self.panoptic_head.inference(sem_i, dict(det, boxes=boxes), (h0, w0))
            sem_labels = sem_i.argmax(dim=0)
            if (h0, w0) != (h, w):
                sem_labels = F.interpolate(sem_labels[None, None].float(), size=(h0, w0), mode="nearest")[0, 0].long()
            results.append({
                "panoptic_seg": panoptic_seg,
                "segments_info": segments_info,
                "instances": {"boxes": boxes, "scores": det["scores"], "classes": det["classes"],
                              "masks": _paste_binary_masks(det["mask_logits"], boxes, h0, w0)},
                "sem_seg": sem_labels,
            })
        return results


def _paste_binary_masks(mask_logits: Tensor, boxes: Tensor, height: int, width: int, chunk: int = 32) -> Tensor:
    """``[D, s, s]`` mask logits -> ``[D, height, width]`` bool (probability > 0.5), pasted in chunks to bound
    memory."""
    parts = [paste_mask_logits(m, b, height, width) > 0 for m, b in zip(mask_logits.split(chunk), boxes.split(chunk))]
    return torch.cat(parts) if parts else torch.zeros((0, height, width), dtype=torch.bool, device=boxes.device)
