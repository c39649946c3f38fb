"""Every ISA variant of every CPU kernel that has them (csrc/cpu/cpu_features.h: fg_fusion's row loops, the UPSNet
merge's row loops, deform_conv2d's sampling loops and GEMM). A machine runs only the widest variant its CPU has,
so each variant runs in a subprocess capped with EYECOOL_CPU_ISA; its results are compared with the reference
implementations and with the baseline variant's, and the subprocess reports which variant ran
(eyecool_ext.cpu_isa()). Also: how the cap treats a value the CPU cannot honour, an empty one and a bad one."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import eyecool_ext
from eyecool_ext import reference
from op_tester import assert_close, needs_compiled

ISAS = ("baseline", "avx2", "avx512")  # narrowest first, as CpuIsa orders them

# Runs in the capped subprocess; the inputs and outputs go to a file. fg_fusion forward and backward in both
# modes and four dtypes (each dtype is its own instantiation of the variants), a band width that is no multiple
# of any vector width and levels with overlapping bins; upsnet_panoptic_merge on logits at the output size and
# resized inside the kernel (the resize taps' row loop), float32 and float64; deform_conv2d forward and backward
# with a mask, two weight groups of 20 output channels (partial GEMM panels) and 11x13 = 143 pixels (partial
# tiles), with and without bias.
VARIANT_SCRIPT = r"""
import sys, torch
import eyecool_ext
from eyecool_ext import ops
torch.manual_seed(0)
results = {"cpu_isa": eyecool_ext.cpu_isa(), "cpu_isa_supported": eyecool_ext.cpu_isa_supported()}
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    sem = (torch.randn(2, 9, 20, 30) * 3).to(dtype).requires_grad_()
    levels = [torch.randn(2, 3, h, w).to(dtype).requires_grad_() for h, w in ((20, 30), (7, 9), (40, 11))]
    grads = [torch.randn_like(level) for level in levels]
    for mode in ("logit", "prob"):
        out = ops.fg_fusion(sem, levels, 4, mode)
        results[("fg_fusion", str(dtype), mode)] = {
            "inputs": [t.detach() for t in (sem, *levels, *grads)],
            "out": [o.detach() for o in out],
            "grads": list(torch.autograd.grad(out, [sem, *levels], grads)),
        }
g = torch.Generator().manual_seed(1)
for dtype in (torch.float32, torch.float64):
    for size in (None, (53, 61)):
        sem = torch.randn(6, 37, 45, generator=g).to(dtype)
        wh = torch.rand(9, 2, generator=g) * 30 + 1
        xy = torch.rand(9, 2, generator=g) * 40 - 5
        boxes = torch.cat([xy, xy + wh], dim=1).to(dtype)
        classes = torch.randint(0, 2, (9,), generator=g)
        masks = (torch.randn(9, 28, 28, generator=g) * 3).to(dtype)
        results[("merge", str(dtype), size)] = {
            "inputs": [sem, boxes, classes, masks],
            "labels": ops.upsnet_panoptic_merge(sem, 4, boxes, classes, masks, size)}
for dtype in (torch.float32, torch.float64):
    x = torch.randn(2, 8, 11, 13, generator=g).to(dtype).requires_grad_()
    offset = (torch.randn(2, 2 * 18, 11, 13, generator=g) * 2).to(dtype).requires_grad_()
    mask = torch.rand(2, 18, 11, 13, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(40, 4, 3, 3, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(40, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 40, 11, 13, generator=g).to(dtype)
    for with_bias in (True, False):
        b = bias if with_bias else None
        out = ops.deform_conv2d(x, offset, weight, b, padding=1, mask=mask)
        wrt = [x, offset, mask, weight] + ([bias] if with_bias else [])
        results[("deform", str(dtype), with_bias)] = {
            "inputs": [t.detach() for t in (x, offset, mask, weight, bias, grad_out)],
            "out": out.detach(), "grads": list(torch.autograd.grad(out, wrt, grad_out))}
torch.save(results, sys.argv[1])
"""


def run_capped(cap, tmp_path, script=VARIANT_SCRIPT):
    """Runs `script` in a subprocess with EYECOOL_CPU_ISA=cap (None: unset); returns (returncode, stderr, results)."""
    out_file = tmp_path / f"results_{cap}.pt"
    env = dict(os.environ)
    env.pop("EYECOOL_CPU_ISA", None)
    if cap is not None:
        env["EYECOOL_CPU_ISA"] = cap
    res = subprocess.run([sys.executable, "-c", script, str(out_file)], capture_output=True, text=True, env=env)
    results = torch.load(out_file) if res.returncode == 0 else None
    return res.returncode, res.stderr, results


def supported_isas():
    """The caps this machine can run, narrowest first."""
    if not eyecool_ext.compiled():
        return []
    return list(ISAS[: ISAS.index(eyecool_ext.cpu_isa_supported()) + 1])


@pytest.fixture(scope="module")
def variant_results(tmp_path_factory):
    """{cap: results} for every cap this machine supports (one subprocess each, shared by the tests)."""
    tmp_path = tmp_path_factory.mktemp("isa")
    results = {}
    for cap in supported_isas():
        returncode, stderr, results[cap] = run_capped(cap, tmp_path)
        assert returncode == 0, stderr
    return results


def check_against_references(results):
    for key, case in results.items():
        if not isinstance(key, tuple):
            continue
        op, dtype = key[0], getattr(torch, key[1].split(".")[1])
        if op == "fg_fusion":
            sem, *rest = [t.double().requires_grad_() for t in case["inputs"]]
            levels, grads = rest[:3], rest[3:]
            expected = reference.fg_fusion(sem, levels, 4, key[2])
            for ours, theirs in zip(case["out"], expected):
                assert_close(ours, theirs.detach().to(dtype), dtype=dtype)
            for ours, theirs in zip(case["grads"], torch.autograd.grad(expected, [sem, *levels], grads)):
                assert_close(ours, theirs.to(dtype), dtype=dtype)
        elif op == "merge":
            sem, boxes, classes, masks = case["inputs"]
            assert torch.equal(case["labels"], reference.upsnet_panoptic_merge(sem, 4, boxes, classes, masks, key[2]))
        elif op == "deform":
            x, offset, mask, weight, bias, grad_out = [t.requires_grad_() for t in case["inputs"]]
            b = bias if key[2] else None
            expected = torchvision.ops.deform_conv2d(x, offset, weight, b, padding=(1, 1), mask=mask)
            assert_close(case["out"], expected.detach())
            wrt = [x, offset, mask, weight] + ([bias] if key[2] else [])
            for ours, theirs in zip(case["grads"], torch.autograd.grad(expected, wrt, grad_out)):
                assert_close(ours, theirs)
        else:
            raise AssertionError(f"unknown case {key}")


@needs_compiled
@pytest.mark.parametrize("cap", ISAS)
def test_every_variant_matches_the_references_and_reports_its_isa(cap, variant_results):
    if cap not in variant_results:
        pytest.skip(f"this CPU runs at most {eyecool_ext.cpu_isa_supported()}")
    results = variant_results[cap]
    assert results["cpu_isa"] == cap
    check_against_references(results)


@needs_compiled
def test_every_variant_agrees_with_the_baseline_variant(variant_results):
    """The vector variants differ from the baseline only in rounding (FMA, lane order of nothing: every sum keeps its
    order), and the merge's labels not at all."""
    if len(variant_results) < 2:
        pytest.skip("this CPU has the baseline variant only")
    baseline = variant_results["baseline"]
    for cap, results in variant_results.items():
        for key, case in results.items():
            if not isinstance(key, tuple):
                continue
            if key[0] == "merge":
                assert torch.equal(case["labels"], baseline[key]["labels"]), (cap, key)
                continue
            dtype = getattr(torch, key[1].split(".")[1])
            outs = case["out"] if isinstance(case["out"], list) else [case["out"]]
            base_outs = baseline[key]["out"] if isinstance(case["out"], list) else [baseline[key]["out"]]
            for ours, theirs in zip(outs + case["grads"], base_outs + baseline[key]["grads"]):
                assert_close(ours, theirs, dtype=dtype, msg=lambda m: f"{cap} {key}: {m}")


CAP_SCRIPT = r"""
import sys, torch
import eyecool_ext
from eyecool_ext import ops
report = {}
try:
    report["cpu_isa"] = eyecool_ext.cpu_isa()
except ValueError as exc:
    report["cpu_isa_error"] = str(exc)
try:
    ops.fg_fusion(torch.randn(1, 5, 4, 4), [torch.randn(1, 3, 4, 4)], 2)
    report["op"] = "ran"
except RuntimeError as exc:
    report["op_error"] = str(exc)
report["supported"] = eyecool_ext.cpu_isa_supported()
torch.save(report, sys.argv[1])
"""


@needs_compiled
def test_unset_or_empty_cap_runs_the_widest_supported_variant(tmp_path):
    for cap in (None, ""):
        returncode, stderr, report = run_capped(cap, tmp_path, CAP_SCRIPT)
        assert returncode == 0, stderr
        assert report["cpu_isa"] == report["supported"] == eyecool_ext.cpu_isa_supported()
        assert report["op"] == "ran"


@needs_compiled
@pytest.mark.parametrize("cap", ISAS[1:])
def test_a_cap_above_the_cpu_runs_what_the_cpu_supports(cap, tmp_path):
    if cap in supported_isas():
        pytest.skip(f"this CPU supports {cap} (the caps it supports are checked with the variants)")
    returncode, stderr, report = run_capped(cap, tmp_path, CAP_SCRIPT)
    assert returncode == 0, stderr
    assert report["cpu_isa"] == report["supported"] == eyecool_ext.cpu_isa_supported()
    assert report["op"] == "ran"


@needs_compiled
@pytest.mark.parametrize("cap", ["AVX2", "best"])  # no case folding; no "best" (the old no-cap spelling)
def test_an_unknown_cap_is_an_error_naming_the_accepted_values(cap, tmp_path):
    returncode, stderr, report = run_capped(cap, tmp_path, CAP_SCRIPT)
    assert returncode == 0, stderr
    accepted = "EYECOOL_CPU_ISA must be one of baseline, avx2, avx512"
    assert accepted in report["cpu_isa_error"] and repr(cap) in report["cpu_isa_error"]
    assert accepted in report["op_error"]
    assert "op" not in report and "cpu_isa" not in report
