"""roi_align and multilevel_roi_align against torchvision at Mask R-CNN's shapes.

COCO-sized: box head, 512 ROIs on the stride-4 map of two 512x512 images (256 channels), 7x7 bins; mask head:
14x14; the FPN pooler over P2..P5 of those images. Demo-sized (the ``demo`` config: four 128-pixel images,
64 channels, 128 ROIs per image): box head 512 ROIs 7x7, mask head 128 ROIs (its positives) 14x14, on the
32x32 stride-4 map, and the pooler over P2..P5 (32..4). Aligned, adaptive sampling (detectron2's pooler
settings), forward and forward+backward.
"""
from __future__ import annotations

import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from timing import markdown_table, measure, row  # noqa: E402

from eyecool_ext import ops  # noqa: E402


def proposals(num: int, batch: int, image_size: int, device: str, seed: int = 0, min_side: float = 16,
              max_side: float = 256) -> torch.Tensor:
    """[num, 5] ROIs with sides uniform in [min_side, max_side] pixels, like a detector's proposals."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(num, 2, generator=g) * (max_side - min_side) + min_side
    xy = torch.rand(num, 2, generator=g) * (image_size - wh)
    idx = torch.randint(0, batch, (num, 1), generator=g).float()
    return torch.cat([idx, xy, xy + wh], dim=1).to(device)


def _forward_backward(fn, inputs, grad):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    return run


# (label, images, image side, channels, box-head rois, mask-head rois, smallest and largest box side)
SIZES = (
    ("", 2, 512, 256, 512, 512, 16, 256),
    ("demo ", 4, 128, 64, 512, 128, 8, 128),
)


def _single_level_rows(device, label, batch, image, channels, box_rois, mask_rois, min_side, max_side):
    rows = []
    feat = torch.randn(batch, channels, image // 4, image // 4, device=device)
    for name, size, num in (("box head", 7, box_rois), ("mask head", 14, mask_rois)):
        rois = proposals(num, batch, image, device, min_side=min_side, max_side=max_side)
        name = f"{label}{name} {num}x{channels}ch {size}x{size}"
        ours = lambda: ops.roi_align(feat, rois, size, 0.25, 0, True)  # noqa: E731
        peer = lambda: torchvision.ops.roi_align(feat, rois, size, 0.25, 0, True)  # noqa: E731
        rows.append(row("roi_align", name + " fwd", device, "float32", measure(ours, device),
                        "torchvision", measure(peer, device)))
        x = feat.clone().requires_grad_()
        grad = torch.randn(num, channels, size, size, device=device)
        ours_fb = _forward_backward(lambda: ops.roi_align(x, rois, size, 0.25, 0, True), [x], grad)
        peer_fb = _forward_backward(lambda: torchvision.ops.roi_align(x, rois, size, 0.25, 0, True), [x], grad)
        rows.append(row("roi_align", name + " fwd+bwd", device, "float32", measure(ours_fb, device),
                        "torchvision", measure(peer_fb, device)))
    return rows


def _pooler_rows(device, label, batch, image, channels, num, min_side, max_side):
    """The FPN pooler over P2..P5, against torchvision's MultiScaleRoIAlign."""
    rois = proposals(num, batch, image, device, min_side=min_side, max_side=max_side)
    sizes = {"p2": image // 4, "p3": image // 8, "p4": image // 16, "p5": image // 32}
    feats = {k: torch.randn(batch, channels, s, s, device=device, requires_grad=True) for k, s in sizes.items()}
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(batch)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(batch)])
    rois_sorted = rois[order]
    pooler = torchvision.ops.MultiScaleRoIAlign(list(sizes), 7, sampling_ratio=0)
    image_shapes = [(image, image)] * batch
    flist = list(feats.values())
    ours = lambda: ops.multilevel_roi_align(flist, rois_sorted, 7, scales)  # noqa: E731
    peer = lambda: pooler(feats, boxes, image_shapes)  # noqa: E731
    name = f"{label}P2-P5 {num} rois x {channels}ch 7x7"
    rows = []
    with torch.no_grad():
        rows.append(row("multilevel_roi_align", name + " fwd", device, "float32", measure(ours, device),
                        "torchvision MultiScaleRoIAlign", measure(peer, device)))
    grad = torch.randn(num, channels, 7, 7, device=device)
    rows.append(row("multilevel_roi_align", name + " fwd+bwd", device, "float32",
                    measure(_forward_backward(ours, flist, grad), device), "torchvision MultiScaleRoIAlign",
                    measure(_forward_backward(peer, flist, grad), device)))
    return rows


def cases(device: str = "cpu"):
    rows = []
    torch.manual_seed(0)
    for label, batch, image, channels, box_rois, mask_rois, min_side, max_side in SIZES:
        rows += _single_level_rows(device, label, batch, image, channels, box_rois, mask_rois, min_side, max_side)
    for label, batch, image, channels, box_rois, _, min_side, max_side in SIZES:
        rows += _pooler_rows(device, label, batch, image, channels, box_rois, min_side, max_side)
    return rows


if __name__ == "__main__":
    print(markdown_table(cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
