"""Property-based tests: deform_conv2d against the reference on generated shapes, groups, strides, memory layouts
and offsets, NaN / inf / astronomically large offsets included. Every case either matches the reference (forward
and all five gradients) or is refused with a ValueError naming the argument; none crashes.

The budget is small by default (CI); EYECOOL_FUZZ_EXAMPLES=2000 runs a long campaign on demand.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eyecool_ext import ops, reference
from fuzz_tools import fuzz, ran
from op_tester import LAYOUTS, assert_close, to_layout

EXTREMES = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e7, -1e7, 2.0**31, -(2.0**31) - 3]


@st.composite
def deform_case(draw, extreme=False):
    groups = draw(st.integers(1, 2))
    offset_groups = draw(st.integers(1, 2))
    c_in = groups * offset_groups * draw(st.integers(1, 2))
    case = {
        "n": draw(st.integers(0, 2)),
        "c_in": c_in,
        "c_out": groups * draw(st.integers(1, 2)),
        "groups": groups,
        "offset_groups": offset_groups,
        "kernel": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "size": (draw(st.integers(1, 6)), draw(st.integers(1, 6))),
        "stride": (draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        "padding": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        "dilation": (draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        "masked": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "offset_scale": draw(st.sampled_from([0.0, 0.5, 2.0, 8.0])),
        "seed": draw(st.integers(0, 2**16)),
        "extremes": [],
    }
    if extreme:
        case["extremes"] = draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(EXTREMES)), min_size=1,
                                         max_size=6))
    return case


def _output_size(case):
    (h, w), (kh, kw) = case["size"], case["kernel"]
    (sh, sw), (ph, pw), (dh, dw) = case["stride"], case["padding"], case["dilation"]
    return (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1


def _inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    n, (h, w), (kh, kw) = case["n"], case["size"], case["kernel"]
    out_h, out_w = _output_size(case)
    taps = kh * kw
    x = to_layout(torch.randn(n, case["c_in"], h, w, generator=g, dtype=dtype), case["layout"])
    offset = torch.randn(n, 2 * case["offset_groups"] * taps, max(out_h, 1), max(out_w, 1), generator=g,
                         dtype=dtype) * case["offset_scale"]
    for position, value in case["extremes"]:
        if offset.numel():
            offset.view(-1)[position % offset.numel()] = value
    weight = torch.randn(case["c_out"], case["c_in"] // case["groups"], kh, kw, generator=g, dtype=dtype)
    bias = torch.randn(case["c_out"], generator=g, dtype=dtype) if case["bias"] else None
    mask = (torch.rand(n, case["offset_groups"] * taps, max(out_h, 1), max(out_w, 1), generator=g, dtype=dtype)
            if case["masked"] else None)
    return x, offset, weight, bias, mask


def _run(fn, x, offset, weight, bias, mask, case):
    return fn(x, offset, weight, bias, case["stride"], case["padding"], case["dilation"], mask)


def _check_against_reference(case):
    tensors = [t.detach().requires_grad_() if t is not None else None for t in _inputs(case)]
    out_h, out_w = _output_size(case)
    if out_h <= 0 or out_w <= 0:
        with pytest.raises(ValueError, match="output would be empty"):
            _run(ops.deform_conv2d, *tensors, case)
        return
    before = [t.detach().clone() if t is not None else None for t in tensors]
    out = _run(ops.deform_conv2d, *tensors, case)
    for t, b in zip(tensors, before):  # the op never writes into its inputs
        assert t is None or torch.equal(t.detach(), b) or torch.isnan(b).any()
    expected = _run(reference.deform_conv2d, *tensors, case)
    assert out.shape == expected.shape == (case["n"], case["c_out"], out_h, out_w)
    assert_close(out, expected, equal_nan=True)
    if out.numel() == 0:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"] + 1), dtype=out.dtype)
    wrt = [t for t in tensors if t is not None]
    grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, wrt, grad, allow_unused=True)
    for g, e, t in zip(grads, expected_grads, wrt):
        g = torch.zeros_like(t) if g is None else g
        e = torch.zeros_like(t) if e is None else e
        if t is tensors[1]:
            # A sample with a NaN or infinite offset samples nothing: the kernel's gradient for both its offsets is 0, where
            # autograd through the reference's floor and where() gives NaN. Everywhere else they agree.
            # (torchvision's CPU kernel crashes on NaN offsets.)
            pairs = t.detach().reshape(t.shape[0], -1, 2, *t.shape[2:])  # (dy, dx) of every sample
            nan_offset = (~torch.isfinite(pairs)).any(dim=2, keepdim=True).expand_as(pairs).reshape(t.shape)
            assert torch.equal(g[nan_offset], torch.zeros_like(g[nan_offset]))
            g, e = g[~nan_offset], e[~nan_offset]
        # Gradients sum many products: float32 gets a tolerance scaled to the magnitude of the values.
        scale = float(torch.nan_to_num(e.abs(), posinf=0.0).max()) if e.numel() else 0.0
        atol = 1e-8 if case["dtype"] == torch.float64 else 1e-3 * (1 + scale)
        torch.testing.assert_close(g, e, atol=atol, rtol=1e-4, equal_nan=True)


@fuzz
@given(deform_case())
def test_deform_conv2d_matches_reference(case):
    ran("deform_conv2d")
    _check_against_reference(case)


@fuzz
@given(deform_case(extreme=True))
def test_deform_conv2d_extreme_offsets_match_reference(case):
    """NaN, inf and huge offsets sample nothing (zero padding), as in the reference: finite outputs and gradients
    for finite inputs, never a crash or an out-of-bounds read."""
    ran("deform_conv2d")
    _check_against_reference(case)
    tensors = _inputs(case)
    out_h, out_w = _output_size(case)
    if out_h > 0 and out_w > 0:
        assert torch.isfinite(_run(ops.deform_conv2d, *tensors, case)).all()


@fuzz
@given(st.integers(0, 5), st.data())
def test_deform_conv2d_bad_shapes_raise_value_error(which, data):
    """A shape that does not fit (offset, mask, bias, weight) is a ValueError naming the argument."""
    ran("deform_conv2d")
    x = torch.randn(1, 4, 5, 5)
    offset = torch.randn(1, 18, 3, 3)
    weight = torch.randn(2, 4, 3, 3)
    bias, mask = torch.randn(2), torch.rand(1, 9, 3, 3)
    bad = data.draw(st.integers(1, 4))
    name = ["offset", "mask", "bias", "weight", "offset", "input"][which]
    if which == 0:
        offset = torch.randn(1, 18, 3 + bad, 3)
    elif which == 1:
        mask = torch.rand(1, 9 + bad, 3, 3)
    elif which == 2:
        bias = torch.randn(2 + bad)
    elif which == 3:
        weight = torch.randn(2, 3, 3, 3)  # 4 input channels are not a multiple of 3
    elif which == 4:
        offset = torch.randn(1, 18 + bad, 3, 3)
    else:
        x = torch.randn(1, 0, 5, 5)
    with pytest.raises(ValueError, match=name):
        ops.deform_conv2d(x, offset, weight, bias, 1, 0, 1, mask)


@pytest.mark.parametrize("batch", [1, 2])
def test_one_pixel_output_leaves_the_bias_alone(batch):
    """Found by the long fuzz campaign: with one output pixel per channel (batch 1) the CPU forward accumulated
    the convolution into the caller's bias tensor (expand().contiguous() of the bias was the bias itself)."""
    x, offset, weight = torch.randn(batch, 2, 3, 3), torch.zeros(batch, 18, 1, 1), torch.randn(4, 2, 3, 3)
    bias = torch.randn(4)
    kept = bias.clone()
    out = ops.deform_conv2d(x, offset, weight, bias)
    assert torch.equal(bias, kept)
    assert_close(out, torch.nn.functional.conv2d(x, weight, kept))
