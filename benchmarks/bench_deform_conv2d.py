"""deform_conv2d against torchvision and a dense convolution, at the layer of UPSNet's semantic head.

The "DC subnet" runs deformable 3x3 convolutions on every FPN level (DESIGN.md section 5); its 256->128 layer
(modulated, v2) at 64x64 (P3 of a 512x512 image) and 128x128 (P2), batch 1, forward and forward+backward.
The dense ``conv2d`` of the same shape is the floor: deformable sampling can at best add nothing to it.

    python benchmarks/bench_deform_conv2d.py [cpu|cuda]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from timing import markdown_table, measure, row  # noqa: E402

from eyecool_ext import ops  # noqa: E402

IN_CHANNELS, OUT_CHANNELS = 256, 128


def layer_inputs(size: int, device: str, seed: int = 0):
    """(input, offset, weight, bias, mask) of the 3x3 256->128 layer on a size x size map, padding 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, IN_CHANNELS, size, size, generator=g)
    offset = torch.randn(1, 18, size, size, generator=g) * 2  # a few pixels, like a trained DCN
    weight = torch.randn(OUT_CHANNELS, IN_CHANNELS, 3, 3, generator=g) * 0.02
    bias = torch.randn(OUT_CHANNELS, generator=g)
    mask = torch.rand(1, 9, size, size, generator=g)
    return [t.to(device) for t in (x, offset, weight, bias, mask)]


def _forward_backward(fn, inputs, grad):
    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
    return run


def cases(device: str = "cpu"):
    rows = []
    # torchvision's CPU kernel takes seconds per call at 128x128: fewer repeats for it.
    slow_peer = dict(warmup=1, repeat=3) if device == "cpu" else {}
    for size in (64, 128):
        case = f"v2 256->128 3x3 {size}x{size}"
        x, offset, weight, bias, mask = layer_inputs(size, device)

        def ours(x, offset, weight, bias, mask):
            return ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)

        def theirs(x, offset, weight, bias, mask):
            return torchvision.ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)

        def dense(x, offset, weight, bias, mask):
            return F.conv2d(x, weight, bias, 1, 1)

        args = (x, offset, weight, bias, mask)
        with torch.no_grad():
            ours_fwd = measure(lambda: ours(*args), device)
            rows.append(row("deform_conv2d", case + " fwd", device, "float32", ours_fwd, "torchvision",
                            measure(lambda: theirs(*args), device, **slow_peer)))
            rows.append(row("deform_conv2d", case + " fwd", device, "float32", ours_fwd, "dense conv2d",
                            measure(lambda: dense(*args), device)))
        leaves = [t.clone().requires_grad_() for t in args]
        grad = torch.randn(1, OUT_CHANNELS, size, size, device=device)
        ours_fb = measure(_forward_backward(ours, leaves, grad), device)
        rows.append(row("deform_conv2d", case + " fwd+bwd", device, "float32", ours_fb, "torchvision",
                        measure(_forward_backward(theirs, leaves, grad), device, **slow_peer)))
        rows.append(row("deform_conv2d", case + " fwd+bwd", device, "float32", ours_fb, "dense conv2d",
                        measure(_forward_backward(dense, leaves, grad), device)))
    return rows


if __name__ == "__main__":
    print(markdown_table(cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
