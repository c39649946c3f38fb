"""Property-based tests: fg_fusion against the reference composition (softmax, thing sum, adaptive average
pooling, gate) on generated shapes (empty batches, one-pixel maps, levels larger or smaller than the semantic map,
non-integer size ratios), memory layouts, both modes, and extreme logits (huge, inf, NaN). Every case matches the
reference, NaN for NaN, forward and backward, or is refused with a ValueError; none crashes.

The budget is small by default (CI); EYECOOL_FUZZ_EXAMPLES=2000 runs a long campaign on demand.
"""
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from eyecool_ext import ops, reference
from fuzz_tools import fuzz, ran
from op_tester import LAYOUTS, assert_close, to_layout, tolerances

EXTREMES = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 80.0, -80.0, 1e4]


@st.composite
def fusion_case(draw, extreme=False):
    channels = draw(st.integers(1, 5))
    return {
        "n": draw(st.integers(0, 2)),
        "channels": channels,
        "num_stuff": draw(st.integers(0, channels - 1)),
        "size": (draw(st.integers(1, 9)), draw(st.integers(1, 9))),
        "levels": draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 10), st.integers(1, 10)), min_size=1,
                                max_size=3)),
        "mode": draw(st.sampled_from(["logit", "prob"])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "scale": draw(st.sampled_from([1.0, 5.0, 30.0])),
        "seed": draw(st.integers(0, 2**16)),
        "extremes": draw(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 10**6), st.sampled_from(EXTREMES)),
                                  min_size=1, max_size=5)) if extreme else [],
    }


def _inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    dtype, n = case["dtype"], case["n"]
    sem = torch.randn(n, case["channels"], *case["size"], generator=g, dtype=dtype) * case["scale"]
    levels = [torch.randn(n, a, h, w, generator=g, dtype=dtype) * case["scale"] for a, h, w in case["levels"]]
    for which, position, value in case["extremes"]:
        target = sem if which == 0 else levels[position % len(levels)]
        if target.numel():
            target.view(-1)[position % target.numel()] = value
    sem = to_layout(sem, case["layout"]).requires_grad_()
    levels = [to_layout(level, case["layout"]).requires_grad_() for level in levels]
    return sem, levels


def _check(case):
    sem, levels = _inputs(case)
    out = ops.fg_fusion(sem, levels, case["num_stuff"], case["mode"])
    expected = reference.fg_fusion(sem, levels, case["num_stuff"], case["mode"])
    assert len(out) == len(levels)
    for o, e in zip(out, expected):
        assert o.shape == e.shape
        assert_close(o, e, equal_nan=True)
    if case["n"] == 0:
        return
    g = torch.Generator().manual_seed(case["seed"] + 1)
    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out]
    got = torch.autograd.grad(out, [sem, *levels], grads)
    want = torch.autograd.grad(expected, [sem, *levels], grads)
    # A gradient's rounding error scales with the largest input (a 1e30 RPN logit times a softmax derivative that
    # is 0 up to rounding): the absolute tolerance does too.
    largest = max([float(torch.nan_to_num(t.detach().abs(), posinf=0.0).max()) for t in (sem, *levels)] + [1.0])
    atol, rtol = tolerances(case["dtype"])
    for got_grad, want_grad in zip(got, want):
        if case["extremes"]:
            # inf * 0 in the chain rule: the kernel and autograd's order of products differ in where they
            # produce NaN or inf; wherever the reference's gradient is finite, they agree.
            finite = torch.isfinite(want_grad)
            got_grad, want_grad = got_grad[finite], want_grad[finite]
        torch.testing.assert_close(got_grad, want_grad, atol=atol * largest, rtol=rtol, equal_nan=True)


@fuzz
@given(fusion_case())
def test_fg_fusion_matches_reference(case):
    ran("fg_fusion")
    _check(case)


@fuzz
@given(fusion_case(extreme=True))
def test_fg_fusion_extreme_logits_match_reference(case):
    """Huge, infinite and NaN logits: the online softmax gives what the materialised softmax gives (NaN where
    the reference has NaN), never a crash."""
    ran("fg_fusion")
    # One channel: softmax is 1 whatever the logit, and the kernel says so; torch.softmax says NaN for a NaN or an
    # infinite one.
    assume(case["channels"] > 1 or not any(which == 0 and not math.isfinite(value)
                                           for which, _, value in case["extremes"]))
    _check(case)


@fuzz
@given(st.integers(2, 5), st.data())
def test_fg_fusion_infinite_logit_is_nan_at_its_pixel_only(channels, data):
    """A +inf semantic logit makes that pixel's softmax NaN (inf - inf), in the kernel as in torch.softmax, and
    leaves every other pixel alone."""
    ran("fg_fusion")
    num_stuff = data.draw(st.integers(0, channels - 1))
    channel = data.draw(st.integers(0, channels - 1))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    sem = torch.randn(1, channels, 3, 3, dtype=dtype)
    sem[0, channel, 1, 1] = float("inf")
    rpn = [torch.ones(1, 1, 3, 3, dtype=dtype)]
    fused = ops.fg_fusion(sem, rpn, num_stuff)[0]
    expected = reference.fg_fusion(sem, rpn, num_stuff)[0]
    assert torch.isnan(fused[0, 0, 1, 1]) and torch.isnan(expected[0, 0, 1, 1])
    assert_close(fused, expected, equal_nan=True)


@fuzz
@given(st.integers(0, 4), st.integers(-3, 8))
def test_fg_fusion_bad_arguments_raise_value_error(which, num_stuff):
    ran("fg_fusion")
    sem, levels = torch.randn(2, 4, 6, 6), [torch.randn(2, 3, 4, 4)]
    if which == 0:
        levels = [torch.randn(1, 3, 4, 4)]
        match = "batch size"
    elif which == 1:
        levels = [levels[0].double()]
        match = "dtype"
    elif which == 2:
        levels = []
        match = "non-empty"
    elif which == 3:
        sem = sem[0]
        match = "4-d"
    else:
        match = "num_stuff"
    if which == 4 and 0 <= num_stuff < 4:
        num_stuff = 4 + abs(num_stuff)
    elif which != 4:
        num_stuff = 1
    with pytest.raises(ValueError, match=match):
        ops.fg_fusion(sem, levels, num_stuff)
