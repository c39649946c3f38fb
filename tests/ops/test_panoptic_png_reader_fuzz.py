"""Property-based tests of the panoptic PNG reader: ``read_panoptic_png`` against the reference unfilter on
generated files (every filter type, also invalid ones, one-pixel and empty images, RGB and RGBA, image data that
inflates to too few or too many bytes, several IDAT chunks), on PIL-written PNGs with corrupted, truncated or
forged bytes (huge dimensions in the header, bad chunk lengths), and ``panoptic_png_file_pq_statistics`` against
the numpy rules on the pair counts of the reference's id maps. Every case reads to the reference ids or is left
to PIL (None); none crashes or reads out of bounds.

The budget is small by default (CI); EYECOOL_FUZZ_EXAMPLES=2000 runs a long campaign on demand.
"""
import io
import os
import struct
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from eyecool_ext import ops, reference
from fuzz_tools import fuzz, ran
from png_files import chunk, png_from_scanlines

pytestmark = pytest.mark.skipif(not ops.file_pq_statistics_available(),
                                reason="needs the compiled PNG reader and an inflater")
FOLDER = tempfile.mkdtemp(prefix="eyecool_png_fuzz_")


def _write(name: str, data: bytes) -> str:
    path = os.path.join(FOLDER, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@fuzz
@given(st.integers(0, 5), st.integers(0, 5), st.sampled_from([3, 4]), st.lists(st.integers(0, 4), min_size=5,
       max_size=5), st.integers(-2, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_read_matches_the_reference(height, width, channels, filters, extra, idat_chunks, seed):
    """Random scanlines with every filter type; ``extra`` bytes too many (> 0) or too few (< 0) in the stream."""
    ran("read_panoptic_png")
    g = torch.Generator().manual_seed(seed)
    stride = 1 + width * channels
    scanlines = torch.randint(0, 256, (max(0, height * stride + extra),), generator=g, dtype=torch.uint8)
    for y in range(height):
        if y * stride < len(scanlines):
            scanlines[y * stride] = filters[y]
    ids = ops.read_panoptic_png(_write("r.png", png_from_scanlines(scanlines, height, width, channels, idat_chunks)))
    if height == 0 or width == 0 or extra != 0:
        assert ids is None  # no image, or image data of another size than the header's
        return
    assert ids.dtype == torch.int32 and ids.shape == (height, width)
    assert torch.equal(ids, reference.panoptic_png_ids(scanlines, height, width, channels))


@fuzz
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([3, 4]), st.integers(5, 255), st.integers(0, 3),
       st.integers(0, 2**16))
def test_unknown_filter_types_are_left_to_pil(height, width, channels, bad_filter, row, seed):
    ran("read_panoptic_png")
    g = torch.Generator().manual_seed(seed)
    stride = 1 + width * channels
    scanlines = torch.randint(0, 256, (height * stride,), generator=g, dtype=torch.uint8)
    for y in range(height):
        scanlines[y * stride] = 0
    scanlines[(row % height) * stride] = bad_filter
    assert ops.read_panoptic_png(_write("u.png", png_from_scanlines(scanlines, height, width, channels))) is None


def _pil_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@fuzz
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from(["RGB", "RGBA"]), st.sampled_from(
    ["truncate", "flip_bytes", "huge_header", "bad_length", "none"]), st.integers(0, 10**6), st.integers(0, 2**16))
def test_corrupted_png_never_crashes(height, width, mode, corruption, where, seed):
    """A corrupted panoptic PNG reads to PIL's ids when it is still valid, or is left to PIL (None)."""
    ran("read_panoptic_png")
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4, (height, width, len(mode)), dtype=np.uint8) * 60
    data = bytearray(_pil_png(pixels))
    if corruption == "truncate":
        data = data[: 8 + where % (len(data) - 8)]
    elif corruption == "flip_bytes":
        for k in range(3):
            data[8 + (where + 7919 * k) % (len(data) - 8)] ^= 0xFF
    elif corruption == "huge_header":
        # A forged IHDR claiming a 2^31 - 1 pixel wide image in front of the real, small IDAT.
        header = struct.pack(">IIBBBBB", 2**31 - 1, 1 + where % 3, 8, 2 if mode == "RGB" else 6, 0, 0, 0)
        end_of_ihdr = 8 + 25
        data = data[:8] + chunk(b"IHDR", header) + data[end_of_ihdr:]
    elif corruption == "bad_length":
        data[8 + 25:8 + 29] = struct.pack(">I", 2**31 + where)
    path = _write("c.png", bytes(data))
    ids = ops.read_panoptic_png(path)
    if ids is None:
        return
    # Read: then PIL must agree that these bytes are this image.
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    expected = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    assert np.array_equal(ids.numpy(), expected)


@fuzz
@given(st.integers(1, 5), st.integers(1, 5), st.sampled_from([3, 4]), st.sampled_from([3, 4]),
       st.lists(st.integers(0, 4), min_size=5, max_size=5), st.lists(st.integers(0, 4), min_size=5, max_size=5),
       st.integers(0, 2**16))
def test_file_statistics_match_the_numpy_rules(height, width, gt_channels, pred_channels, gt_filters, pred_filters,
                                               seed):
    """Statistics straight from two files' rows equal match_segments of the reference maps' pair counts, for
    every mix of filter types (rows repeating the row above on one side, both or neither) and sizes 1 up."""
    from eyecool.evaluation.panoptic_quality import CategoryTable, match_segments, segment_table

    ran("panoptic_png_file_pq_statistics")
    g = torch.Generator().manual_seed(seed)
    scanlines, paths = [], []
    for side, channels, filters in (("gt", gt_channels, gt_filters), ("pred", pred_channels, pred_filters)):
        stride = 1 + width * channels
        # Few distinct byte values, many zero residuals: repeated rows and long runs, as in real panoptic PNGs.
        lines = torch.randint(0, 3, (height * stride,), generator=g, dtype=torch.uint8) * 40
        lines[torch.rand(height * stride, generator=g) < 0.6] = 0
        for y in range(height):
            lines[y * stride] = filters[y]
            if filters[y] == 2 and torch.rand((), generator=g) < 0.7:
                lines[y * stride + 1:(y + 1) * stride] = 0  # an Up row with zero residuals repeats the row above
        scanlines.append(lines)
        paths.append(_write(f"{side}.png", png_from_scanlines(lines, height, width, channels)))
    gt_ids = reference.panoptic_png_ids(scanlines[0], height, width, gt_channels)
    pred_ids = reference.panoptic_png_ids(scanlines[1], height, width, pred_channels)
    categories = CategoryTable([{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}])

    def info(ids, crowd):
        values, areas = np.unique(ids.numpy(), return_counts=True)
        return [{"id": int(v), "category_id": 1 + int(v) % 2, "area": int(a), "iscrowd": int(crowd and v % 3 == 0)}
                for v, a in zip(values, areas) if v != 0]

    gt = segment_table(info(gt_ids, True), categories, 0, "gt")
    pred = segment_table(info(pred_ids, False), categories, 0, "prediction")
    pairs = tuple(t.numpy() for t in reference.pq_pair_counts(gt_ids, pred_ids))
    expected = match_segments(pairs, gt, pred, 2, 0)
    problem, *ours = ops.panoptic_png_file_pq_statistics(
        *paths, gt.packed(True), pred.packed(False), torch.from_numpy(gt.crowd_of_category), 2)
    assert problem == 0
    for got, want in zip(ours, (expected.category, expected.iou, expected.tp, expected.fp, expected.fn)):
        assert np.array_equal(got.numpy(), want)
