"""`make gpu-check`: everything that needs an NVIDIA GPU, in one command that fits 10 minutes on one H100/H200.

    python3 benchmarks/gpu_check.py [--json bench_out/gpu_check.json] [--skip-build] [--steps a,b,...]
    python3 benchmarks/gpu_check.py --device cpu --quick     # self-test of the harness on the CPU (no build)

Steps (each a separate process, so that a CUDA error, which poisons its process's context, fails that step only,
and each has its own time limit out of one overall budget):

  build     ``FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<this GPU> MAX_JOBS=<cores> python3 setup.py build_ext --inplace``
            with the interpreter running this script (the GPU image has no .venv), timed; then a check that the
            built ``eyecool_ext`` loads and holds CUDA kernels (otherwise every op would silently run the
            reference fallback and every later comparison would be meaningless).
  sanitize  ``compute-sanitizer --tool memcheck --error-exitcode`` over one forward and backward of every op on
            CUDA (this script's ``--worker smoke``), with PyTorch's caching allocator off so that every tensor
            is its own allocation and an out-of-bounds access cannot land silently in a neighbour.
  compare   every CUDA op against the compiled CPU op and against the pure-PyTorch reference, over dtypes
            (float64, float32, float16, bfloat16), layouts (contiguous, channels_last, strided slice), edge
            cases (empty, non-contiguous, ...) and, for fg_fusion, roi_align and deform_conv2d, one input of
            more than 2^31 elements in half precision, checked on slices that the CPU recomputes from the slice
            of the input it depends on.
  tests     ``python3 -m pytest tests/ops -q -k "cuda and not emulat"``: the op tests' CUDA parametrisations.
  bench     every op on CUDA against torchvision's CUDA op where one exists (roi_align, deform_conv2d), else
            against the eager PyTorch reference; CUDA events, warm-up, alternating runs, medians; plus the top
            kernels of each op by CUDA time from torch.profiler.

Writes one JSON report, prints a short table, and exits 1 when any step failed (a step cut short by the time
budget counts as failed: it proved nothing). With no CUDA device visible it prints a message and exits 0 without
building anything.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)
NO_GPU_MESSAGE = "gpu-check: no CUDA device visible (torch.cuda.is_available() is False); nothing was run"
STEPS = ["build", "sanitize", "compare", "tests", "bench"]
# Seconds each step may take at most (the overall budget may cut them shorter). Measured expectations on one
# H200 are far below: build ~2 min with 16 jobs, the rest well under a minute or two each.
STEP_CAPS = {"build": 300, "sanitize": 180, "compare": 180, "tests": 240, "bench": 120}
# Seconds kept back for every step still to come when sizing a step's limit, so that a slow build cannot starve
# all the others.
STEP_RESERVE = 20


# ----------------------------------------------------------------------------------------------------------------
# Is there a GPU at all?

def _nvidia_smi_gpus() -> List[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if line.startswith("GPU ")]


def gpu_presence() -> tuple:
    """``(status, message)``: status "yes", "no" (nothing to do, exit 0) or "broken" (a GPU is there but this
    python cannot use it: a failure, not a skip, or a broken image would pass silently)."""
    try:
        import torch
    except ImportError as exc:
        gpus = _nvidia_smi_gpus()
        if gpus:
            return "broken", (f"gpu-check: nvidia-smi lists {len(gpus)} GPU(s) but {sys.executable} cannot import "
                              f"torch ({exc}); set GPU_PYTHON to a python with torch")
        return "no", (f"gpu-check: no CUDA device visible ({sys.executable} cannot import torch, and nvidia-smi "
                      f"lists no GPU); nothing was run")
    if not torch.cuda.is_available():
        return "no", NO_GPU_MESSAGE
    return "yes", ""


# ----------------------------------------------------------------------------------------------------------------
# Inputs, layouts, tolerances

def to_layout(x, layout: str):
    """The same values as ``x`` in one of the memory layouts the kernels must accept (tests/ops/op_tester.py's
    rule, extended to 3-d tensors, whose "channels_last" puts dim 0 innermost, and to integer maps, whose
    "transposed" swaps the strides of the last two dims)."""
    import torch

    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        perm = list(range(1, x.dim())) + [0]
        inverse = [x.dim() - 1] + list(range(x.dim() - 1))
        return x.permute(*perm).contiguous().permute(*inverse)
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided_slice":
        # Every second entry of dim 1 of a tensor twice as wide: neither contiguous nor channels-last.
        wide = torch.zeros(x.shape[0], x.shape[1] * 2, *x.shape[2:], dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]
    raise ValueError(f"unknown layout {layout!r}")


def _tolerances():
    import torch

    # (atol relative to the largest expected magnitude, rtol), per dtype of the device-side computation. The
    # absolute part scales with the result because the outputs are sums of many terms (a deformable
    # convolution, a gradient scattered from many ROIs): their rounding error is proportional to the size of the
    # terms, not zero. Half types compare against float32 computed from the same (rounded) inputs, so what is
    # left is the kernels' own rounding: one rounding of the output (2^-11 for float16, 2^-8 for bfloat16) plus
    # half-precision intermediates (deform_conv2d's columns); a wrong index or a missing term is O(1) and fails.
    return {
        torch.float64: (1e-10, 1e-8),
        torch.float32: (1e-5, 1e-4),
        torch.float16: (5e-3, 5e-3),
        torch.bfloat16: (3e-2, 3e-2),
    }


def half_types():
    import torch

    return (torch.float16, torch.bfloat16)


def calc_dtype(dtype):
    """The dtype the CPU op and the reference run in: float32 for half types (the kernels accumulate in float;
    the CPU ops' half support is not the subject here), else the dtype itself."""
    import torch

    return torch.float32 if dtype in half_types() else dtype


def compare_tensors(actual, expected, dtype, loosen: float = 1.0, mismatch_fraction: Optional[float] = None
                    ) -> Dict[str, Any]:
    """One output against its expected value. Floating outputs: ``|a - e| <= atol * max(1, max|e|) + rtol * |e|``
    elementwise (NaN only where expected is NaN). Integer outputs: exact, or (``mismatch_fraction``) at most
    that fraction of differing entries (a panoptic argmax may flip where two logits tie to rounding)."""
    import torch

    if actual is None or expected is None:
        # Autograd's None gradient means zero (e.g. an FPN level that no ROI was assigned to, where the reference
        # leaves the level off the graph and the kernel returns zeros): equal to an all-zero tensor.
        other = expected if actual is None else actual
        ok = other is None or not bool(other.detach().cpu().count_nonzero())
        return {"ok": ok, "error": None if ok else f"{'actual' if actual is None else 'expected'} is None and the "
                                                  f"other side is nonzero"}
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    if tuple(a.shape) != tuple(e.shape):
        return {"ok": False, "error": f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"}
    if not e.is_floating_point():
        if a.is_floating_point():
            return {"ok": False, "error": f"dtype {a.dtype}, expected an integer tensor"}
        differ = int((a.long() != e.long()).sum()) if a.numel() else 0
        frac = differ / max(1, a.numel())
        limit = mismatch_fraction or 0.0
        return {"ok": frac <= limit, "mismatches": differ, "mismatch_fraction": round(frac, 6), "limit": limit}
    a = a.double()
    e = e.double()
    if e.numel() == 0:
        return {"ok": True, "max_abs_err": 0.0, "scale": 0.0, "worst": 0.0}
    atol, rtol = _tolerances()[dtype]
    atol, rtol = atol * loosen, rtol * loosen
    finite = torch.isfinite(e)
    nan_ok = bool(torch.equal(torch.isnan(a), torch.isnan(e)))
    # At least 1, the tests' absolute tolerance: a gradient that is zero up to rounding (fg_fusion with no stuff
    # channel, where fg == 1) must not shrink the bound to the rounding noise itself.
    scale = max(1.0, float(e[finite].abs().max()) if bool(finite.any()) else 0.0)
    both_nan = torch.isnan(e) & torch.isnan(a)
    err = torch.where(both_nan, torch.zeros_like(a), (a - e).abs())
    bound = atol * scale + rtol * e.abs()
    ratio = torch.where(both_nan, torch.zeros_like(err), err / bound)
    # NaN/inf errors are reported as 1e30 (the report stays strict JSON).
    worst = float(ratio.nan_to_num(nan=1e30, posinf=1e30).max())
    return {"ok": nan_ok and worst <= 1.0, "max_abs_err": float(err.nan_to_num(nan=1e30, posinf=1e30).max()),
            "scale": scale, "worst": round(worst, 4), **({} if nan_ok else {"error": "NaN pattern differs"})}


# ----------------------------------------------------------------------------------------------------------------
# The cases: for each op, master inputs (float64 / int64, CPU, seeded) and how to run them through an API module
# (eyecool_ext.ops or eyecool_ext.reference), returning every output and gradient by name.

class Case:
    def __init__(self, op: str, variant: str, make: Callable, run: Callable, dtypes: Sequence, layouts: Sequence[str],
                 layout_keys: Sequence[str] = (), mismatch_fraction: Optional[Dict] = None, integer: bool = False,
                 loosen: float = 1.0):
        self.op, self.variant, self.make, self.run = op, variant, make, run
        self.dtypes, self.layouts, self.layout_keys = list(dtypes), list(layouts), tuple(layout_keys)
        self.mismatch_fraction = mismatch_fraction or {}
        self.integer = integer  # dtypes are the id maps' integer dtypes
        self.loosen = loosen


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0):
    import torch

    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _rois(g, num, batch, img_h, img_w, min_size=0.5, max_frac=0.6):
    """[num, 5] (batch index, x1, y1, x2, y2), some partly outside the image (as in tests/ops)."""
    import torch

    size = torch.tensor([img_w, img_h], dtype=torch.float64)
    xy = torch.rand(num, 2, generator=g, dtype=torch.float64) * size * 1.2 - size * 0.1
    wh = torch.rand(num, 2, generator=g, dtype=torch.float64) * size * max_frac + min_size
    idx = torch.randint(0, max(1, batch), (num, 1), generator=g).double()
    return torch.cat([idx, xy, xy + wh], dim=1)


def _leaf(t):
    return t.detach().requires_grad_(True)


def _backward(outputs, grads) -> None:
    """``backward`` of the outputs that are on the autograd graph (an empty result may not be: the reference's
    multilevel pooler with no ROIs returns a fresh tensor); the others' gradient is zero anyway."""
    import torch

    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def _grads(outputs: Dict, inputs: Dict[str, Any]):
    """Adds ``grad_<name>`` of every leaf in ``inputs`` to ``outputs``."""
    for name, t in inputs.items():
        if isinstance(t, list):
            for i, ti in enumerate(t):
                outputs[f"grad_{name}{i}"] = ti.grad
        else:
            outputs[f"grad_{name}"] = t.grad
    return outputs


def roi_align_cases(quick: bool, dtypes, layouts) -> List[Case]:
    h, w, n, c, k = (9, 11, 2, 3, 8) if quick else (17, 23, 2, 6, 40)

    def make(seed=0, num=k, rois_non_contiguous=False, outside=False):
        def f():
            import torch

            g = _gen(seed)
            rois = _rois(g, num, n, h / 0.5, w / 0.5)
            if outside and num:
                rois[0, 1:] = torch.tensor([-60.0, -60.0, -30.0, -24.0], dtype=torch.float64)  # all outside
            if rois_non_contiguous:
                wide = torch.zeros(num, 10, dtype=torch.float64)
                wide[:, ::2] = rois
                rois = wide[:, ::2]  # a strided view: non-contiguous boxes
            return {"x": _randn(g, n, c, h, w), "rois": rois, "grad": _randn(g, num, c, 5, 4)}
        return f

    def run(aligned, sr):
        def f(api, t):
            x = _leaf(t["x"])
            out = api.roi_align(x, t["rois"], (5, 4), 0.5, sr, aligned)
            _backward([out], [t["grad"]])
            return _grads({"out": out}, {"x": x})
        return f

    cases = [Case("roi_align", "aligned_adaptive", make(), run(True, -1), dtypes, layouts, ["x"]),
             Case("roi_align", "legacy_sampling2", make(1), run(False, 2), dtypes, layouts, ["x"])]
    edge = dtypes[:2]
    cases += [Case("roi_align", "edge_empty_rois", make(2, num=0), run(True, -1), edge, ["contiguous"], ["x"]),
              Case("roi_align", "edge_noncontiguous_rois_and_outside", make(3, rois_non_contiguous=True, outside=True),
                   run(False, -1), edge, ["strided_slice"], ["x"])]
    return cases


SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def multilevel_cases(quick: bool, dtypes, layouts) -> List[Case]:
    img_h, img_w, n, c = (128, 96, 2, 3) if quick else (256, 192, 2, 4)
    k = 12 if quick else 32

    def make(seed=0, num=k):
        def f():
            import torch

            g = _gen(seed)
            # Box sizes from 8 to ~300 px, so that every level gets boxes (224 px maps to level 4).
            xy = torch.rand(num, 2, generator=g, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 0.8
            side = torch.exp(torch.rand(num, 1, generator=g, dtype=torch.float64) * math.log(300 / 8)) * 8
            aspect = torch.rand(num, 1, generator=g, dtype=torch.float64) + 0.5
            wh = torch.cat([side * aspect, side / aspect], dim=1)
            idx = torch.randint(0, n, (num, 1), generator=g).double()
            feats = [_randn(g, n, c, int(img_h * s), int(img_w * s)) for s in SCALES]
            return {"features": feats, "rois": torch.cat([idx, xy, xy + wh], dim=1), "grad": _randn(g, num, c, 7, 7)}
        return f

    def run(api, t):
        feats = [_leaf(f) for f in t["features"]]
        out = api.multilevel_roi_align(feats, t["rois"], 7, SCALES)
        _backward([out], [t["grad"]])
        return _grads({"out": out}, {"features": feats})

    return [Case("multilevel_roi_align", "fpn4", make(), run, dtypes, layouts, ["features"]),
            Case("multilevel_roi_align", "edge_empty_rois", make(1, num=0), run, dtypes[:2], ["contiguous"],
                 ["features"])]


def _conv_out(size, kernel, stride, pad, dil):
    return (size + 2 * pad - (dil * (kernel - 1) + 1)) // stride + 1


def deform_cases(quick: bool, dtypes, layouts) -> List[Case]:
    def make(seed=0, batch=2, cin=6, cout=4, size=(9, 10), kernel=(3, 3), stride=1, pad=1, dil=1, groups=1,
             offset_groups=1, masked=True, weight_non_contiguous=False):
        def f():
            import torch

            g = _gen(seed)
            kh, kw = kernel
            st, pd, dl = ((v, v) if isinstance(v, int) else v for v in (stride, pad, dil))
            oh, ow = _conv_out(size[0], kh, st[0], pd[0], dl[0]), _conv_out(size[1], kw, st[1], pd[1], dl[1])
            weight = _randn(g, cout, cin // groups, kh, kw)
            if weight_non_contiguous:
                weight = weight.transpose(0, 1).contiguous().transpose(0, 1)
            t = {"x": _randn(g, batch, cin, *size), "offset": _randn(g, batch, 2 * offset_groups * kh * kw, oh, ow,
                                                                     scale=2.0),
                 "weight": weight, "bias": _randn(g, cout), "grad": _randn(g, batch, cout, oh, ow)}
            t["mask"] = (torch.rand(batch, offset_groups * kh * kw, oh, ow, generator=g, dtype=torch.float64)
                         if masked else None)
            t["args"] = (stride, pad, dil)
            return t
        return f

    def run(api, t):
        x, offset, weight, bias = (_leaf(t[k]) for k in ("x", "offset", "weight", "bias"))
        mask = _leaf(t["mask"]) if t["mask"] is not None else None
        stride, pad, dil = t["args"]
        out = api.deform_conv2d(x, offset, weight, bias, stride, pad, dil, mask)
        _backward([out], [t["grad"]])
        leaves = {"x": x, "offset": offset, "weight": weight, "bias": bias}
        if mask is not None:
            leaves["mask"] = mask
        return _grads({"out": out}, leaves)

    # The layout goes to the input and the offsets; a non-contiguous mask is an edge case of its own (the
    # reference's mask.view() needs a contiguous mask: that failure then names the mask alone).
    keys = ["x", "offset"]
    cases = [Case("deform_conv2d", "v2", make(), run, dtypes, layouts, keys),
             Case("deform_conv2d", "v1_groups_offset_groups_stride2",
                  make(1, cin=6, cout=6, groups=2, offset_groups=3, stride=2, masked=False), run, dtypes, layouts,
                  keys)]
    if not quick:
        cases.append(Case("deform_conv2d", "v2_anisotropic_dilated",
                          make(2, kernel=(3, 2), stride=(1, 2), pad=(1, 0), dil=(2, 1), size=(8, 9)), run, dtypes,
                          layouts[:1], keys))
    edge = dtypes[:2]
    cases += [Case("deform_conv2d", "edge_batch0", make(3, batch=0), run, edge, ["contiguous"], keys),
              Case("deform_conv2d", "edge_noncontiguous_weight", make(4, weight_non_contiguous=True), run, edge,
                   ["strided_slice"], keys),
              Case("deform_conv2d", "edge_noncontiguous_mask", make(5), run, edge, ["channels_last"], ["mask"])]
    return cases


def fg_fusion_cases(quick: bool, dtypes, layouts) -> List[Case]:
    sem_size = (16, 20) if quick else (32, 40)
    # Integer pooling factors, a non-dividing size (overlapping adaptive windows) and a level larger than the map.
    level_sizes = [(16, 20), (8, 10), (5, 7)] if quick else [(32, 40), (16, 20), (8, 10), (5, 7), (40, 11)]

    def make(seed=0, channels=12, sizes=level_sizes):
        def f():
            g = _gen(seed)
            return {"sem": _randn(g, 2, channels, *sem_size, scale=3.0),
                    "levels": [_randn(g, 2, 3, *s) for s in sizes],
                    "grads": [_randn(g, 2, 3, *s) for s in sizes]}
        return f

    def run(num_stuff, mode):
        def f(api, t):
            sem = _leaf(t["sem"])
            levels = [_leaf(lv) for lv in t["levels"]]
            outs = api.fg_fusion(sem, levels, num_stuff, mode)
            _backward(list(outs), list(t["grads"]))
            res = {f"out{i}": o for i, o in enumerate(outs)}
            return _grads(res, {"sem": sem, "levels": levels})
        return f

    return [Case("fg_fusion", "logit", make(), run(5, "logit"), dtypes, layouts, ["sem", "levels"]),
            Case("fg_fusion", "prob", make(1), run(5, "prob"), dtypes, layouts, ["sem", "levels"]),
            Case("fg_fusion", "edge_num_stuff0_and_1x1_level", make(2, sizes=[(1, 1), (3, 3)]), run(0, "logit"),
                 dtypes[:2], ["contiguous"], ["sem"])]


def panoptic_cases(quick: bool, dtypes, layouts) -> List[Case]:
    num_stuff, num_things = 5, 4
    h, w = (12, 14) if quick else (40, 48)

    def make(seed=0, num=6, out_size=None):
        def f():
            import torch

            g = _gen(seed)
            oh, ow = out_size or (h, w)
            xy = torch.rand(num, 2, generator=g, dtype=torch.float64) * torch.tensor([ow, oh]) * 0.8
            wh = torch.rand(num, 2, generator=g, dtype=torch.float64) * torch.tensor([ow, oh]) * 0.5 + 1.5
            return {"sem": _randn(g, num_stuff + num_things, h, w, scale=2.0), "boxes": torch.cat([xy, xy + wh], 1),
                    "classes": torch.randint(0, num_things, (num,), generator=g),
                    "masks": _randn(g, num, 28, 28, scale=4.0), "size": out_size}
        return f

    def run(api, t):
        return {"labels": api.upsnet_panoptic_merge(t["sem"], num_stuff, t["boxes"], t["classes"], t["masks"],
                                                    t["size"])}

    import torch

    # Labels are argmaxes: a near-tie may flip between two correct implementations that round differently (FMA
    # contraction, float vs double), so a tiny fraction may differ; a wrong paste or index differs in many.
    frac = {torch.float64: 0.0, torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
    return [Case("upsnet_panoptic_merge", "same_size", make(), run, dtypes, layouts, ["sem"], frac),
            Case("upsnet_panoptic_merge", "upsampled_odd_size", make(1, out_size=(2 * h + 5, 2 * w + 5)), run,
                 dtypes, layouts, ["sem"], frac),
            Case("upsnet_panoptic_merge", "edge_no_instances", make(2, num=0), run, dtypes[:2], ["contiguous"],
                 ["sem"], frac)]


def pq_cases(quick: bool, int_dtypes) -> List[Case]:
    b, h, w = (2, 9, 13) if quick else (3, 33, 47)

    def make(seed=0, shape=(b, h, w), big_ids=False):
        def f():
            import torch

            g = _gen(seed)
            gt = torch.randint(0, 8, shape, generator=g)
            pred = torch.randint(0, 12, shape, generator=g)
            if big_ids and gt.numel():
                gt.view(-1)[::7] = 2**31 - 1  # the largest id the contract allows
            return {"gt": gt, "pred": pred}
        return f

    def run(api, t):
        image, gt, pred, counts = api.batched_pq_pair_counts(t["gt"], t["pred"])
        return {"image": image, "gt_id": gt, "pred_id": pred, "count": counts}

    import torch

    layouts = ["contiguous", "transposed", "strided_slice"]
    wide = [d for d in int_dtypes if d in (torch.int32, torch.int64)]
    return [Case("pq_pair_counts", "small_ids", make(), run, int_dtypes, layouts, ["gt", "pred"], integer=True),
            Case("pq_pair_counts", "ids_up_to_2^31-1", make(1, big_ids=True), run, wide, layouts[:1],
                 ["gt", "pred"], integer=True),
            Case("pq_pair_counts", "edge_empty_rows", make(2, shape=(2, 0, 5)), run, wide, ["contiguous"],
                 ["gt", "pred"], integer=True)]


def all_cases(device: str, quick: bool) -> List[Case]:
    import torch

    dtypes = [torch.float32, torch.float64]
    if device.startswith("cuda"):
        # The half kernels are CUDA's business (the CPU side of those comparisons runs in float32).
        dtypes += [torch.float16, torch.bfloat16]
    layouts = ["contiguous", "channels_last", "strided_slice"]
    ints = [torch.int64, torch.int32] if quick else [torch.int64, torch.int32, torch.int16, torch.uint8]
    return (roi_align_cases(quick, dtypes, layouts) + multilevel_cases(quick, dtypes, layouts)
            + deform_cases(quick, dtypes, layouts) + fg_fusion_cases(quick, dtypes, layouts)
            + panoptic_cases(quick, dtypes, layouts) + pq_cases(quick, ints))


def prepare(case: Case, master: Dict[str, Any], dtype, device: str, layout: str, upcast: bool) -> Dict[str, Any]:
    """The master inputs in ``dtype`` (rounded to it), then in ``calc_dtype(dtype)`` when ``upcast``, on
    ``device``, with ``layout`` applied to the case's layout keys. Upcasting after rounding gives the CPU and the
    reference exactly the values the half-precision kernel sees."""
    import torch

    def conv(x, key):
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point():
            x = x.to(dtype)
            if upcast:
                x = x.to(calc_dtype(dtype))
        elif case.integer:
            x = x.to(dtype)
        x = x.to(device)
        if key in case.layout_keys:
            x = to_layout(x, layout)
        return x

    return {k: [conv(x, k) for x in v] if isinstance(v, list) else conv(v, k) for k, v in master.items()}


def run_case(case: Case, dtype, layout: str, device: str, device_api=None, cpu_api=None, ref_api=None
             ) -> List[Dict[str, Any]]:
    """One (case, dtype, layout): the op on ``device`` against the compiled CPU op and against the reference
    (on ``device``, in ``calc_dtype``). Returns one row per comparison ("cpu", "reference")."""
    from eyecool_ext import ops, reference

    device_api = device_api or ops
    cpu_api = cpu_api or ops
    ref_api = ref_api or reference
    name = str(dtype).replace("torch.", "")
    base = {"op": case.op, "case": case.variant, "dtype": name, "layout": layout}
    master = case.make()
    t0 = time.perf_counter()
    try:
        actual = case.run(device_api, prepare(case, master, dtype, device, layout, upcast=False))
    except Exception as exc:  # noqa: BLE001  (a raising kernel is a finding, reported with its message)
        err = f"{device} op raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return [dict(base, against=a, ok=False, error=err) for a in ("cpu", "reference")]
    rows = []
    for against, api, dev in (("cpu", cpu_api, "cpu"), ("reference", ref_api, device)):
        row = dict(base, against=against)
        try:
            expected = case.run(api, prepare(case, master, dtype, dev, layout, upcast=True))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(row, ok=False, error=f"{against} raised {type(exc).__name__}: {exc}"[:400]))
            continue
        outputs, ok, worst, worst_key, errors = {}, True, 0.0, None, []
        for key in actual:
            a, e = actual[key], expected.get(key, None)
            if key not in expected:
                errors.append(f"{key}: missing on the {against} side")
                ok = False
                continue
            if a is not None and a.is_floating_point() and not case.integer and a.dtype != dtype:
                errors.append(f"{key}: dtype {a.dtype}, expected {dtype}")
                ok = False
            res = compare_tensors(a, e, dtype, case.loosen, case.mismatch_fraction.get(dtype))
            outputs[key] = {k: v for k, v in res.items() if k != "ok"}
            if not res["ok"]:
                ok = False
                if "error" in res and res["error"]:
                    errors.append(f"{key}: {res['error']}")
            w = res.get("worst", res.get("mismatch_fraction", 0.0)) or 0.0
            if w >= worst:
                worst, worst_key = w, key
        row.update(ok=ok, worst=worst, worst_output=worst_key, outputs=outputs)
        if errors:
            row["error"] = "; ".join(errors)[:400]
        rows.append(row)
    for r in rows:
        r["seconds"] = round(time.perf_counter() - t0, 3)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Inputs of more than 2^31 elements (CUDA only): the kernels' 64-bit indexing. The whole tensor runs on the GPU;
# the CPU recomputes a few slices from the slice of the input they depend on (the whole would take the CPU
# minutes), in float32 from the same half-precision values. ``small=True`` runs the same slicing at tiny shapes
# (the CPU self-test of that logic).

TWO31 = 2**31


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _free_gib(device) -> float:
    import torch

    if not str(device).startswith("cuda"):
        return math.inf
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2**30


# The CPU side of every slice: the compiled CPU op and the reference, both on the CPU (the slices are small).
SLICE_APIS = ("cpu", "reference")


def _slice_api(against: str):
    from eyecool_ext import ops, reference

    return ops if against == "cpu" else reference


def _slice_rows(op: str, case: str, dtype, pairs: List[tuple], extra: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per (against, slice label, actual on the device, expected from that slice on the CPU)."""
    rows = []
    for against, label, actual, expected in pairs:
        res = compare_tensors(actual, expected, dtype)
        rows.append({"op": op, "case": case, "dtype": str(dtype).replace("torch.", ""), "layout": "contiguous",
                     "against": against, "slice": label, "ok": res["ok"], "worst": res.get("worst"),
                     "outputs": {label: {k: v for k, v in res.items() if k != "ok"}}, **extra})
    return rows


def large_fg_fusion(device: str, dtype, small: bool = False) -> List[Dict[str, Any]]:
    """sem_logits [1, 133, 4096, 4096] (COCO's 53 stuff + 80 things; 2.23e9 elements, 4.5 GB in half precision),
    five levels with pooling factors 1..16; slices: the top-left and the bottom-right 64 x 64 pixels (aligned to
    the coarsest window, so every level's crop depends on that pixel crop only). Every pixel's softmax reads
    channels whose offsets pass 2^31 (channel >= 128)."""
    import torch
    from eyecool_ext import ops

    calc = calc_dtype(dtype)  # the CPU side's dtype
    c, hw, num_stuff, crop = (13, 128, 5, 32) if small else (133, 4096, 53, 64)
    factors = [1, 2, 4, 8, 16]
    g = torch.Generator(device=device).manual_seed(0)
    sem = torch.randn(1, c, hw, hw, device=device, dtype=dtype, generator=g).mul_(3).requires_grad_()
    assert small or sem.numel() > TWO31
    levels = [torch.randn(1, 3, hw // f, hw // f, device=device, dtype=dtype, generator=g).requires_grad_()
              for f in factors]
    grads = [torch.randn_like(lv) for lv in levels]
    t0 = time.perf_counter()
    outs = ops.fg_fusion(sem, levels, num_stuff, "logit")
    torch.autograd.backward(outs, grads)
    _sync(device)
    gpu_s = time.perf_counter() - t0
    pairs = []
    for corner, r0 in (("top_left", 0), ("bottom_right", hw - crop)):
        for against in SLICE_APIS:
            def crop_of(t, f):  # the crop's pixels at a level f times coarser, on the CPU in calc
                return t.detach()[:, :, r0 // f:(r0 + crop) // f, r0 // f:(r0 + crop) // f].cpu().to(calc)

            sem_c = crop_of(sem, 1).requires_grad_()
            lv_c = [crop_of(lv, f).requires_grad_() for lv, f in zip(levels, factors)]
            gr_c = [crop_of(gr, f) for gr, f in zip(grads, factors)]
            exp = _slice_api(against).fg_fusion(sem_c, lv_c, num_stuff, "logit")
            torch.autograd.backward(exp, gr_c)
            for i, f in enumerate(factors):
                sl = (slice(None), slice(None), slice(r0 // f, (r0 + crop) // f), slice(r0 // f, (r0 + crop) // f))
                pairs.append((against, f"{corner}/out{i}", outs[i].detach()[sl], exp[i]))
                pairs.append((against, f"{corner}/grad_level{i}", levels[i].grad[sl], lv_c[i].grad))
            pairs.append((against, f"{corner}/grad_sem", sem.grad[:, :, r0:r0 + crop, r0:r0 + crop], sem_c.grad))
    shape = f"sem {list(sem.shape)} ({sem.numel():.3g} elements)"
    return _slice_rows("fg_fusion", "large_>2^31", dtype, pairs, {"shape": shape, "gpu_seconds": round(gpu_s, 3)})


def large_roi_align(device: str, dtype, small: bool = False) -> List[Dict[str, Any]]:
    """input [2, 256, 1536, 2816] (2.21e9 elements, 4.4 GB in half precision), 24 ROIs per image; slices:
    channels 0-3 and 252-255 of each image (image 1's high channels lie past 2^31), recomputed on the CPU from
    that channel slice of that image alone (ROIAlign is per channel and per image)."""
    import torch
    from eyecool_ext import ops

    calc = calc_dtype(dtype)  # the CPU side's dtype
    n, c, h, w, per_image = (2, 16, 48, 80, 6) if small else (2, 256, 1536, 2816, 24)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(n, c, h, w, device=device, dtype=dtype, generator=g).requires_grad_()
    assert small or x.numel() > TWO31
    gc = _gen(1)
    rois = torch.cat([_rois(gc, per_image, 1, h, w, min_size=8.0, max_frac=0.1) for _ in range(n)])
    rois[:, 0] = torch.arange(n, dtype=torch.float64).repeat_interleave(per_image)
    rois = rois.to(device=device, dtype=dtype)
    t0 = time.perf_counter()
    out = ops.roi_align(x, rois, 7, 1.0, 2, True)
    grad = torch.randn_like(out)
    out.backward(grad)
    _sync(device)
    gpu_s = time.perf_counter() - t0
    pairs = []
    for b in range(n):
        sel = (rois[:, 0] == b).nonzero().flatten()
        rois_b = rois[sel].cpu().to(calc)
        rois_b[:, 0] = 0
        for c0, c1 in ((0, 4), (c - 4, c)):
            for against in SLICE_APIS:
                xs = x.detach()[b:b + 1, c0:c1].cpu().to(calc).requires_grad_()
                exp = _slice_api(against).roi_align(xs, rois_b, 7, 1.0, 2, True)
                exp.backward(grad[sel, c0:c1].cpu().to(calc))
                label = f"image{b}/channels{c0}-{c1 - 1}"
                pairs.append((against, f"{label}/out", out.detach()[sel, c0:c1], exp))
                pairs.append((against, f"{label}/grad_input", x.grad[b:b + 1, c0:c1], xs.grad))
    shape = f"input {list(x.shape)} ({x.numel():.3g} elements)"
    return _slice_rows("roi_align", "large_>2^31", dtype, pairs, {"shape": shape, "gpu_seconds": round(gpu_s, 3)})


def large_deform_conv2d(device: str, dtype, small: bool = False) -> List[Dict[str, Any]]:
    """input [512, 16, 520, 520] (2.21e9 elements, 4.4 GB in half precision), 3x3 DCN v2, stride 2, 16 output
    channels; slices: images 0, 255 and 511 (the last image's input lies past 2^31), recomputed on the CPU from
    that image alone. grad_weight and grad_bias sum over all images, so a slice cannot check them; every other
    output and gradient is per image."""
    import torch
    from eyecool_ext import ops

    calc = calc_dtype(dtype)  # the CPU side's dtype
    n, cin, cout, hw = (6, 4, 4, 20) if small else (512, 16, 16, 520)
    oh = _conv_out(hw, 3, 2, 1, 1)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(n, cin, hw, hw, device=device, dtype=dtype, generator=g).requires_grad_()
    assert small or x.numel() > TWO31
    offset = torch.randn(n, 18, oh, oh, device=device, dtype=dtype, generator=g).mul_(2).requires_grad_()
    mask = torch.rand(n, 9, oh, oh, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(cout, cin, 3, 3, device=device, dtype=dtype, generator=g) / 12).requires_grad_()
    bias = torch.randn(cout, device=device, dtype=dtype, generator=g).requires_grad_()
    t0 = time.perf_counter()
    out = ops.deform_conv2d(x, offset, weight, bias, 2, 1, 1, mask)
    grad = torch.randn_like(out)
    out.backward(grad)
    _sync(device)
    gpu_s = time.perf_counter() - t0
    pairs = []
    for i in (0, n // 2 - 1, n - 1):
        for against in SLICE_APIS:
            xs, os_, ms = (t.detach()[i:i + 1].cpu().to(calc).requires_grad_() for t in (x, offset, mask))
            ws, bs = weight.detach().cpu().to(calc), bias.detach().cpu().to(calc)
            exp = _slice_api(against).deform_conv2d(xs, os_, ws, bs, 2, 1, 1, ms)
            exp.backward(grad[i:i + 1].cpu().to(calc))
            pairs += [(against, f"image{i}/out", out.detach()[i:i + 1], exp),
                      (against, f"image{i}/grad_input", x.grad[i:i + 1], xs.grad),
                      (against, f"image{i}/grad_offset", offset.grad[i:i + 1], os_.grad),
                      (against, f"image{i}/grad_mask", mask.grad[i:i + 1], ms.grad)]
    shape = f"input {list(x.shape)} ({x.numel():.3g} elements)"
    return _slice_rows("deform_conv2d", "large_>2^31", dtype, pairs, {"shape": shape, "gpu_seconds": round(gpu_s, 3)})


# (function, dtype name, GiB of free device memory it needs: tensors, gradients and float accumulators)
# (Estimates with headroom for a backward that keeps a float32 copy; an H200 has ~139 GiB, an 80 GB H100 fits all.)
LARGE_CASES = [(large_fg_fusion, "bfloat16", 24), (large_roi_align, "float16", 24),
               (large_deform_conv2d, "float16", 40)]


def run_large_cases(device: str, small: bool = False) -> List[Dict[str, Any]]:
    """Every >2^31 case in its dtype (``small``: at tiny shapes, the CPU self-test)."""
    import torch

    rows = []
    for fn, dtype_name, need in LARGE_CASES:
        op = fn.__name__[len("large_"):]
        base = {"op": op, "case": "large_>2^31", "dtype": dtype_name, "layout": "contiguous", "against": "cpu"}
        free = _free_gib(device)
        if free < need:
            rows.append(dict(base, ok=True, skipped=f"needs ~{need} GiB of free device memory, {free:.1f} free"))
            continue
        t0 = time.perf_counter()
        try:
            new = fn(device, getattr(torch, dtype_name), small=small)
        except Exception as exc:  # noqa: BLE001
            new = [dict(base, ok=False, error=f"{type(exc).__name__}: {exc}"[:400])]
        finally:
            torch.cuda.empty_cache()
        for r in new:
            r["seconds"] = round(time.perf_counter() - t0, 3)  # the whole case's, GPU run and CPU slices
        rows += new
    return rows


def compare_all(device: str, quick: bool, large: bool = True, cases: Optional[List[Case]] = None
                ) -> List[Dict[str, Any]]:
    """Every case over its dtypes and layouts (and, on CUDA unless ``quick``, the large inputs)."""
    import torch

    rows = []
    for case in cases if cases is not None else all_cases(device, quick):
        for dtype in case.dtypes:
            for layout in case.layouts:
                rows += run_case(case, dtype, layout, device)
    if large and device.startswith("cuda") and not quick:
        rows += run_large_cases(device)
    return rows


def smoke(device: str) -> int:
    """One forward and backward of every op on ``device`` (float32 and float16, contiguous and strided, plus the
    empty cases): what compute-sanitizer watches. Results are not compared here (the compare step does that);
    any exception fails."""
    import torch
    from eyecool_ext import ops

    count = 0
    for case in all_cases(device, quick=True):
        for dtype in case.dtypes:
            if dtype not in (torch.float32, torch.float16, torch.int32, torch.int64):
                continue
            for layout in case.layouts[:1] + [lay for lay in case.layouts if lay == "strided_slice"]:
                out = case.run(ops, prepare(case, case.make(), dtype, device, layout, upcast=False))
                for v in out.values():
                    if v is not None:
                        v.sum().item() if v.numel() else None  # waits for the kernels
                count += 1
    torch.cuda.synchronize() if device.startswith("cuda") else None
    return count


# ----------------------------------------------------------------------------------------------------------------
# Timing

def _timer(device: str):
    import torch

    if device.startswith("cuda"):
        def once(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def once(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return once


def time_paired(ours: Callable, peer: Optional[Callable], device: str, warmup: int = 5, repeat: int = 30,
                max_seconds: float = 3.0) -> Dict[str, Any]:
    """Medians (ms) of ``ours`` and ``peer`` timed in alternation in one run (CUDA events on CUDA: device time
    between the two events, launch overheads included, no host synchronisation inside), after ``warmup`` runs
    of each. Alternation exposes both to the same clocks and thermal state, so their ratio is steadier."""
    once = _timer(device)
    for _ in range(warmup):
        once(ours)
        if peer is not None:
            once(peer)
    a, b = [], []
    t0 = time.perf_counter()
    for _ in range(repeat):
        a.append(once(ours))
        if peer is not None:
            b.append(once(peer))
        if time.perf_counter() - t0 > max_seconds and len(a) >= 3:
            break
    res = {"ours_ms": statistics.median(a), "ours_min_ms": min(a), "runs": len(a)}
    if peer is not None:
        res.update(peer_ms=statistics.median(b), peer_min_ms=min(b))
        res["speedup"] = res["peer_ms"] / res["ours_ms"] if res["ours_ms"] > 0 else None
    return res


def kernel_split(fn: Callable, device: str, runs: int = 5, top: int = 5) -> List[Dict[str, Any]]:
    """The top kernels of ``fn`` by CUDA time (self time per run, µs, and share of the op's kernel time) from
    torch.profiler; on the CPU, the top operators by self CPU time instead."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(runs):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()

    def device_time(e):
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0

    if cuda:
        cuda_type = getattr(torch.autograd, "DeviceType", None)
        kernels = [e for e in events if cuda_type is not None and getattr(e, "device_type", None) == cuda_type.CUDA]
        if not kernels:  # older profilers do not tag the kernel entries: keep whatever has self CUDA time
            kernels = [e for e in events if device_time(e) > 0]
        key = device_time
    else:
        kernels = [e for e in events if e.self_cpu_time_total > 0]

        def key(e):
            return float(e.self_cpu_time_total)
    total = sum(key(e) for e in kernels) or 1.0
    kernels.sort(key=key, reverse=True)
    return [{"name": e.key[:120], "calls_per_run": e.count / runs, "us_per_run": round(key(e) / runs, 2),
             "share": round(key(e) / total, 3)} for e in kernels[:top]]


def _deform_bench(dev, dtype, name, s, fwd_bwd):
    # A function of its own, so that each dtype's closures hold that dtype's tensors.
    import torch
    import torchvision
    from eyecool_ext import ops

    c, h, w = 128 // s, 128 // s, 256 // s
    xd = torch.randn(2, c, h, w, device=dev, dtype=dtype, requires_grad=True)
    off = (torch.randn(2, 18, h, w, device=dev, dtype=dtype) * 2).requires_grad_()
    msk = torch.rand(2, 9, h, w, device=dev, dtype=dtype, requires_grad=True)
    wt = (torch.randn(c, c, 3, 3, device=dev, dtype=dtype) / (3 * c ** 0.5)).requires_grad_()
    bs = torch.randn(c, device=dev, dtype=dtype, requires_grad=True)

    def ours():
        return ops.deform_conv2d(xd, off, wt, bs, 1, 1, 1, msk)

    def tv():
        return torchvision.ops.deform_conv2d(xd, off, wt, bs, 1, 1, 1, msk)

    leaves = [xd, off, wt, bs, msk]
    return [("deform_conv2d", f"fwd v2 {c}->{c} {h}x{w}", name, ours, "torchvision", tv),
            ("deform_conv2d", f"fwd+bwd v2 {c}->{c} {h}x{w}", name, fwd_bwd(ours, leaves), "torchvision",
             fwd_bwd(tv, leaves))]


def bench_cases(device: str, quick: bool) -> List[Dict[str, Any]]:
    """(op, case, dtype, ours, peer name, peer) for every op; shapes of the network (FPN P2 at batch 2, the
    semantic branch's deformable 3x3 at 128 channels, 1/4-scale semantic logits of a 1024 x 2048 image)."""
    import torch
    import torchvision
    from eyecool_ext import ops, reference

    dev = device
    s = 4 if quick else 1  # --quick: smaller shapes (the CPU self-test)
    cases = []

    def fwd_bwd(call, leaves):
        def f():
            out = call()
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        return f

    for dtype in (torch.float32, torch.float16):
        if not dev.startswith("cuda") and dtype == torch.float16:
            continue
        name = str(dtype).replace("torch.", "")
        # roi_align: FPN P2 map of a 2-image batch, 512 ROIs, 7 x 7, sampling 2, aligned.
        x = torch.randn(2, 256 // s, 200 // s, 272 // s, device=dev, dtype=dtype, requires_grad=True)
        rois = _rois(_gen(0), 512 // s, 2, 800 // s, 1088 // s, min_size=16, max_frac=0.3).to(dev, dtype)
        args = (7, 0.25, 2, True)
        cases.append(("roi_align", "fwd P2 512 rois", name, lambda x=x, r=rois: ops.roi_align(x, r, *args),
                      "torchvision", lambda x=x, r=rois: torchvision.ops.roi_align(x, r, *args)))
        cases.append(("roi_align", "fwd+bwd P2 512 rois", name,
                      fwd_bwd(lambda x=x, r=rois: ops.roi_align(x, r, *args), [x]), "torchvision",
                      fwd_bwd(lambda x=x, r=rois: torchvision.ops.roi_align(x, r, *args), [x])))
        # deform_conv2d: the semantic branch's 3x3 128 -> 128 at 1/8 scale of a 1024 x 2048 image, batch 2, v2.
        cases += _deform_bench(dev, dtype, name, s, fwd_bwd)
    dtype = torch.float32
    # multilevel_roi_align: 4 FPN levels of a 2-image 800 x 1088 batch, 512 ROIs; peer: detectron2's way, the
    # level assignment then one torchvision roi_align per level.
    feats = [torch.randn(2, 256 // s, int(800 * sc) // s, int(1088 * sc) // s, device=dev, dtype=dtype,
                         requires_grad=True) for sc in SCALES]
    rois = _rois(_gen(1), 512 // s, 2, 800 // s, 1088 // s, min_size=16, max_frac=0.5).to(dev, dtype)
    scales_s = SCALES  # the maps shrink with the image under --quick: the same scales

    def tv_pooler():
        level = reference.fpn_level_index(rois, 2, 5)
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], 7, 7)
        for i, (f, sc) in enumerate(zip(feats, scales_s)):
            idx = (level == i).nonzero().flatten()
            out[idx] = torchvision.ops.roi_align(f, rois[idx], 7, sc, 0, True)
        return out

    cases.append(("multilevel_roi_align", "fwd 4 levels 512 rois", "float32",
                  lambda: ops.multilevel_roi_align(feats, rois, 7, scales_s), "torchvision per level", tv_pooler))
    # fg_fusion: 1/4-scale logits of a 1024 x 2048 image, 133 classes, 5 RPN levels.
    sem = torch.randn(1, 133, 256 // s, 512 // s, device=dev, dtype=dtype, requires_grad=True)
    levels = [torch.randn(1, 3, 256 // s // f, 512 // s // f, device=dev, dtype=dtype, requires_grad=True)
              for f in (1, 2, 4, 8, 16)]

    def fg(api):
        def f():
            outs = api.fg_fusion(sem, levels, 53, "logit")
            torch.autograd.grad(outs, [sem, *levels], [torch.ones_like(o) for o in outs])
        return f

    cases.append(("fg_fusion", "fwd+bwd 133 classes 256x512", "float32", fg(ops), "eager reference", fg(reference)))
    # upsnet_panoptic_merge: 1/4-scale logits upsampled to 1024 x 2048 on the fly, 50 instances.
    sem3 = torch.randn(133, 256 // s, 512 // s, device=dev, dtype=dtype)
    gb = _gen(2)
    oh, ow = 1024 // s, 2048 // s
    xy = torch.rand(50, 2, generator=gb, dtype=torch.float64) * torch.tensor([ow, oh]) * 0.8
    wh = torch.rand(50, 2, generator=gb, dtype=torch.float64) * torch.tensor([ow, oh]) * 0.3 + 4
    boxes = torch.cat([xy, xy + wh], 1).to(dev, dtype)
    classes = torch.randint(0, 80, (50,), generator=gb).to(dev)
    masks = torch.randn(50, 28, 28, device=dev, dtype=dtype) * 4
    merge = lambda api: (lambda: api.upsnet_panoptic_merge(sem3, 53, boxes, classes, masks, (oh, ow)))  # noqa: E731
    cases.append(("upsnet_panoptic_merge", f"50 instances -> {oh}x{ow}", "float32", merge(ops), "eager reference",
                  merge(reference)))
    # pq_pair_counts: 4 images of 1024 x 2048 id maps.
    gt = torch.randint(0, 60, (4, 1024 // s, 2048 // s), device=dev, dtype=torch.int32)
    pred = torch.randint(0, 80, (4, 1024 // s, 2048 // s), device=dev, dtype=torch.int32)
    cases.append(("pq_pair_counts", f"4 x {1024 // s}x{2048 // s} int32", "int32",
                  lambda: ops.batched_pq_pair_counts(gt, pred), "eager reference (torch.unique)",
                  lambda: reference.batched_pq_pair_counts(gt, pred)))
    return cases


def _max_abs_diff(a, b) -> Optional[float]:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return math.inf
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b) and a:
        diffs = [_max_abs_diff(x, y) for x, y in zip(a, b)]
        return None if any(d is None for d in diffs) else max(diffs)
    return None


def bench_all(device: str, quick: bool) -> List[Dict[str, Any]]:
    rows = []
    repeat, warmup, max_s = (3, 1, 1.0) if quick else (30, 5, 3.0)
    for op, case, dtype, ours, peer_name, peer in bench_cases(device, quick):
        row = {"op": op, "case": case, "dtype": dtype, "device": device, "peer": peer_name}
        try:
            mine = ours()
            try:
                theirs = peer()
                # That both sides compute the same thing (forward cases; a fwd+bwd step returns nothing). Reported,
                # not judged: the compare step is the correctness check.
                diff = _max_abs_diff(mine, theirs)
                if diff is not None:
                    row["max_abs_diff_vs_peer"] = diff
            except Exception as exc:  # noqa: BLE001  (the peer's limits, e.g. a dtype it lacks, are not ours)
                row["peer_error"] = f"{type(exc).__name__}: {exc}"[:200]
                peer = None
            row.update(time_paired(ours, peer, device, warmup, repeat, max_s))
            row["ok"] = True
            try:
                row["top_kernels"] = kernel_split(ours, device, runs=2 if quick else 5)
            except Exception as exc:  # noqa: BLE001  (no CUPTI on some runtimes: the timings still stand)
                row["top_kernels"] = []
                row["top_kernels_error"] = f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:  # noqa: BLE001
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Workers (one step each, in their own process) and the orchestrator

def _worker(step: str, device: str, quick: bool, out_path: str) -> int:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    # The comparisons measure eyecool's kernels, not cuBLAS's reduced-precision modes: full-precision GEMMs
    # (deform_conv2d's im2col GEMM is at::mm) on both sides.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    import eyecool_ext

    result: Dict[str, Any] = {"extension": getattr(eyecool_ext._extension._C, "__file__", None)}
    if device.startswith("cuda") and not eyecool_ext.compiled_with_cuda():
        # Every op would run its reference fallback on CUDA, and the comparisons would compare it to itself.
        result.update(ok=False, error=f"eyecool_ext has no CUDA kernels (load error: {eyecool_ext.load_error()})")
    elif step == "smoke":
        result.update(ok=True, calls=smoke(device))
        print(f"gpu-smoke: ok ({result['calls']} op calls)")
    elif step == "compare":
        rows = compare_all(device, quick)
        result.update(ok=all(r["ok"] for r in rows), rows=rows)
    elif step == "bench":
        rows = bench_all(device, quick)
        result.update(ok=all(r["ok"] for r in rows), rows=rows)
    else:
        raise ValueError(step)
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    return 0 if result["ok"] else 1


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    paths = [ROOT, os.path.join(ROOT, "python")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _run(cmd: List[str], timeout: float, log_path: str, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Runs ``cmd`` in its own process group (killed whole on timeout: compute-sanitizer has a child), output to
    ``log_path``."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, timed_out = None, True
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 1), "log": log_path}


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def find_compute_sanitizer() -> Optional[str]:
    exe = shutil.which("compute-sanitizer")
    if exe:
        return exe
    import glob

    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + sorted(glob.glob("/opt/nvidia/*"), reverse=True)
    for root in roots:
        if root:
            for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
                cand = os.path.join(root, rel)
                if os.path.isfile(cand) and os.access(cand, os.X_OK):
                    return cand
    return None


def step_build(timeout: float, work: str) -> Dict[str, Any]:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    env = _env()
    env["FORCE_CUDA"] = "1"
    # The real kernels are what this machine can check; the host-code emulation of them (the GPU-less machines'
    # stand-in, which `make` builds by default) would only add compile time.
    env["EYECOOL_CUDA_EMULATION"] = "0"
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    res = _run([sys.executable, "setup.py", "build_ext", "--inplace"], timeout, os.path.join(work, "build.log"), env)
    res.update(arch=env["TORCH_CUDA_ARCH_LIST"], max_jobs=env["MAX_JOBS"], build_seconds=res["seconds"])
    res["ok"] = res["rc"] == 0
    if res["ok"]:
        probe = ("import eyecool_ext, sys; print(eyecool_ext._extension._C.__file__ if eyecool_ext.compiled() else "
                 "None); sys.exit(0 if eyecool_ext.compiled_with_cuda() else 3)")
        check = _run([sys.executable, "-c", probe], 120, os.path.join(work, "build_probe.log"))
        res["ok"] = check["rc"] == 0
        res["extension"] = _tail(check["log"], 3).strip()
        if not res["ok"]:
            res["error"] = "the built eyecool_ext does not load with CUDA kernels: " + _tail(check["log"], 5)
    else:
        res["error"] = _tail(res["log"])
    return res


def step_sanitize(timeout: float, work: str, quick: bool) -> Dict[str, Any]:
    exe = find_compute_sanitizer()
    if exe is None:
        return {"ok": False, "error": "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"}
    env = _env()
    # Every tensor its own cudaMalloc: with the caching allocator, an overrun usually lands inside a larger
    # cached block that memcheck considers valid.
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    env.setdefault("CUDA_MODULE_LOADING", "LAZY")  # instrument only the kernels that run, not all of torch's
    cmd = [exe, "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "50",
           sys.executable, SCRIPT, "--worker", "smoke", "--device", "cuda"]
    res = _run(cmd, timeout, os.path.join(work, "sanitize.log"), env)
    text = _tail(res["log"], 400)
    summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line]
    res["summary"] = summary[-1].strip() if summary else None
    errors = None
    if res["summary"]:
        try:
            errors = int(res["summary"].split("ERROR SUMMARY:")[1].split()[0])
        except (IndexError, ValueError):
            errors = None
    res["errors"] = errors
    # Passed only if the script ran to its end under the sanitizer and memcheck counted no error.
    res["ok"] = res["rc"] == 0 and "gpu-smoke: ok" in text and errors == 0
    if not res["ok"] and "Device not supported" in text:
        # Some GPU runtimes (gVisor) refuse the sanitizer outright: nothing about the kernels is known, so the
        # step is reported as unavailable, neither passed nor a failure of the code.
        res.update(ok=True, unavailable="compute-sanitizer does not support this device/runtime "
                                        "(\"Device not supported\"); memcheck did not run")
        return res
    if not res["ok"]:
        res["error"] = ("timed out" if res["timed_out"] else f"rc {res['rc']}, {res['summary']}") + "\n" + \
            "\n".join(line for line in text.splitlines() if "=========" in line or "Error" in line)[-3000:]
    return res


def step_worker(step: str, timeout: float, work: str, quick: bool) -> Dict[str, Any]:
    out = os.path.join(work, f"{step}.json")
    if os.path.exists(out):
        os.remove(out)
    res = _run([sys.executable, SCRIPT, "--worker", step, "--device", "cuda", "--out", out]
               + (["--quick"] if quick else []), timeout, os.path.join(work, f"{step}.log"))
    try:
        with open(out, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {"ok": False, "error": "the worker wrote no result: " + _tail(res["log"])}
    res.update(data)
    res["ok"] = bool(data.get("ok")) and res["rc"] == 0
    if res["timed_out"]:
        res["error"] = "timed out"
    return res


def step_tests(timeout: float, work: str, quick: bool) -> Dict[str, Any]:
    # The op tests' CUDA parametrisations; not the host-code emulation of the CUDA kernels ("cuda_emulated"
    # devices and test_cuda_emulation.py, present when the build has it), which is the GPU-less machines' check.
    cmd = [sys.executable, "-m", "pytest", "tests/ops", "-q", "-k", "cuda and not emulat", "-p", "no:cacheprovider"]
    # Four pytest workers where pytest-xdist is installed (the GPU image has it): the torch.compile and fuzz tests
    # are CPU-bound, and one GPU serves four processes' small kernels easily.
    import importlib.util

    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "4"]
    res = _run(cmd, timeout, os.path.join(work, "tests.log"))
    # pytest's last line: "[=== ]12 passed, 3 skipped, 900 deselected in 41.20s[ ===]" (any of the counts).
    pattern = re.compile(r"^=*\s*((?:\d+ \w+)(?:, \d+ \w+)*) in [\d.]+s")
    last = [m for m in (pattern.match(line.strip()) for line in _tail(res["log"], 30).splitlines()) if m]
    res["summary"] = last[-1].group(0).strip("= ") if last else None
    counts = {}
    if last:
        for part in last[-1].group(1).split(","):
            number, word = part.split()
            counts[word] = int(number)
    res["counts"] = counts
    # pytest exits 0 only when something ran and nothing failed; "0 selected" (exit 5) means the CUDA
    # parametrisations were missing, which is a failure here.
    res["ok"] = res["rc"] == 0 and counts.get("passed", 0) > 0
    if not res["ok"]:
        res["error"] = "timed out" if res["timed_out"] else _tail(res["log"], 25)
    return res


def machine_info() -> Dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def summarize(report: Dict[str, Any]) -> str:
    unavailable = [n for n, st in report["steps"].items() if st.get("status") == "unavailable"]
    verdict = ("PASSED" if report["ok"] else "FAILED") + (f" ({', '.join(unavailable)} could not run here)"
                                                          if unavailable else "")
    lines = [f"gpu-check on {report['machine'].get('gpu', report['device'])} "
             f"(torch {report['machine']['torch']}): {verdict}", "",
             f"{'step':10s} {'status':8s} {'seconds':>8s}  detail"]
    for name, st in report["steps"].items():
        detail = ""
        if name == "build" and "build_seconds" in st:
            detail = f"build {st['build_seconds']} s, arch {st.get('arch')}, {st.get('max_jobs')} jobs"
        elif name == "sanitize":
            detail = st.get("unavailable") or st.get("summary") or ""
        elif name in ("compare", "bench") and "rows" in st:
            rows = st["rows"]
            bad = [r for r in rows if not r.get("ok")]
            skipped = [r for r in rows if r.get("skipped")]
            detail = f"{len(rows) - len(bad)}/{len(rows)} ok" + (f", {len(skipped)} skipped" if skipped else "")
            for r in bad[:8]:
                detail += (f"\n{'':29s}FAIL {r.get('op')} {r.get('case', '')} {r.get('slice', '')} "
                           f"{r.get('dtype', '')} {r.get('layout', '')}"
                           f" vs {r.get('against', r.get('peer', ''))}: {r.get('error') or r.get('worst_output')}"
                           f" (worst {r.get('worst')})")
        elif name == "tests":
            detail = st.get("summary") or ""
        if st.get("status") == "skipped":
            detail = st.get("reason", "")
        elif not st.get("ok") and st.get("error") and name not in ("compare", "bench"):
            detail += ("\n" if detail else "") + "\n".join("    " + x for x in str(st["error"]).splitlines()[-8:])
        lines.append(f"{name:10s} {st.get('status', '?'):8s} {st.get('seconds', 0):>8}  {detail}")
    bench = report["steps"].get("bench", {}).get("rows")
    if bench:
        lines += ["", f"{'op':22s} {'case':30s} {'dtype':8s} {'ours ms':>9s} {'peer ms':>9s} {'ratio':>6s}  "
                      f"peer / top kernel"]
        for r in bench:
            head = f"{str(r.get('op', '?')):22s} {str(r.get('case', ''))[:30]:30s} {str(r.get('dtype', '')):8s}"
            if not r.get("ok") or not isinstance(r.get("ours_ms"), (int, float)):
                lines.append(f"{head} FAILED {r.get('error')}")
                continue
            top = r["top_kernels"][0]["name"][:50] if r.get("top_kernels") else ""
            peer = f"{r['peer_ms']:9.3f}" if r.get("peer_ms") is not None else f"{'-':>9s}"
            ratio = f"{r['speedup']:6.2f}" if r.get("speedup") else f"{'-':>6s}"
            lines.append(f"{head} {r['ours_ms']:9.3f} {peer} {ratio}  {r.get('peer')} / {top}")
        lines.append("ratio = peer median / ours (above 1: eyecool is faster)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=os.path.join("bench_out", "gpu_check.json"), help="report path")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: self-test of the compare and bench harness on the CPU (no build, no sanitizer, no "
                        "tests); the 'device' side is then the CPU op itself, so only its reference comparisons "
                        "are informative")
    p.add_argument("--quick", action="store_true", help="small shapes, no >2^31 inputs (self-test)")
    p.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {STEPS}")
    p.add_argument("--budget-s", type=float, default=570.0, help="overall time budget in seconds")
    p.add_argument("--worker", choices=["smoke", "compare", "bench"], help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        return _worker(args.worker, args.device, args.quick, args.out)

    t_start = time.perf_counter()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {STEPS}")
    json_path = args.json if os.path.isabs(args.json) else os.path.join(ROOT, args.json)

    if args.device == "cuda":
        status, message = gpu_presence()
        if status == "no":
            print(message)
            return 0
        if status == "broken":
            print(message, file=sys.stderr)
            return 2
    else:
        # The CPU self-test: the comparison and timing code paths on the CPU op, in this process's extension.
        steps = [s for s in steps if s in ("compare", "bench")]

    work = os.path.join(os.path.dirname(json_path), "gpu_check_logs")
    os.makedirs(work, exist_ok=True)
    report: Dict[str, Any] = {"schema": 1, "device": args.device, "quick": args.quick,
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "machine": machine_info(), "steps": {}}
    order = [s for s in STEPS if s in steps]
    failed_build = False
    for i, name in enumerate(order):
        remaining = args.budget_s - (time.perf_counter() - t_start) - STEP_RESERVE * (len(order) - i - 1)
        limit = min(STEP_CAPS[name], remaining)
        st: Dict[str, Any]
        if name == "build" and args.skip_build:
            st = {"status": "skipped", "ok": True, "reason": "--skip-build"}
        elif failed_build:
            st = {"status": "skipped", "ok": False, "reason": "the build failed"}
        elif limit < 15:
            st = {"status": "skipped", "ok": False, "reason": f"time budget ({args.budget_s:.0f} s) spent"}
        else:
            print(f"gpu-check: {name} (limit {limit:.0f} s) ...", flush=True)
            t0 = time.perf_counter()
            try:
                if args.device == "cpu":
                    rows = (compare_all if name == "compare" else bench_all)("cpu", args.quick)
                    st = {"ok": all(r["ok"] for r in rows), "rows": rows}
                elif name == "build":
                    st = step_build(limit, work)
                    failed_build = not st["ok"]
                elif name == "sanitize":
                    st = step_sanitize(limit, work, args.quick)
                elif name == "tests":
                    st = step_tests(limit, work, args.quick)
                else:
                    st = step_worker(name, limit, work, args.quick)
            except Exception as exc:  # noqa: BLE001  (a broken step is reported, the others still run)
                st = {"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"}
            st["seconds"] = round(time.perf_counter() - t0, 1)
            st["status"] = ("unavailable" if st.get("unavailable") else "passed") if st["ok"] else (
                "timeout" if st.get("timed_out") else "failed")
        report["steps"][name] = st
        # Written after every step, so that a run killed from outside still leaves what it had.
        report["ok"] = all(s.get("ok") for s in report["steps"].values())
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    report["ok"] = all(s.get("ok") for s in report["steps"].values()) and bool(report["steps"])
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    try:
        print(summarize(report))
    except Exception:  # noqa: BLE001  (the report is written; a table that fails to print must not hide it)
        traceback.print_exc()
    print(f"report: {json_path} (logs in {work}); {report['seconds']} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
