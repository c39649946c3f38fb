"""panoptic_png_ids / decode_panoptic_png: every PNG filter type against a numpy encoder, and whole PNGs
against PIL."""
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eyecool_ext import ops, reference
from op_tester import needs_compiled


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_scanlines(pixels: np.ndarray, filters) -> torch.Tensor:
    """PNG encoder side: [H, W, C] uint8 pixels and one filter type per row -> filtered scanlines."""
    height, width, channels = pixels.shape
    x = pixels.reshape(height, width * channels).astype(np.int64)
    out = []
    for y in range(height):
        row = x[y]
        prior = x[y - 1] if y > 0 else np.zeros_like(row)
        left = np.concatenate([np.zeros(channels, np.int64), row[:-channels]])
        upper_left = np.concatenate([np.zeros(channels, np.int64), prior[:-channels]])
        predicted = {0: 0, 1: left, 2: prior, 3: (left + prior) // 2, 4: paeth(left, prior, upper_left)}[filters[y]]
        out.append(np.concatenate([[filters[y]], (row - predicted) % 256]))
    return torch.from_numpy(np.concatenate(out).astype(np.uint8))


def expected_ids(pixels):
    p = pixels.astype(np.int64)
    return p[..., 0] + 256 * p[..., 1] + 65536 * p[..., 2]


@pytest.mark.parametrize("channels", [3, 4])
def test_every_filter_type_round_trips(channels):
    rng = np.random.default_rng(channels)
    # Flat blocks (the Paeth shortcut) and noise (the full predictor), each row with its own filter.
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (4, 3, channels)), 3, 0), 4, 1).astype(np.uint8)
    pixels[rng.random(pixels.shape[:2]) < 0.2] = rng.integers(0, 256, channels)
    filters = [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 4, 4]
    scanlines = filter_scanlines(pixels, filters)
    ids = ops.panoptic_png_ids(scanlines, 12, 12, channels)
    assert ids.dtype == torch.int32 and ids.shape == (12, 12)
    assert np.array_equal(ids.numpy(), expected_ids(pixels))
    assert torch.equal(reference.panoptic_png_ids(scanlines, 12, 12, channels), ids)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("compress_level", [0, 1, 6, 9])
def test_decode_matches_pil(mode, compress_level):
    rng = np.random.default_rng(compress_level)
    ids = rng.integers(0, 2**24, (5, 6))[np.repeat(np.arange(5), 8)[:, None] % 5, np.arange(37)[None] % 6]
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    decoded = ops.decode_panoptic_png(buffer.getvalue())
    assert np.array_equal(decoded.numpy(), ids)


def test_unsupported_pngs_are_reported():
    for image in (Image.new("L", (4, 3)), Image.new("I;16", (4, 3)), Image.new("P", (4, 3))):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        with pytest.raises(ops.UnsupportedPNG, match="only 8-bit non-interlaced RGB or RGBA"):
            ops.decode_panoptic_png(buffer.getvalue())
    with pytest.raises(ops.UnsupportedPNG, match="not a PNG"):
        ops.decode_panoptic_png(b"GIF89a")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buffer, format="PNG")
    data = buffer.getvalue()
    start = data.index(b"IDAT") + 4
    truncated = data[:start] + data[start:start + 5] + data[-12:]
    with pytest.raises(ops.UnsupportedPNG):
        ops.decode_panoptic_png(truncated)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="scanlines must be a 1-d uint8 tensor"):
        ops.panoptic_png_ids(torch.zeros(10, dtype=torch.int32), 1, 3, 3)
    with pytest.raises(ValueError, match="channels must be 3 \\(RGB\\) or 4 \\(RGBA\\), got 2"):
        ops.panoptic_png_ids(torch.zeros(10, dtype=torch.uint8), 1, 3, 2)
    with pytest.raises(ValueError, match="needs 20 bytes of scanlines, got 19"):
        ops.panoptic_png_ids(torch.zeros(19, dtype=torch.uint8), 2, 3, 3)
    bad_filter = torch.zeros(10, dtype=torch.uint8)
    bad_filter[0] = 7
    with pytest.raises((RuntimeError, ValueError), match="row 0 has unknown filter type 7"):
        ops.panoptic_png_ids(bad_filter, 1, 3, 3)


def _png(ids: np.ndarray, mode: str = "RGB", compress_level: int = 6) -> bytes:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _sorted_pairs(gt_ids, pred_ids):
    """(gt, pred, count) of two id maps the way panopticapi counts them: np.unique of gt * 2^24 + pred."""
    keys, counts = np.unique(gt_ids.astype(np.int64) * 2**24 + pred_ids, return_counts=True)
    return keys // 2**24, keys % 2**24, counts


def _blocky_ids(rng, height, width, num_ids, block):
    """Id maps of flat blocks (repeated rows and long runs, as panoptic PNGs are) with some noise rows."""
    cells = rng.integers(0, num_ids, (height // block + 1, width // block + 1))
    ids = rng.integers(0, 2**24, num_ids)[cells.repeat(block, 0).repeat(block, 1)[:height, :width]]
    ids[rng.random(height) < 0.1] = rng.integers(0, 2**24)
    return ids


@needs_compiled
@pytest.mark.parametrize("gt_channels,pred_channels", [(3, 3), (3, 4), (4, 3), (4, 4)])
def test_pair_counts_from_scanlines_match_the_id_maps(gt_channels, pred_channels):
    rng = np.random.default_rng(gt_channels * 10 + pred_channels)
    height, width = 14, 11
    gt_pixels = np.repeat(np.repeat(rng.integers(0, 256, (5, 4, gt_channels)), 3, 0), 3, 1)[:height, :width]
    pred_pixels = np.repeat(np.repeat(rng.integers(0, 256, (7, 3, pred_channels)), 2, 0), 4, 1)[:height, :width]
    gt_pixels[rng.random((height, width)) < 0.1] = rng.integers(0, 256, gt_channels)
    # Rows that repeat the row above on one side only, on both, and not at all, each with every filter type.
    gt_filters = [4, 2, 2, 1, 0, 3, 2, 2, 4, 2, 1, 2, 2, 3]
    pred_filters = [1, 2, 4, 2, 2, 2, 3, 0, 2, 4, 2, 2, 1, 2]
    gt_scanlines = filter_scanlines(gt_pixels.astype(np.uint8), gt_filters)
    pred_scanlines = filter_scanlines(pred_pixels.astype(np.uint8), pred_filters)
    gt_id, pred_id, count = torch.ops.eyecool.panoptic_png_pair_counts(
        gt_scanlines, pred_scanlines, height, width, gt_channels, pred_channels)
    want = _sorted_pairs(expected_ids(gt_pixels), expected_ids(pred_pixels))
    for got, expected in zip((gt_id, pred_id, count), want):
        assert got.dtype == torch.int64 and np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("modes", [("RGB", "RGB"), ("RGBA", "RGB")])
def test_pair_counts_of_whole_pngs_equal_pil_decoding(modes):
    rng = np.random.default_rng(7)
    gt_ids = _blocky_ids(rng, 61, 83, 12, 6)
    pred_ids = _blocky_ids(rng, 61, 83, 15, 4)
    gt_png = ops.parse_panoptic_png(_png(gt_ids, modes[0]))
    pred_png = ops.parse_panoptic_png(_png(pred_ids, modes[1], compress_level=1))
    assert (gt_png.height, gt_png.width, gt_png.channels) == (61, 83, 4 if modes[0] == "RGBA" else 3)
    gt_id, pred_id, count = ops.panoptic_png_pair_counts(gt_png, pred_png)
    for got, expected in zip((gt_id, pred_id, count), _sorted_pairs(gt_ids, pred_ids)):
        assert np.array_equal(got.numpy(), expected)
    # The per-thread inflate buffers are reused: a second, smaller pair must not see the first one's bytes.
    small = _blocky_ids(rng, 9, 10, 3, 3)
    got = ops.panoptic_png_pair_counts(ops.parse_panoptic_png(_png(small)), ops.parse_panoptic_png(_png(small)))
    assert np.array_equal(got[2].numpy(), _sorted_pairs(small, small)[2])


def test_pair_counts_of_pngs_of_different_sizes_is_an_error():
    a = ops.parse_panoptic_png(_png(np.zeros((4, 5), np.int64)))
    b = ops.parse_panoptic_png(_png(np.zeros((5, 4), np.int64)))
    with pytest.raises(ValueError, match=r"prediction PNG is 4 x 5 \(width x height\) but the gt PNG is 5 x 4"):
        ops.panoptic_png_pair_counts(a, b)


@needs_compiled
def test_pair_counts_bad_scanlines_name_the_argument():
    good = filter_scanlines(np.zeros((2, 3, 3), np.uint8), [0, 2])
    with pytest.raises(RuntimeError, match="needs 20 bytes of pred_scanlines, got 19"):
        torch.ops.eyecool.panoptic_png_pair_counts(good, good[:19], 2, 3, 3, 3)
    with pytest.raises(RuntimeError, match="gt_scanlines must be a 1-d uint8 tensor"):
        torch.ops.eyecool.panoptic_png_pair_counts(good.int(), good, 2, 3, 3, 3)
    bad_filter = good.clone()
    bad_filter[10] = 9
    with pytest.raises(RuntimeError, match="row 1 has unknown filter type 9"):
        torch.ops.eyecool.panoptic_png_pair_counts(good, bad_filter, 2, 3, 3, 3)


@needs_compiled
def test_pair_counts_opcheck():
    gt = filter_scanlines(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3), [1, 4])
    pred = filter_scanlines(np.full((2, 3, 4), 9, dtype=np.uint8), [0, 2])
    torch.library.opcheck(torch.ops.eyecool.panoptic_png_pair_counts.default, (gt, pred, 2, 3, 3, 4))


@needs_compiled
def test_opcheck():
    scanlines = filter_scanlines(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3), [1, 4])
    torch.library.opcheck(torch.ops.eyecool.panoptic_png_ids.default, (scanlines, 2, 3, 3))


def test_decoding_without_the_compiled_extension():
    """With _C unimportable, decode_panoptic_png decodes with PIL and gives the same ids."""
    code = (
        "import sys, io, warnings; sys.modules['eyecool_ext._C'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import numpy as np; from PIL import Image; import eyecool_ext\n"
        "assert not eyecool_ext.compiled()\n"
        "ids = np.arange(12 * 9).reshape(12, 9) * 1234567 % 2**24\n"
        "rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)\n"
        "buf = io.BytesIO(); Image.fromarray(rgb).save(buf, format='PNG')\n"
        "assert np.array_equal(eyecool_ext.ops.decode_panoptic_png(buf.getvalue()).numpy(), ids)\n"
        "png = eyecool_ext.ops.parse_panoptic_png(buf.getvalue())\n"
        "_, _, count = eyecool_ext.ops.panoptic_png_pair_counts(png, png)\n"
        "assert count.sum().item() == ids.size and len(count) == len(np.unique(ids))\n"
        "print('fallback ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "fallback ok" in res.stdout


def _statistics_inputs():
    """A 2x3 RGB gt with six one-pixel segments and an RGBA prediction of one segment, with their tables."""
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    gt = filter_scanlines(rgb, [1, 4])
    pred = filter_scanlines(np.full((2, 3, 4), 9, dtype=np.uint8), [0, 2])
    channels = rgb.astype(np.int64)
    gt_ids = np.sort((channels[..., 0] + 256 * channels[..., 1] + 65536 * channels[..., 2]).ravel())
    gt_segments = torch.from_numpy(np.stack([gt_ids, np.zeros(6, np.int64), np.zeros(6, np.int64),
                                             np.ones(6, np.int64)]))
    pred_segments = torch.tensor([[9 + 9 * 256 + 9 * 65536], [0]])
    return gt, pred, gt_segments, pred_segments, torch.full((2,), -1, dtype=torch.int64)


@needs_compiled
def test_pq_statistics_opcheck_and_values():
    gt, pred, gt_segments, pred_segments, crowd = _statistics_inputs()
    args = (gt, pred, 2, 3, 3, 4, gt_segments, pred_segments, crowd, 2)
    torch.library.opcheck(torch.ops.eyecool.panoptic_png_pq_statistics.default, args)
    problem, category, iou, tp, fp, fn = torch.ops.eyecool.panoptic_png_pq_statistics(*args)
    # Six one-pixel gt segments of category 0 against one six-pixel prediction: IoU 1/6 each, no match, six
    # misses and one false positive.
    assert problem.tolist() == [0] and category.tolist() == [0]
    assert tp.tolist() == [0] and fp.tolist() == [1] and fn.tolist() == [6] and iou.tolist() == [0.0]


@needs_compiled
def test_pq_statistics_checks_its_tables():
    gt, pred, gt_segments, pred_segments, crowd = _statistics_inputs()
    op = torch.ops.eyecool.panoptic_png_pq_statistics
    with pytest.raises(RuntimeError, match=r"gt_segments must be a contiguous int64 CPU tensor \[4, segments\]"):
        op(gt, pred, 2, 3, 3, 4, gt_segments[:2].contiguous(), pred_segments, crowd, 2)
    with pytest.raises(RuntimeError, match="pred_segments row 0 has category index 5, expected"):
        op(gt, pred, 2, 3, 3, 4, gt_segments, torch.tensor([[592137], [5]]), crowd, 2)
    with pytest.raises(RuntimeError, match="gt_segments ids must be strictly ascending"):
        op(gt, pred, 2, 3, 3, 4, gt_segments.flip(1).contiguous(), pred_segments, crowd, 2)
    with pytest.raises(RuntimeError, match=r"crowd_of_category must be a contiguous int64 CPU tensor \[2\]"):
        op(gt, pred, 2, 3, 3, 4, gt_segments, pred_segments, crowd[:1], 2)
