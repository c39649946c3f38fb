"""The CPU kernels' row loops are compiled for AVX-512, AVX2 and the baseline ISA and chosen at run time; a
machine runs only the best its CPU has, so every variant is run here in a subprocess capped with
EYECOOL_CPU_ISA, and its results are compared with the references."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from eyecool_ext import reference
from op_tester import assert_close, needs_compiled

# Runs in the capped subprocess: fg_fusion forward and backward in both modes (a band width that is no multiple
# of any vector width, levels with overlapping bins), upsnet_panoptic_merge and deform_conv2d's forward; the
# results go to a file.
VARIANT_SCRIPT = r"""
import sys, torch
from eyecool_ext import ops
torch.manual_seed(0)
results = {}
for dtype in (torch.float32, torch.float64):
    sem = (torch.randn(2, 9, 20, 30, dtype=dtype) * 3).requires_grad_()
    levels = [torch.randn(2, 3, h, w, dtype=dtype, requires_grad=True) for h, w in ((20, 30), (7, 9), (40, 11))]
    grads = [torch.randn_like(level) for level in levels]
    for mode in ("logit", "prob"):
        out = ops.fg_fusion(sem, levels, 4, mode)
        results[(str(dtype), mode)] = {
            "inputs": [t.detach() for t in (sem, *levels, *grads)],
            "out": [o.detach() for o in out],
            "grads": list(torch.autograd.grad(out, [sem, *levels], grads)),
        }
g = torch.Generator().manual_seed(1)
sem = torch.randn(6, 37, 45, generator=g)
wh = torch.rand(9, 2, generator=g) * 30 + 1
xy = torch.rand(9, 2, generator=g) * 40 - 5
boxes = torch.cat([xy, xy + wh], dim=1)
classes = torch.randint(0, 2, (9,), generator=g)
masks = torch.randn(9, 28, 28, generator=g) * 3
results["merge"] = {"inputs": [sem, boxes, classes, masks],
                    "labels": ops.upsnet_panoptic_merge(sem, 4, boxes, classes, masks)}
# deform_conv2d's forward GEMM (AVX-512 kernel or at::mm): two weight groups, 20 output channels per group (a
# partial 32-channel panel), 11x13 = 143 pixels (a partial 8-pixel tile), with and without bias.
x = torch.randn(2, 8, 11, 13, generator=g)
offset = torch.randn(2, 2 * 18, 11, 13, generator=g)
weight = torch.randn(40, 4, 3, 3, generator=g)
bias = torch.randn(40, generator=g)
results["deform"] = {"inputs": [x, offset, weight, bias],
                     "out": [ops.deform_conv2d(x, offset, weight, b, padding=1) for b in (bias, None)]}
torch.save(results, sys.argv[1])
"""


@needs_compiled
@pytest.mark.parametrize("isa", ["baseline", "avx2", "best"])
def test_every_cpu_isa_variant_matches_the_references(isa, tmp_path):
    out_file = tmp_path / "results.pt"
    env = dict(os.environ, EYECOOL_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT, str(out_file)], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr
    results = torch.load(out_file)
    for dtype in (torch.float32, torch.float64):
        for mode in ("logit", "prob"):
            case = results[(str(dtype), mode)]
            sem, *rest = [t.clone().requires_grad_() for t in case["inputs"]]
            levels, grads = rest[:3], rest[3:]
            expected = reference.fg_fusion(sem, levels, 4, mode)
            for ours, theirs in zip(case["out"], expected):
                assert_close(ours, theirs.detach())
            for ours, theirs in zip(case["grads"], torch.autograd.grad(expected, [sem, *levels], grads)):
                assert_close(ours, theirs)
    merge = results["merge"]
    sem, boxes, classes, masks = merge["inputs"]
    assert torch.equal(merge["labels"], reference.upsnet_panoptic_merge(sem, 4, boxes, classes, masks))
    deform = results["deform"]
    x, offset, weight, bias = deform["inputs"]
    for ours, b in zip(deform["out"], (bias, None)):
        assert_close(ours, torchvision.ops.deform_conv2d(x, offset, weight, b, padding=1))
