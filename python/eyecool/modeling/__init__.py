"""The Eyecool panoptic network (docs/design.md section 5), one module per part, and :func:`build_model`, the only
place that reads the model configuration."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

from eyecool.config import Config, ModelConfig
from eyecool.modeling.backbone import ResNetBackbone
from eyecool.modeling.balanced_pyramid import BalancedPyramid, NonLocalBlock
from eyecool.modeling.fpn import FPN
from eyecool.modeling.operators import op_backend
from eyecool.modeling.panoptic_head import PanopticHead
from eyecool.modeling.panoptic_model import LOSS_NAMES, PanopticModel, SemanticToMask
from eyecool.modeling.roi_heads import ROIHeads
from eyecool.modeling.rpn import RPN
from eyecool.modeling.semantic_head import SemanticHead

__all__ = ["build_model", "PanopticModel", "LOSS_NAMES", "ResNetBackbone", "FPN", "BalancedPyramid",
           "NonLocalBlock", "SemanticHead", "RPN", "ROIHeads", "PanopticHead", "SemanticToMask"]


def build_model(cfg, stuff_category_ids: Optional[Sequence[int]] = None,
                thing_category_ids: Optional[Sequence[int]] = None) -> PanopticModel:
    """Build the network from ``cfg`` (a :class:`eyecool.config.Config` or its ``model`` section).

    ``stuff_category_ids`` / ``thing_category_ids`` are the data set's category ids in contiguous order (stuff
    channels first, then things); they give ``segments_info`` its ``category_id`` values and, where
    ``model.num_stuff`` / ``model.num_things`` are None, the class counts. Without them the ids are
    1..S (stuff) and S+1..S+K (things).
    """
    m: ModelConfig = cfg.model if isinstance(cfg, Config) else cfg
    num_stuff = m.num_stuff if m.num_stuff is not None else (len(stuff_category_ids) if stuff_category_ids is not None
                                                              else None)
    num_things = m.num_things if m.num_things is not None else (len(thing_category_ids)
                                                                if thing_category_ids is not None else None)
    if num_stuff is None or num_things is None:
        raise ValueError("model.num_stuff and model.num_things are unset: set them or pass the data set's "
                         "stuff_category_ids and thing_category_ids")
    stuff_ids = list(stuff_category_ids) if stuff_category_ids is not None else list(range(1, num_stuff + 1))
    thing_ids = (list(thing_category_ids) if thing_category_ids is not None
                 else list(range(num_stuff + 1, num_stuff + num_things + 1)))
    if len(stuff_ids) != num_stuff or len(thing_ids) != num_things:
        raise ValueError(f"got {len(stuff_ids)} stuff and {len(thing_ids)} thing category ids for "
                         f"model.num_stuff={num_stuff}, model.num_things={num_things}")
    if m.backbone.norm == "frozen_bn" and not m.backbone.weights:
        warnings.warn("model.backbone.norm=frozen_bn without model.backbone.weights: the backbone's BatchNorm layers "
                      "are identities and its activations grow unnormalised; train from scratch with norm=bn or gn",
                      RuntimeWarning, stacklevel=2)
    backend = op_backend(m.ops)
    channels = m.fpn.channels
    backbone = ResNetBackbone(depth=m.backbone.depth, norm=m.backbone.norm, freeze_at=m.backbone.freeze_at,
                              weights=m.backbone.weights)
    fpn = FPN(in_channels=backbone.out_channels, channels=channels)
    semantic_head = SemanticHead(in_channels=channels, num_classes=num_stuff + num_things, backend=backend,
                                 hidden_channels=m.semantic_head.hidden_channels,
                                 out_channels=m.semantic_head.out_channels, deformable=m.semantic_head.deformable)
    if m.dam.enabled:
        balanced_pyramid = BalancedPyramid(channels=channels, num_levels=4, refine_level=m.dam.refine_level)
        semantic_to_mask = SemanticToMask(in_channels=semantic_head.feature_channels, out_channels=channels)
    else:
        balanced_pyramid = semantic_to_mask = None
    r = m.rpn
    rpn = RPN(in_channels=channels, conv_channels=r.conv_channels or channels, anchor_sizes=r.anchor_sizes,
              aspect_ratios=r.aspect_ratios, strides=fpn.strides, positive_iou=r.positive_iou,
              negative_iou=r.negative_iou, batch_size_per_image=r.batch_size_per_image,
              positive_fraction=r.positive_fraction, pre_nms_topk=(r.pre_nms_topk_train, r.pre_nms_topk_test),
              post_nms_topk=(r.post_nms_topk_train, r.post_nms_topk_test), nms_threshold=r.nms_threshold,
              fusion_mode=m.rff.mode, fg_fusion=backend.fg_fusion, num_stuff=num_stuff)
    h = m.roi_heads
    roi_heads = ROIHeads(in_channels=channels, num_classes=num_things, scales=[1 / s for s in fpn.strides[:4]],
                         backend=backend, box_pooler_size=h.box_pooler_size, box_fc_dim=h.box_fc_dim,
                         box_num_fc=h.box_num_fc, box_reg_weights=h.box_reg_weights,
                         mask_pooler_size=h.mask_pooler_size, mask_conv_dim=h.mask_conv_dim,
                         mask_num_conv=h.mask_num_conv, batch_size_per_image=h.batch_size_per_image,
                         positive_fraction=h.positive_fraction, positive_iou=h.positive_iou,
                         score_threshold=h.score_threshold_test, nms_threshold=h.nms_threshold_test,
                         detections_per_image=h.detections_per_image)
    p = m.panoptic
    panoptic_head = PanopticHead(num_stuff=num_stuff, stuff_category_ids=stuff_ids, thing_category_ids=thing_ids,
                                 stride=fpn.strides[0], keep_fraction=p.keep_fraction,
                                 score_threshold=p.score_threshold, nms_threshold=p.nms_threshold,
                                 max_instances=p.max_instances, overlap_threshold=p.overlap_threshold,
                                 stuff_area_limit=p.stuff_area_limit, merge=backend.upsnet_panoptic_merge)
    w = m.loss_weights
    loss_weights = {"rpn_cls": w.rpn_cls, "rpn_loc": w.rpn_loc, "cls": w.cls, "box_reg": w.box_reg, "mask": w.mask,
                    "sem": w.sem, "panoptic": w.panoptic}
    return PanopticModel(backbone=backbone, fpn=fpn, semantic_head=semantic_head, rpn=rpn, roi_heads=roi_heads,
                         panoptic_head=panoptic_head, balanced_pyramid=balanced_pyramid,
                         semantic_to_mask=semantic_to_mask, num_stuff=num_stuff, num_things=num_things,
                         loss_weights=loss_weights, detach_fg=m.rff.detach_fg,
                         size_divisibility=m.size_divisibility)
