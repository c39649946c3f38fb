"""Property-based tests: roi_align and multilevel_roi_align against the reference on generated inputs.

The budget is small by default (CI); EYECOOL_FUZZ_EXAMPLES=2000 runs a long campaign on demand.
"""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from eyecool_ext import ops, reference
from fuzz_tools import fuzz, ran
from op_tester import LAYOUTS, assert_close, to_layout

coordinate = st.floats(min_value=-40, max_value=60, allow_nan=False, width=32)
extreme = st.one_of(coordinate, st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e7]))


@st.composite
def roi_align_case(draw, coords=coordinate):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    k = draw(st.integers(0, 6))
    rows = []
    for _ in range(k):
        x1, y1, x2, y2 = (draw(coords) for _ in range(4))
        rows.append([float(draw(st.integers(0, n - 1))), x1, y1, x2, y2])
    return {
        "shape": (n, c, h, w),
        "rois": rows,
        "output_size": (draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        "spatial_scale": draw(st.sampled_from([1.0, 0.5, 0.25, 0.3])),
        "sampling_ratio": draw(st.integers(-1, 3)),
        "aligned": draw(st.booleans()),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
    }


def _inputs(case):
    x = to_layout(torch.randn(case["shape"], dtype=case["dtype"]), case["layout"])
    rois = torch.tensor(case["rois"], dtype=case["dtype"]).reshape(-1, 5)
    return x, rois


@fuzz
@given(roi_align_case())
def test_roi_align_matches_reference(case):
    ran("roi_align")
    x, rois = _inputs(case)
    args = (case["output_size"], case["spatial_scale"], case["sampling_ratio"], case["aligned"])
    x.requires_grad_()
    out = ops.roi_align(x, rois, *args)
    expected = reference.roi_align(x, rois, *args)
    assert_close(out, expected)
    if out.numel():
        grad = torch.randn_like(out)
        (g,) = torch.autograd.grad(out, x, grad)
        (g_ref,) = torch.autograd.grad(expected, x, grad)
        assert_close(g, g_ref)


@fuzz
@given(roi_align_case(coords=extreme))
def test_roi_align_extreme_boxes_never_crash(case):
    """NaN, inf and astronomically large boxes: a finite result (0 where no sample lands), never a crash or hang."""
    ran("roi_align")
    x, rois = _inputs(case)
    x.requires_grad_()
    out = ops.roi_align(x, rois, case["output_size"], case["spatial_scale"], case["sampling_ratio"], case["aligned"])
    assert out.shape == (rois.shape[0], x.shape[1], *case["output_size"])
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@fuzz
@given(st.integers(1, 3), st.integers(0, 8), st.integers(1, 3), st.data())
def test_multilevel_matches_reference(levels, k, channels, data):
    ran("multilevel_roi_align")
    sizes = [(max(1, 16 >> i), max(1, 20 >> i)) for i in range(levels)]
    feats = [torch.randn(2, channels, h, w, dtype=torch.float64) for h, w in sizes]
    scales = [1 / 4 / 2 ** i for i in range(levels)]
    rows = []
    for _ in range(k):
        x1, y1 = data.draw(st.floats(-10, 80)), data.draw(st.floats(-10, 80))
        side = data.draw(st.floats(0.5, 400))
        rows.append([float(data.draw(st.integers(0, 1))), x1, y1, x1 + side, y1 + side * data.draw(st.floats(0.3, 3))])
    rois = torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)
    canonical = data.draw(st.sampled_from([224.0, 32.0]))
    out = ops.multilevel_roi_align(feats, rois, 3, scales, 0, True, canonical, 4)
    assert_close(out, reference.multilevel_roi_align(feats, rois, 3, scales, 0, True, canonical, 4))
    assert not math.isnan(out.sum().item())


@fuzz
@given(st.integers(1, 3), st.integers(0, 6), st.booleans(), st.data())
def test_multilevel_extreme_boxes_match_reference(levels, k, aligned, data):
    """NaN, inf and huge boxes in the FPN pooler: the level assignment (log2 of a NaN or infinite area) stays in
    range and the result equals the reference, forward and backward; never a crash or an out-of-bounds read."""
    ran("multilevel_roi_align")
    sizes = [(max(1, 9 >> i), max(1, 7 >> i)) for i in range(levels)]
    feats = [torch.randn(2, 2, h, w, dtype=torch.float64, requires_grad=True) for h, w in sizes]
    scales = [1 / 4 / 2 ** i for i in range(levels)]
    rows = [[float(data.draw(st.integers(0, 1)))] + [data.draw(extreme) for _ in range(4)] for _ in range(k)]
    rois = torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)
    sampling_ratio = data.draw(st.integers(0, 2))
    out = ops.multilevel_roi_align(feats, rois, 2, scales, sampling_ratio, aligned)
    assert out.shape == (k, 2, 2, 2) and torch.isfinite(out).all()
    if sampling_ratio == 0 and not all(abs(v) < 1e4 for row in rows for v in row[1:]):
        # Adaptive sampling of a huge box: the reference would materialise up to 10^6 x 10^6 sampling points.
        out.sum().backward()
        assert all(torch.isfinite(f.grad).all() for f in feats)
        return
    expected = reference.multilevel_roi_align(feats, rois, 2, scales, sampling_ratio, aligned)
    assert_close(out, expected)
    if k:
        grads = torch.autograd.grad(out.sum(), feats, allow_unused=True)
        expected_grads = torch.autograd.grad(expected.sum(), feats, allow_unused=True)
        for g, e, f in zip(grads, expected_grads, feats):
            assert_close(torch.zeros_like(f) if g is None else g, torch.zeros_like(f) if e is None else e)
