"""Property-based tests of the panoptic PNG decoder: ``panoptic_png_ids`` against the reference unfilter on
generated scanlines (every filter type, also invalid ones, empty and one-pixel images, RGB and RGBA, buffers too
short or longer than needed), ``panoptic_png_pair_counts`` against the pair counts of the reference's id maps, and ``decode_panoptic_png`` on generated PNGs with corrupted, truncated or forged
bytes (huge dimensions in the header, bad chunk lengths). Every case decodes to the reference ids or is refused
with ``UnsupportedPNG`` / ``ValueError`` / ``RuntimeError`` and a message; none crashes or reads out of bounds.

The budget is small by default (CI); EYECOOL_FUZZ_EXAMPLES=2000 runs a long campaign on demand.
"""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from eyecool_ext import ops, reference
from fuzz_tools import fuzz, ran
from op_tester import needs_compiled


@fuzz
@given(st.integers(0, 5), st.integers(0, 5), st.sampled_from([3, 4]), st.lists(st.integers(0, 4), min_size=5,
       max_size=5), st.integers(0, 3), st.integers(0, 2**16))
def test_panoptic_png_ids_matches_reference(height, width, channels, filters, extra, seed):
    ran("panoptic_png_ids")
    g = torch.Generator().manual_seed(seed)
    stride = 1 + width * channels
    scanlines = torch.randint(0, 256, (height * stride + extra,), generator=g, dtype=torch.uint8)
    for y in range(height):
        scanlines[y * stride] = filters[y]
    ids = ops.panoptic_png_ids(scanlines, height, width, channels)
    assert ids.dtype == torch.int32 and ids.shape == (height, width)
    assert torch.equal(ids, reference.panoptic_png_ids(scanlines, height, width, channels))


@fuzz
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([3, 4]), st.integers(5, 255), st.integers(0, 3),
       st.integers(0, 2**16))
def test_unknown_filter_types_are_refused(height, width, channels, bad_filter, row, seed):
    ran("panoptic_png_ids")
    g = torch.Generator().manual_seed(seed)
    stride = 1 + width * channels
    scanlines = torch.randint(0, 256, (height * stride,), generator=g, dtype=torch.uint8)
    for y in range(height):
        scanlines[y * stride] = 0
    scanlines[(row % height) * stride] = bad_filter
    with pytest.raises((ValueError, RuntimeError), match="filter"):
        ops.panoptic_png_ids(scanlines, height, width, channels)


@fuzz
@given(st.integers(1, 5), st.integers(1, 5), st.sampled_from([3, 4]), st.integers(1, 20))
def test_short_scanlines_are_refused(height, width, channels, missing):
    ran("panoptic_png_ids")
    needed = height * (1 + width * channels)
    scanlines = torch.zeros(max(0, needed - missing), dtype=torch.uint8)
    with pytest.raises(ValueError, match="truncated"):
        ops.panoptic_png_ids(scanlines, height, width, channels)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@fuzz
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from(["RGB", "RGBA"]), st.sampled_from(
    ["truncate", "flip_bytes", "huge_header", "bad_length", "none"]), st.integers(0, 10**6), st.integers(0, 2**16))
def test_decode_corrupted_png_never_crashes(height, width, mode, corruption, where, seed):
    """A corrupted panoptic PNG decodes to PIL's ids when it is still valid, or is refused with a message."""
    ran("panoptic_png_ids")
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4, (height, width, len(mode)), dtype=np.uint8) * 60
    data = bytearray(_png_bytes(pixels))
    if corruption == "truncate":
        data = data[: 8 + where % (len(data) - 8)]
    elif corruption == "flip_bytes":
        for k in range(3):
            data[8 + (where + 7919 * k) % (len(data) - 8)] ^= 0xFF
    elif corruption == "huge_header":
        # A forged IHDR claiming a 2^31 - 1 pixel wide image in front of the real, small IDAT.
        header = struct.pack(">IIBBBBB", 2**31 - 1, 1 + where % 3, 8, 2 if mode == "RGB" else 6, 0, 0, 0)
        end_of_ihdr = 8 + 25
        data = data[:8] + _chunk(b"IHDR", header) + data[end_of_ihdr:]
    elif corruption == "bad_length":
        data[8 + 25:8 + 29] = struct.pack(">I", 2**31 + where)
    data = bytes(data)
    try:
        ids = ops.decode_panoptic_png(data)
    except (ValueError, RuntimeError, OSError) as error:  # UnsupportedPNG is a ValueError
        assert str(error)
        return
    # Decoded: then PIL must agree that these bytes are this image.
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    expected = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    assert np.array_equal(ids.numpy(), expected)


@needs_compiled
@fuzz
@given(st.integers(0, 5), st.integers(0, 5), st.sampled_from([3, 4]), st.sampled_from([3, 4]),
       st.lists(st.integers(0, 4), min_size=5, max_size=5), st.lists(st.integers(0, 4), min_size=5, max_size=5),
       st.integers(0, 2**16))
def test_panoptic_png_pair_counts_matches_the_id_maps(height, width, gt_channels, pred_channels, gt_filters,
                                                      pred_filters, seed):
    """Pair counts straight from two images' scanlines equal ``pq_pair_counts`` of their decoded id maps, for
    every mix of filter types (rows repeating the row above on one side, both or neither), sizes 0 and 1."""
    ran("panoptic_png_pair_counts")
    g = torch.Generator().manual_seed(seed)
    scanlines = []
    for channels, filters in ((gt_channels, gt_filters), (pred_channels, pred_filters)):
        stride = 1 + width * channels
        # Few distinct byte values, many zero residuals: repeated rows and long runs, as in real panoptic PNGs.
        lines = torch.randint(0, 3, (height * stride,), generator=g, dtype=torch.uint8) * 40
        lines[torch.rand(height * stride, generator=g) < 0.6] = 0
        for y in range(height):
            lines[y * stride] = filters[y]
            if filters[y] == 2 and torch.rand((), generator=g) < 0.7:
                lines[y * stride + 1:(y + 1) * stride] = 0  # an Up row with zero residuals repeats the row above
        scanlines.append(lines)
    gt_id, pred_id, count = torch.ops.eyecool.panoptic_png_pair_counts(*scanlines, height, width, gt_channels,
                                                                        pred_channels)
    gt_ids = reference.panoptic_png_ids(scanlines[0], height, width, gt_channels)
    pred_ids = reference.panoptic_png_ids(scanlines[1], height, width, pred_channels)
    expected = reference.pq_pair_counts(gt_ids, pred_ids)
    for got, want in zip((gt_id, pred_id, count), expected):
        assert torch.equal(got, want)
