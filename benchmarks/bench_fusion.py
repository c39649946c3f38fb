"""fg_fusion (RFF) and the UPSNet panoptic merge against the unfused PyTorch they replace.

fg_fusion: two images, 133 classes (53 stuff) on a 128x128 stride-4 map, five RPN levels (128..8 square, A=3),
forward+backward into both inputs, against softmax + sum + adaptive_avg_pool2d + multiply (the reference). On the CPU
the forward+backward rows are timed twice: in this process (glibc's default heap, which returns freed memory to the
OS and faults it in again, ~1 us per 4 KB page on this VM: the composition's many 17 MB temporaries pay that most)
and in a child process whose heap keeps its memory (the "steady heap" rows: the kernels' own ratio).
upsnet_panoptic_merge: a 512x512 image, 133 classes, 40 instances with 28x28 masks, against the reference that
materialises the pasted masks and the (53 + 40 + 1)-channel logit stack and takes its argmax; also from 1/4-scale
logits resized inside the kernel (the reference resizes with F.interpolate first).

    python benchmarks/bench_fusion.py [cpu|cuda]

On the CPU, EYECOOL_CPU_ISA=baseline|avx2|avx512 picks the variant of the kernels' loops to time (the line above
the table says which ran).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import markdown_table, measure, measure_paired, row  # noqa: E402

import eyecool_ext  # noqa: E402
from eyecool_ext import ops, reference  # noqa: E402

NUM_STUFF, NUM_CLASSES = 53, 133


def _drop_gradients(*tensors):
    def drop():
        for t in tensors:
            t.grad = None
    return drop


def _fusion_step(fn, sem, levels, grads, mode):
    def run():
        torch.autograd.backward(fn(sem, levels, NUM_STUFF, mode), grads)
    return run


def instances(num: int, size: int, device: str, seed: int = 0):
    """Boxes of 16..256 pixels anywhere in the image, thing classes, 28x28 mask logits."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(num, 2, generator=g) * 240 + 16
    xy = torch.rand(num, 2, generator=g) * (size - wh)
    boxes = torch.cat([xy, xy + wh], dim=1).to(device)
    classes = torch.randint(0, NUM_CLASSES - NUM_STUFF, (num,), generator=g).to(device)
    masks = (torch.randn(num, 28, 28, generator=g) * 3).to(device)
    return boxes, classes, masks


# glibc keeps freed memory (no trim below 4 GB of free heap top) and serves 17 MB blocks from the heap instead of
# fresh mmaps: no page is faulted in twice.
STEADY_HEAP_ENV = {"MALLOC_TRIM_THRESHOLD_": str(4 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


def fusion_rows(device: str, heap: str = ""):
    """fg_fusion forward+backward (both modes) and forward alone against the composition, timed in alternation."""
    rows = []
    torch.manual_seed(0)
    sem = torch.randn(2, NUM_CLASSES, 128, 128, device=device, requires_grad=True)
    levels = [torch.randn(2, 3, s, s, device=device, requires_grad=True) for s in (128, 64, 32, 16, 8)]
    grads = [torch.randn_like(level) for level in levels]
    # More runs than the default (a few ms per run on a 2-core machine, where one descheduled thread shows), and
    # the two sides in alternation, so that both meet the same moments of the machine.
    steps = dict(warmup=3, repeat=25)
    suffix = f", {heap}" if heap else ""
    for mode in ("logit", "prob"):
        # The previous run's gradients are dropped untimed: freed in a timed run, they would bill one side for
        # returning the other's 17 MB to the OS.
        ours, peer = measure_paired(_fusion_step(ops.fg_fusion, sem, levels, grads, mode),
                                    _fusion_step(reference.fg_fusion, sem, levels, grads, mode), device,
                                    before=_drop_gradients(sem, *levels), **steps)
        rows.append(row("fg_fusion", f"2x133x128x128, 5 levels, {mode}, fwd+bwd{suffix}", device, "float32", ours,
                        "PyTorch composition", peer))
    if not heap:
        with torch.no_grad():
            ours, peer = measure_paired(lambda: ops.fg_fusion(sem, levels, NUM_STUFF),
                                        lambda: reference.fg_fusion(sem, levels, NUM_STUFF), device, **steps)
        rows.append(row("fg_fusion", "2x133x128x128, 5 levels, logit, fwd", device, "float32", ours,
                        "PyTorch composition", peer))
    return rows


def steady_heap_rows(device: str):
    """fusion_rows' forward+backward rows measured in a child process with STEADY_HEAP_ENV."""
    child = subprocess.run([sys.executable, os.path.abspath(__file__), device, "--steady-heap-child"],
                           env=dict(os.environ, **STEADY_HEAP_ENV), capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"the steady-heap fg_fusion benchmark failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def cases(device: str = "cpu"):
    rows = fusion_rows(device)
    if device == "cpu":  # CUDA's caching allocator keeps its memory anyway
        rows += steady_heap_rows(device)

    boxes, classes, masks = instances(40, 512, device)
    full = torch.randn(NUM_CLASSES, 512, 512, device=device)
    quarter = torch.randn(NUM_CLASSES, 128, 128, device=device)
    rows.append(row("upsnet_panoptic_merge", "512x512, 133 classes, 40 instances", device, "float32",
                    measure(lambda: ops.upsnet_panoptic_merge(full, NUM_STUFF, boxes, classes, masks), device),
                    "materialised stack + argmax",
                    measure(lambda: reference.upsnet_panoptic_merge(full, NUM_STUFF, boxes, classes, masks), device,
                            repeat=5)))
    rows.append(row("upsnet_panoptic_merge", "1/4-scale logits resized to 512x512, 40 instances", device, "float32",
                    measure(lambda: ops.upsnet_panoptic_merge(quarter, NUM_STUFF, boxes, classes, masks, (512, 512)),
                            device),
                    "interpolate + materialised stack + argmax",
                    measure(lambda: reference.upsnet_panoptic_merge(quarter, NUM_STUFF, boxes, classes, masks,
                                                                    (512, 512)), device, repeat=5)))
    return rows


if __name__ == "__main__":
    if "--steady-heap-child" in sys.argv:
        print(json.dumps(fusion_rows(sys.argv[1], heap="steady heap")))
    else:
        # The CPU kernels' vectorised loops run this ISA (EYECOOL_CPU_ISA=baseline|avx2|avx512 caps it).
        print(f"CPU kernels' ISA: {eyecool_ext.cpu_isa()} (CPU supports {eyecool_ext.cpu_isa_supported()})\n")
        print(markdown_table(cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
