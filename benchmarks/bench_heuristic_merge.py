"""heuristic_panoptic_merge against panopticapi's combine script (the Panoptic FPN merge).

panopticapi's ``combine_semantic_and_instance_predictions`` is a script whose module cannot be imported here
(it raises without pycocotools) and whose per-image function reads RLE from JSON and writes a PNG per image.
The peer is therefore ``panopticapi_combine``: its per-image loop, ``combine_to_panoptic_single_core``,
re-implemented line for line on decoded masks with numpy (``COCOmask.area`` -> ``mask.sum()``,
``COCOmask.merge(intersect=True)`` -> ``&``, ``pan_segm_id == 0`` for the free pixels; no RLE, no id generator,
no PNG), so it times the algorithm and not the file handling. It returns eyecool's encoding, and each case first
checks that it equals eyecool's result. ``eyecool_ext.ops.heuristic_panoptic_merge`` has no compiled kernel:
it is the vectorised PyTorch implementation (the same function as ``eyecool_ext.reference``'s), kept for
comparison with the UPSNet merge (docs/design.md section 4).

Cases: COCO-sized (800x1216, 53 stuff of 133 classes, 100 detections, as detectron2 feeds it) and demo-sized
(128x128, the synthetic label space, 20 detections).

    python benchmarks/bench_heuristic_merge.py [cpu|cuda]
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from timing import markdown_table, measure, row  # noqa: E402

import eyecool_ext  # noqa: E402
from eyecool_ext import ops  # noqa: E402

OVERLAP, SCORE = 0.5, 0.5


def panopticapi_combine(sem_seg: np.ndarray, num_stuff: int, masks: np.ndarray, scores: np.ndarray,
                        overlap_thr: float = OVERLAP, stuff_area_limit: int = 4096,
                        confidence_thr: float = SCORE) -> np.ndarray:
    """panopticapi's ``combine_to_panoptic_single_core`` for one image (and ``combine_predictions``' score
    filter and sort), on bool masks ``[M, H, W]``; eyecool's encoding (stuff c, instance S + i, void S + M)."""
    m = masks.shape[0]
    keep = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= confidence_thr]
    pan_segm_id = np.zeros(sem_seg.shape, dtype=np.uint32)
    used = None
    for i in keep:
        mask = masks[i]
        area = mask.sum()
        if area == 0:
            continue
        if used is None:
            intersect = 0
            used = mask.copy()
        else:
            intersect = np.logical_and(used, mask).sum()
        if intersect / area > overlap_thr:
            continue
        used = np.logical_or(used, mask)
        if intersect != 0:
            mask = np.logical_and(pan_segm_id == 0, mask)
        pan_segm_id[mask] = num_stuff + i + 1
    # The semantic predictions of stuff classes, one segment per category present.
    for category in np.unique(sem_seg):
        if category >= num_stuff:
            continue
        mask_left = np.logical_and(pan_segm_id == 0, sem_seg == category)
        if mask_left.sum() < stuff_area_limit:
            continue
        pan_segm_id[mask_left] = category + 1
    out = pan_segm_id.astype(np.int64) - 1
    out[pan_segm_id == 0] = num_stuff + m
    return out


def merge_inputs(height: int, width: int, num_classes: int, num_stuff: int, num_instances: int, device: str,
                 seed: int = 0):
    """A blobby semantic map (argmax of upsampled noise), elliptic instance masks of 1/20..1/3 of the image side
    in random boxes, scores uniform in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, num_classes, max(2, height // 32), max(2, width // 32), generator=g)
    sem_seg = F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)[0].argmax(0)
    side = min(height, width)
    wh = (torch.rand(num_instances, 2, generator=g) * (1 / 3 - 1 / 20) + 1 / 20) * side
    x0 = torch.rand(num_instances, generator=g) * (width - wh[:, 0])
    y0 = torch.rand(num_instances, generator=g) * (height - wh[:, 1])
    ys = torch.arange(height).view(1, -1, 1) + 0.5
    xs = torch.arange(width).view(1, 1, -1) + 0.5
    cx, cy = (x0 + wh[:, 0] / 2).view(-1, 1, 1), (y0 + wh[:, 1] / 2).view(-1, 1, 1)
    rx, ry = (wh[:, 0] / 2).view(-1, 1, 1), (wh[:, 1] / 2).view(-1, 1, 1)
    masks = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    scores = torch.rand(num_instances, generator=g)
    return sem_seg.to(device), masks.to(device), scores.to(device)


def cases(device: str = "cpu"):
    rows = []
    for case, (h, w, classes, stuff, instances, area_limit) in {
        "COCO-sized 800x1216, 133 classes, 100 detections": (800, 1216, 133, 53, 100, 4096),
        "demo-sized 128x128, 8 classes, 20 detections": (128, 128, 8, 4, 20, 256),
    }.items():
        sem_seg, masks, scores = merge_inputs(h, w, classes, stuff, instances, device)
        sem_np, masks_np, scores_np = sem_seg.cpu().numpy(), masks.cpu().numpy(), scores.cpu().numpy()
        args = (sem_seg, stuff, masks, scores, OVERLAP, area_limit, SCORE)
        expected = panopticapi_combine(sem_np, stuff, masks_np, scores_np, OVERLAP, area_limit, SCORE)
        if not np.array_equal(ops.heuristic_panoptic_merge(*args).cpu().numpy(), expected):
            raise AssertionError(f"heuristic_panoptic_merge differs from panopticapi's loop on {case}")
        rows.append(row("heuristic_panoptic_merge", case, device, "bool masks",
                        measure(lambda: ops.heuristic_panoptic_merge(*args), device),
                        "panopticapi combine loop (numpy re-implementation)",
                        measure(lambda: panopticapi_combine(sem_np, stuff, masks_np, scores_np, OVERLAP, area_limit,
                                                            SCORE), "cpu")))
    return rows


if __name__ == "__main__":
    # For the record beside the other benchmarks; this op has no compiled loops, so the ISA does not change it.
    print(f"CPU kernels' ISA: {eyecool_ext.cpu_isa()} (not used by heuristic_panoptic_merge: no compiled kernel)\n")
    print(markdown_table(cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
