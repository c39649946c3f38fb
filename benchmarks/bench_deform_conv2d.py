"""deform_conv2d against torchvision and a dense convolution, at the layer of UPSNet's semantic head.

The "DC subnet" runs deformable 3x3 convolutions on every FPN level (DESIGN.md section 5). COCO-sized: its
256->128 layer (modulated, v2) at 64x64 (P3 of a 512x512 image) and 128x128 (P2), batch 1. Demo-sized: the
demo network's first layer (``configs/demo.yaml``: DCN v1 as the network runs it, 64->64) on P2 of a batch of
four 128-pixel images (4 x 32x32). Forward and forward+backward. The dense ``conv2d`` of the same shape is the
floor: deformable sampling can at best add nothing to it.

    python benchmarks/bench_deform_conv2d.py [cpu|cuda]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from timing import markdown_table, measure, measure_paired, row  # noqa: E402

from eyecool_ext import ops  # noqa: E402

IN_CHANNELS, OUT_CHANNELS = 256, 128
# (case, batch, in channels, out channels, side, modulated)
LAYERS = (
    ("v2 256->128 3x3 64x64", 1, IN_CHANNELS, OUT_CHANNELS, 64, True),
    ("v2 256->128 3x3 128x128", 1, IN_CHANNELS, OUT_CHANNELS, 128, True),
    ("demo v1 64->64 3x3 4x32x32", 4, 64, 64, 32, False),
)


def layer_inputs(size: int, device: str, seed: int = 0, batch: int = 1, in_channels: int = IN_CHANNELS,
                 out_channels: int = OUT_CHANNELS, modulated: bool = True):
    """(input, offset, weight, bias, mask) of a 3x3 layer on a batch of size x size maps, padding 1; mask is
    None for DCN v1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=g)
    offset = torch.randn(batch, 18, size, size, generator=g) * 2  # a few pixels, like a trained DCN
    weight = torch.randn(out_channels, in_channels, 3, 3, generator=g) * 0.02
    bias = torch.randn(out_channels, generator=g)
    mask = torch.rand(batch, 9, size, size, generator=g) if modulated else None
    return [None if t is None else t.to(device) for t in (x, offset, weight, bias, mask)]


def _forward_backward(fn, inputs, grad):
    """``fn(*inputs)`` forward and backward; ``inputs`` may hold None (no mask)."""
    def run():
        for t in inputs:
            if t is not None:
                t.grad = None
        fn(*inputs).backward(grad)
    return run


def cases(device: str = "cpu"):
    rows = []
    # torchvision's CPU kernel takes seconds per call at 128x128: fewer repeats for it.
    slow_peer = dict(warmup=1, repeat=3) if device == "cpu" else {}
    for case, batch, cin, cout, size, modulated in LAYERS:
        x, offset, weight, bias, mask = layer_inputs(size, device, batch=batch, in_channels=cin, out_channels=cout,
                                                     modulated=modulated)

        def ours(x, offset, weight, bias, mask):
            return ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)

        def theirs(x, offset, weight, bias, mask):
            return torchvision.ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)

        def dense(x, offset, weight, bias, mask):
            return F.conv2d(x, weight, bias, 1, 1)

        args = (x, offset, weight, bias, mask)
        # Against the dense convolution (the closest ratio, a target of its own) ours and the peer alternate run
        # by run, so that both meet the same moments of the machine; against torchvision's seconds-long kernel
        # ours is timed first.
        with torch.no_grad():
            rows.append(row("deform_conv2d", case + " fwd", device, "float32", measure(lambda: ours(*args), device),
                            "torchvision", measure(lambda: theirs(*args), device, **slow_peer)))
            ours_fwd, dense_fwd = measure_paired(lambda: ours(*args), lambda: dense(*args), device, warmup=2,
                                                 repeat=7)
            rows.append(row("deform_conv2d", case + " fwd", device, "float32", ours_fwd, "dense conv2d", dense_fwd))
        leaves = [None if t is None else t.clone().requires_grad_() for t in args]
        grad = torch.randn(batch, cout, size, size, device=device)
        ours_step, dense_step = _forward_backward(ours, leaves, grad), _forward_backward(dense, leaves, grad)
        rows.append(row("deform_conv2d", case + " fwd+bwd", device, "float32", measure(ours_step, device),
                        "torchvision", measure(_forward_backward(theirs, leaves, grad), device, **slow_peer)))
        ours_fb, dense_fb = measure_paired(ours_step, dense_step, device, warmup=2, repeat=7)
        rows.append(row("deform_conv2d", case + " fwd+bwd", device, "float32", ours_fb, "dense conv2d", dense_fb))
    return rows


if __name__ == "__main__":
    print(markdown_table(cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
