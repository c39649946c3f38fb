"""Property-based tests of the corners the hostile-input review found (issue 19): empty spatial maps that padding
or a box still samples, extreme padding and dilation, non-finite box coordinates, sizes that would need an
absurd allocation. Each case gives the mathematically right result (zeros, the bias, zero gradients) or a clear
error naming the argument, never a crash: the op test conftest runs this module on the CPU kernels and on the
emulated CUDA kernels, and `make sanitize` runs it under AddressSanitizer and UBSan.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eyecool_ext import ops
from fuzz_tools import fuzz, ran

# Coordinates around the border of a tiny map, where clamped taps would index row or column -1.
border = st.floats(min_value=-2.5, max_value=3.5, allow_nan=False, width=32)
non_finite = st.sampled_from([float("nan"), float("inf"), -float("inf")])
HUGE = [2 ** 31, 2 ** 62, 2 ** 63 - 1]


@fuzz
@given(h=st.integers(0, 3), w=st.integers(0, 3), k=st.integers(1, 4), aligned=st.booleans(),
       ratio=st.integers(-1, 2), data=st.data())
def test_roi_align_on_an_empty_map_is_zero(h, w, k, aligned, ratio, data):
    if h * w:
        h = 0  # one of the two spatial sizes is always 0 here
    ran("roi_align")
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    rows = [[float(data.draw(st.integers(0, 1)))] + [data.draw(border) for _ in range(4)] for _ in range(k)]
    rois = torch.tensor(rows, dtype=torch.float64)
    out = ops.roi_align(x, rois, 2, data.draw(st.sampled_from([1.0, 0.5])), ratio, aligned)
    assert torch.equal(out, torch.zeros(k, 3, 2, 2, dtype=torch.float64))
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(x.grad) == 0


@fuzz
@given(empty_level=st.integers(0, 2), k=st.integers(1, 6), data=st.data())
def test_multilevel_roi_align_with_an_empty_level(empty_level, k, data):
    """ROIs assigned to an empty level pool zeros; the others pool as if the level were not empty."""
    ran("multilevel_roi_align")
    sizes = [(16, 16), (8, 8), (4, 4)]
    sizes[empty_level] = (0, sizes[empty_level][1]) if data.draw(st.booleans()) else (sizes[empty_level][0], 0)
    feats = [torch.randn(1, 2, h, w, dtype=torch.float64, requires_grad=True) for h, w in sizes]
    sides = [data.draw(st.floats(4.0, 200.0)) for _ in range(k)]
    rois = torch.tensor([[0.0, 1.0, 1.0, 1.0 + s, 1.0 + s] for s in sides], dtype=torch.float64)
    out = ops.multilevel_roi_align(feats, rois, 2, [1 / 4, 1 / 8, 1 / 16], 2, True, 32.0, 3)
    full = [f.detach().clone() for f in feats]
    full[empty_level] = torch.zeros(1, 2, 16 >> empty_level, 16 >> empty_level, dtype=torch.float64)
    # The same ROIs on a pyramid whose empty level is replaced by zeros (same level assignment: it depends on the
    # boxes only): equal results.
    assert torch.equal(out, ops.multilevel_roi_align(full, rois, 2, [1 / 4, 1 / 8, 1 / 16], 2, True, 32.0, 3))
    out.sum().backward()
    assert feats[empty_level].grad.shape == feats[empty_level].shape


@fuzz
@given(h=st.integers(0, 3), w=st.integers(0, 3), padding=st.integers(1, 3), masked=st.booleans(),
       with_bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_deform_conv2d_on_an_empty_map_is_the_bias(h, w, padding, masked, with_bias, seed):
    if h * w:
        w = 0
    ran("deform_conv2d")
    g = torch.Generator().manual_seed(seed)
    out_h, out_w = h + 2 * padding - 2, w + 2 * padding - 2
    if out_h <= 0 or out_w <= 0:
        return
    x = torch.randn(1, 2, h, w, dtype=torch.float64, requires_grad=True)
    # Fractional offsets around the border: the samples fall in the band (-1, 0) where clamped taps would read -1.
    offset = ((torch.rand(1, 18, out_h, out_w, generator=g, dtype=torch.float64) - 0.5) * 3).requires_grad_()
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    mask = torch.rand(1, 9, out_h, out_w, generator=g, dtype=torch.float64, requires_grad=True) if masked else None
    out = ops.deform_conv2d(x, offset, weight, bias, 1, padding, 1, mask)
    expected = (bias.detach() if with_bias else torch.zeros(3, dtype=torch.float64)).view(1, 3, 1, 1)
    assert torch.equal(out, expected.expand(1, 3, out_h, out_w))
    out.sum().backward()
    for t in (x, offset, weight, mask):
        if t is not None:
            assert torch.count_nonzero(t.grad) == 0
    if with_bias:
        assert torch.equal(bias.grad, torch.full((3,), float(out_h * out_w), dtype=torch.float64))


@fuzz
@given(which=st.sampled_from(["padding", "dilation", "stride"]), value=st.sampled_from(HUGE),
       axis=st.integers(0, 1))
def test_deform_conv2d_extreme_padding_and_dilation_raise(which, value, axis):
    """Huge padding, dilation or stride: a clear error (no signed overflow, no allocation), or, for a stride, the
    one-pixel output it really gives."""
    ran("deform_conv2d")
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}
    conv[which][axis] = value
    x = torch.randn(1, 2, 4, 4)
    weight = torch.randn(3, 2, 3, 3)
    offset = torch.zeros(1, 18, 4, 4)
    if which == "stride":
        out_size = [4, 4]
        out_size[axis] = 1
        offset = torch.zeros(1, 18, *out_size)
        out = ops.deform_conv2d(x, offset, weight, None, conv["stride"], conv["padding"], conv["dilation"])
        assert out.shape == (1, 3, *out_size)
        return
    with pytest.raises((RuntimeError, ValueError), match="deform_conv2d"):
        ops.deform_conv2d(x, offset, weight, None, conv["stride"], conv["padding"], conv["dilation"])
    with pytest.raises(RuntimeError, match="deform_conv2d"):  # the kernel's own check, without the wrapper's
        torch.ops.eyecool.deform_conv2d(x, offset, weight, None, None, conv["stride"], conv["padding"],
                                        conv["dilation"])


@fuzz
@given(size=st.sampled_from([10 ** 6, 2 ** 31, 10 ** 12]), square=st.booleans())
def test_absurd_output_sizes_are_refused_before_allocating(size, square):
    ran("roi_align")
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]])
    output_size = (size, size) if square else (size, 2 ** 40)
    with pytest.raises(RuntimeError, match="output_size|output \\[K, C"):
        torch.ops.eyecool.roi_align(x, rois, 1.0, *output_size, 2, True)
    ran("upsnet_panoptic_merge")
    sem = torch.randn(4, 8, 8)
    with pytest.raises(RuntimeError, match="output"):
        torch.ops.eyecool.upsnet_panoptic_merge(sem, 2, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                                torch.zeros(0, 28, 28), *output_size)


@fuzz
@given(m=st.integers(1, 4), data=st.data())
def test_upsnet_merge_with_non_finite_boxes(m, data):
    """A box side of NaN or +-inf never reaches an integer conversion (UBSan checks it under make sanitize): every
    label is a stuff class, an instance or unknown."""
    ran("upsnet_panoptic_merge")
    sem = torch.randn(5, 9, 7)
    boxes = torch.tensor([[data.draw(st.one_of(border.map(lambda v: v * 4), non_finite)) for _ in range(4)]
                          for _ in range(m)])
    classes = torch.tensor([data.draw(st.integers(0, 2)) for _ in range(m)])
    masks = torch.randn(m, 5, 5)
    labels = torch.ops.eyecool.upsnet_panoptic_merge(sem, 2, boxes, classes, masks, 9, 7)
    assert labels.shape == (9, 7) and int(labels.min()) >= 0 and int(labels.max()) <= 2 + m


@fuzz
@given(h=st.integers(0, 3), w=st.integers(0, 3), levels=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)),
                                                                  min_size=1, max_size=3),
       mode=st.sampled_from(["logit", "prob"]))
def test_fg_fusion_on_an_empty_semantic_map_is_zero(h, w, levels, mode):
    """No semantic pixel, no foreground: every fused level is 0 and no gradient flows (the unfused composition
    raises in adaptive_avg_pool2d here)."""
    if h * w:
        h = 0
    ran("fg_fusion")
    sem = torch.randn(2, 5, h, w, dtype=torch.float64, requires_grad=True)
    rpn = [torch.randn(2, 3, lh, lw, dtype=torch.float64, requires_grad=True) for lh, lw in levels]
    fused = ops.fg_fusion(sem, rpn, 2, mode)
    for f, r in zip(fused, rpn):
        assert torch.equal(f, torch.zeros_like(r))
    if any(f.numel() for f in fused):
        sum(f.sum() for f in fused).backward()
        assert all(r.grad is None or torch.count_nonzero(r.grad) == 0 for r in rpn)
        assert sem.grad is None or sem.grad.numel() == 0


@fuzz
@given(b=st.integers(0, 2), h=st.integers(0, 3), w=st.integers(0, 3))
def test_pq_pair_counts_of_empty_maps(b, h, w):
    ran("pq_pair_counts")
    if b * h * w:
        b = 0
    ids = torch.zeros(b, h, w, dtype=torch.int64)
    for t in torch.ops.eyecool.pq_pair_counts(ids, ids):
        assert t.shape == (0,) and t.dtype == torch.int64
