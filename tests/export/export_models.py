"""A tiny random network and images for the export tests (the trained network of the PQ test is made by the
fixture of test_onnx_model.py)."""
from __future__ import annotations

from typing import List, Tuple

import torch

from eyecool.config import load_config
from eyecool.modeling import build_model

STUFF_IDS = [101, 102, 103]
THING_IDS = [1, 7]
TINY = ["model.num_stuff=3", "model.num_things=2", "model.backbone.depth=18", "model.backbone.norm=bn",
        "model.backbone.freeze_at=0", "model.fpn.channels=32", "model.semantic_head.hidden_channels=32",
        "model.semantic_head.out_channels=16", "model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=32",
        "model.rpn.anchor_sizes=[8, 16, 32, 64, 128]", "model.roi_heads.box_fc_dim=64",
        "model.roi_heads.mask_conv_dim=16", "model.roi_heads.mask_num_conv=2", "model.panoptic.stuff_area_limit=16",
        # Keep every detection of a random network (the default 0.05 would keep none): the NMS, the mask head and
        # the merge then all see data.
        "model.roi_heads.score_threshold_test=0.0", "model.panoptic.score_threshold=0.2"]


def random_network(seed: int = 0, *overrides: str) -> torch.nn.Module:
    """The full Eyecool structure (DAM, RFF, deformable semantic branch), narrow, random weights, eval mode; the
    deformable offsets and DAM's zero-initialised projections made non-zero so that they take part."""
    torch.manual_seed(seed)
    model = build_model(load_config(overrides=TINY + list(overrides)), STUFF_IDS, THING_IDS).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "offset" in name or "semantic_to_mask" in name or "refine.out" in name:
                p.normal_(0, 0.05)
        # A wide spread of classifier logits: scores far from uniform, some above the merge's threshold.
        model.roi_heads.box_head.class_logits.weight.normal_(0, 0.3)
    return model


def images(sizes: List[Tuple[int, int]], seed: int = 0) -> List[torch.Tensor]:
    """Normalised random-ish images ``[3, h, w]`` with some structure (blocks), one per size."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        coarse = torch.randn(3, max(1, h // 8), max(1, w // 8), generator=g)
        image = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="nearest")[0]
        out.append(image + 0.2 * torch.randn(3, h, w, generator=g))
    return out
