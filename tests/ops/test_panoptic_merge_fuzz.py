"""Property-based tests of the panoptic merges on generated inputs: empty and one-pixel images, no instances,
boxes partly or wholly outside the image, inverted and zero-area boxes, NaN / inf / astronomically large box
coordinates, 1x1 masks, resized semantic logits, and extreme (huge, infinite) logits.

``upsnet_panoptic_merge`` must equal the reference argmax of the materialised stack (float64: exactly); the
heuristic merge (the reference itself) must keep its invariants. A refused input is a ValueError or RuntimeError
with a message; nothing crashes.

The budget is small by default (CI); EYECOOL_FUZZ_EXAMPLES=2000 runs a long campaign on demand.
"""
import math
import os
import sys

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from eyecool_ext import ops, reference
from fuzz_tools import fuzz, ran

# panopticapi's combine loop, line for line on decoded masks (numpy): the independent reference of the heuristic merge.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_heuristic_merge import panopticapi_combine  # noqa: E402

coordinate = st.floats(min_value=-20, max_value=40, allow_nan=False, width=32)
extreme_coordinate = st.one_of(coordinate, st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30,
                                                             -1e30, 1e9, 3e38]))


@st.composite
def merge_case(draw, coords=coordinate, extreme_logits=()):
    num_stuff = draw(st.integers(0, 3))
    num_things = draw(st.integers(1, 3))
    m = draw(st.integers(0, 5))
    boxes = [[draw(coords) for _ in range(4)] for _ in range(m)]
    if draw(st.booleans()):  # mostly proper boxes: x1 < x2, y1 < y2
        boxes = [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])] for b in boxes]
    return {
        "num_stuff": num_stuff,
        "num_things": num_things,
        "size": (draw(st.integers(0, 7)), draw(st.integers(0, 7))),
        "output_size": draw(st.one_of(st.none(), st.tuples(st.integers(1, 9), st.integers(1, 9)))),
        "boxes": boxes,
        "classes": [draw(st.integers(0, num_things - 1)) for _ in range(m)],
        "mask_size": draw(st.integers(1, 5)),
        "seed": draw(st.integers(0, 2**16)),
        "logit_extremes": draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(
            extreme_logits)), min_size=1, max_size=4)) if extreme_logits else [],
    }


def _inputs(case, dtype=torch.float64):
    g = torch.Generator().manual_seed(case["seed"])
    channels = case["num_stuff"] + case["num_things"]
    sem = torch.randn(channels, *case["size"], generator=g, dtype=torch.float64) * 3
    for position, value in case["logit_extremes"]:
        if sem.numel():
            sem.view(-1)[position % sem.numel()] = value
    m = len(case["boxes"])
    boxes = torch.tensor(case["boxes"], dtype=torch.float64).reshape(m, 4)
    classes = torch.tensor(case["classes"], dtype=torch.int64)
    masks = torch.randn(m, case["mask_size"], case["mask_size"], generator=g, dtype=torch.float64) * 4
    return sem.to(dtype), boxes.to(dtype), classes, masks.to(dtype)


def _merge_both(case, dtype=torch.float64):
    sem, boxes, classes, masks = _inputs(case, dtype)
    output_size = case["output_size"]
    if sem.shape[-1] == 0 or sem.shape[-2] == 0:
        output_size = None  # nothing to resize from
    labels = ops.upsnet_panoptic_merge(sem, case["num_stuff"], boxes, classes, masks, output_size)
    expected = reference.upsnet_panoptic_merge(sem, case["num_stuff"], boxes, classes, masks, output_size)
    return labels, expected, len(case["boxes"])


@fuzz
@given(merge_case())
def test_upsnet_merge_matches_reference(case):
    ran("upsnet_panoptic_merge")
    labels, expected, m = _merge_both(case)
    assert labels.dtype == torch.int64 and labels.shape == expected.shape
    assert torch.equal(labels, expected)
    if labels.numel():
        assert labels.min() >= 0 and labels.max() <= case["num_stuff"] + m


@fuzz
@given(merge_case(coords=extreme_coordinate))
def test_upsnet_merge_extreme_boxes_match_reference(case):
    """Huge boxes cover the image, as in the reference; NaN and infinite coordinates are a ValueError that names
    the box (the mask has no sampling position in them)."""
    ran("upsnet_panoptic_merge")
    if not all(math.isfinite(v) for box in case["boxes"] for v in box):
        with pytest.raises(ValueError, match="boxes must be finite"):
            _merge_both(case)
        return
    labels, expected, m = _merge_both(case)
    assert torch.equal(labels, expected)


@fuzz
@given(merge_case(extreme_logits=(1e300, -1e300, 1e30, -1e30)))
def test_upsnet_merge_huge_logits_match_reference(case):
    """Huge (float64 1e300) semantic logits: the same argmax as the materialised stack."""
    ran("upsnet_panoptic_merge")
    labels, expected, m = _merge_both(case)
    assert torch.equal(labels, expected)


@fuzz
@given(merge_case(extreme_logits=(float("inf"), -float("inf"), float("nan"))))
def test_upsnet_merge_infinite_logits_give_valid_labels(case):
    """Infinite and NaN logits make NaN stack entries (the unknown logit inf - inf), where the conventions part:
    torch.argmax (the reference) picks a NaN, the kernel never does. Either way every pixel gets a valid label,
    and pixels whose stack has no NaN get the reference's."""
    ran("upsnet_panoptic_merge")
    labels, expected, m = _merge_both(case)
    assert labels.shape == expected.shape
    if labels.numel():
        assert labels.min() >= 0 and labels.max() <= case["num_stuff"] + m
    if case["output_size"] is None and labels.numel():
        sem, boxes, classes, masks = _inputs(case)
        stack = reference.upsnet_logit_stack(sem, case["num_stuff"], boxes, classes, masks)
        clean = ~torch.isnan(stack).any(dim=0)
        assert torch.equal(labels[clean], expected[clean])


@fuzz
@given(st.integers(-3, 6), st.integers(0, 3))
def test_upsnet_merge_out_of_range_classes_raise(bad_class, num_stuff):
    ran("upsnet_panoptic_merge")
    num_things = 2
    assume(not 0 <= bad_class < num_things)
    sem = torch.randn(num_stuff + num_things, 4, 4)
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="classes"):
        ops.upsnet_panoptic_merge(sem, num_stuff, boxes, torch.tensor([bad_class]), torch.randn(1, 3, 3))


@fuzz
@given(st.integers(0, 3), st.integers(1, 3), st.integers(0, 6), st.integers(0, 7), st.integers(0, 7),
       st.sampled_from([0, 1, 5, 4096]), st.floats(0, 1), st.floats(0, 1), st.booleans(), st.integers(0, 2**16))
def test_heuristic_merge_invariants(num_stuff, num_things, m, h, w, area_limit, overlap, score_threshold, nan_score,
                                    seed):
    """Equal to panopticapi's loop; and: instances take only their own pixels, in score order, and never more
    than one instance per pixel; stuff goes only where the semantic prediction says that stuff class, in regions
    of at least the area limit; NaN scores never crash."""
    ran("heuristic_panoptic_merge")
    g = torch.Generator().manual_seed(seed)
    sem_seg = torch.randint(0, num_stuff + num_things, (h, w), generator=g)
    masks = torch.rand(m, h, w, generator=g) > 0.6
    scores = torch.rand(m, generator=g, dtype=torch.float64)
    if nan_score and m:
        scores[0] = float("nan")
    out = ops.heuristic_panoptic_merge(sem_seg, num_stuff, masks, scores, overlap, area_limit, score_threshold)
    assert out.shape == (h, w) and out.dtype == torch.int64
    expected = panopticapi_combine(sem_seg.numpy(), num_stuff, masks.numpy(), scores.numpy(), overlap, area_limit,
                                   score_threshold)
    assert (out.numpy() == expected).all()
    if out.numel() == 0:
        return
    assert out.min() >= 0 and out.max() <= num_stuff + m
    for i in range(m):
        taken = out == num_stuff + i
        assert not (taken & ~masks[i]).any()
        if taken.any():
            assert scores[i] >= score_threshold
    stuff = out < num_stuff
    assert torch.equal(out[stuff], sem_seg[stuff])
    for c in range(num_stuff):
        area = int((out == c).sum())
        assert area == 0 or area >= area_limit


def test_heuristic_merge_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="masks"):
        ops.heuristic_panoptic_merge(torch.zeros(3, 4, dtype=torch.long), 1, torch.zeros(2, 4, 3, dtype=torch.bool),
                                     torch.rand(2))
    with pytest.raises(ValueError, match="scores"):
        ops.heuristic_panoptic_merge(torch.zeros(3, 4, dtype=torch.long), 1, torch.zeros(2, 3, 4, dtype=torch.bool),
                                     torch.rand(3))
