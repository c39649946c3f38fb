"""roi_align and multilevel_roi_align against torchvision at Mask R-CNN's shapes.

Box head: 512 ROIs on the stride-4 map of two 512x512 images (256 channels), 7x7 bins; mask head: 14x14.
Aligned, adaptive sampling (detectron2's pooler settings), forward and forward+backward.
"""
from __future__ import annotations

import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from timing import markdown_table, measure, row  # noqa: E402

from eyecool_ext import ops  # noqa: E402


def proposals(num: int, batch: int, image_size: int, device: str, seed: int = 0) -> torch.Tensor:
    """[num, 5] ROIs with sides uniform in [16, 256] pixels, like a detector's proposals."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(num, 2, generator=g) * 240 + 16
    xy = torch.rand(num, 2, generator=g) * (image_size - wh)
    idx = torch.randint(0, batch, (num, 1), generator=g).float()
    return torch.cat([idx, xy, xy + wh], dim=1).to(device)


def _forward_backward(fn, inputs, grad):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    return run


def cases(device: str = "cpu"):
    rows = []
    torch.manual_seed(0)
    feat = torch.randn(2, 256, 128, 128, device=device)
    rois = proposals(512, 2, 512, device)
    for name, size in (("box head 512x256ch 7x7", 7), ("mask head 512x256ch 14x14", 14)):
        ours = lambda: ops.roi_align(feat, rois, size, 0.25, 0, True)  # noqa: E731
        peer = lambda: torchvision.ops.roi_align(feat, rois, size, 0.25, 0, True)  # noqa: E731
        rows.append(row("roi_align", name + " fwd", device, "float32", measure(ours, device),
                        "torchvision", measure(peer, device)))
        x = feat.clone().requires_grad_()
        grad = torch.randn(512, 256, size, size, device=device)
        ours_fb = _forward_backward(lambda: ops.roi_align(x, rois, size, 0.25, 0, True), [x], grad)
        peer_fb = _forward_backward(lambda: torchvision.ops.roi_align(x, rois, size, 0.25, 0, True), [x], grad)
        rows.append(row("roi_align", name + " fwd+bwd", device, "float32", measure(ours_fb, device),
                        "torchvision", measure(peer_fb, device)))

    # The FPN pooler: P2..P5 of two 512x512 images, against torchvision's MultiScaleRoIAlign.
    sizes = {"p2": 128, "p3": 64, "p4": 32, "p5": 16}
    feats = {k: torch.randn(2, 256, s, s, device=device, requires_grad=True) for k, s in sizes.items()}
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(2)])
    rois_sorted = rois[order]
    pooler = torchvision.ops.MultiScaleRoIAlign(list(sizes), 7, sampling_ratio=0)
    image_shapes = [(512, 512), (512, 512)]
    flist = list(feats.values())
    ours = lambda: ops.multilevel_roi_align(flist, rois_sorted, 7, scales)  # noqa: E731
    peer = lambda: pooler(feats, boxes, image_shapes)  # noqa: E731
    with torch.no_grad():
        rows.append(row("multilevel_roi_align", "P2-P5 512 rois 7x7 fwd", device, "float32", measure(ours, device),
                        "torchvision MultiScaleRoIAlign", measure(peer, device)))
    grad = torch.randn(512, 256, 7, 7, device=device)
    rows.append(row("multilevel_roi_align", "P2-P5 512 rois 7x7 fwd+bwd", device, "float32",
                    measure(_forward_backward(ours, flist, grad), device), "torchvision MultiScaleRoIAlign",
                    measure(_forward_backward(peer, flist, grad), device)))
    return rows


if __name__ == "__main__":
    print(markdown_table(cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
