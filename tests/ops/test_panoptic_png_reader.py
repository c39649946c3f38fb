"""The panoptic PNG reader (read_panoptic_png, panoptic_png_file_pq_statistics): every PNG filter type and
IDAT chunking against an encoder of the tests' own and the numpy reference unfilter, PIL-written PNGs against
PIL, what it leaves to PIL, both inflaters (libdeflate and zlib), and the PQ statistics of whole files against
the numpy rules (``eyecool.evaluation.panoptic_quality.match_segments``) on pair counts of the reference's maps."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eyecool_ext import ops, reference
from op_tester import needs_compiled
from png_files import chunk, filter_scanlines, id_png, pixel_ids, png_from_scanlines

needs_reader = pytest.mark.skipif(not ops.file_pq_statistics_available(),
                                  reason="needs the compiled PNG reader and an inflater")


def _write(tmp_path, name, data: bytes) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@needs_reader
@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("idat_chunks", [1, 5])
def test_every_filter_type_round_trips(tmp_path, channels, idat_chunks):
    rng = np.random.default_rng(channels)
    # Flat blocks (the Paeth and Sub shortcuts, repeated Up rows) and noise (the full predictors), each row with
    # its own filter.
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (4, 3, channels)), 3, 0), 4, 1).astype(np.uint8)
    pixels[rng.random(pixels.shape[:2]) < 0.2] = rng.integers(0, 256, channels)
    filters = [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 4, 4]
    scanlines = filter_scanlines(pixels, filters)
    path = _write(tmp_path, "f.png", png_from_scanlines(scanlines, 12, 12, channels, idat_chunks))
    ids = ops.read_panoptic_png(path)
    assert ids.dtype == torch.int32 and ids.shape == (12, 12)
    assert np.array_equal(ids.numpy(), pixel_ids(pixels))
    assert torch.equal(reference.panoptic_png_ids(scanlines, 12, 12, channels), ids)


@needs_reader
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("compress_level", [0, 1, 6, 9])
def test_read_matches_pil(tmp_path, mode, compress_level):
    rng = np.random.default_rng(compress_level)
    ids = rng.integers(0, 2**24, (5, 6))[np.repeat(np.arange(5), 8)[:, None] % 5, np.arange(37)[None] % 6]
    path = _write(tmp_path, "p.png", id_png(ids, mode, compress_level))
    assert np.array_equal(ops.read_panoptic_png(path).numpy(), ids)
    # The per-thread buffers are reused: a second, smaller image must not see the first one's bytes.
    small = ids[:3, :4]
    assert np.array_equal(ops.read_panoptic_png(_write(tmp_path, "s.png", id_png(small, mode))).numpy(), small)


@needs_reader
def test_ancillary_chunks_are_skipped(tmp_path):
    """Chunks other than IHDR, IDAT and IEND (text, gamma, private ones) are CRC-checked and skipped."""
    ids = np.random.default_rng(4).integers(0, 2**24, (6, 5))
    data = id_png(ids)
    ihdr_end = 8 + 25
    extra = chunk(b"tEXt", b"Comment\0written by a test") + chunk(b"gAMA", b"\0\0\xb1\x8f") + chunk(b"prIv", b"x" * 40)
    path = _write(tmp_path, "a.png", data[:ihdr_end] + extra + data[ihdr_end:])
    assert np.array_equal(ops.read_panoptic_png(path).numpy(), ids)

@needs_reader
def test_what_the_reader_does_not_handle_is_none(tmp_path):
    for mode in ("L", "I;16", "P"):
        assert ops.read_panoptic_png(_write(tmp_path, "k.png", id_png(np.zeros((3, 4), np.int64), mode))) is None
    assert ops.read_panoptic_png(_write(tmp_path, "gif.png", b"GIF89a")) is None
    assert ops.read_panoptic_png(str(tmp_path / "missing.png")) is None
    data = id_png(np.arange(1200).reshape(30, 40))
    start = data.index(b"IDAT") + 4
    assert ops.read_panoptic_png(_write(tmp_path, "t.png", data[:start] + data[start:start + 5] + data[-12:])) is None
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10  # caught by the chunk CRC
    assert ops.read_panoptic_png(_write(tmp_path, "c.png", bytes(flipped))) is None
    bad_filter = filter_scanlines(np.zeros((2, 3, 3), np.uint8), [0, 2])
    bad_filter[10] = 7  # row 1's filter byte (rows are 1 + 3 * 3 bytes): a valid file, an unknown filter type
    assert ops.read_panoptic_png(_write(tmp_path, "u.png", png_from_scanlines(bad_filter, 2, 3, 3))) is None
    short = filter_scanlines(np.zeros((2, 3, 3), np.uint8), [0, 2])[:-1]  # inflates to one byte too few
    assert ops.read_panoptic_png(_write(tmp_path, "short.png", png_from_scanlines(short, 2, 3, 3))) is None


def test_inflater_is_named():
    assert ops.png_inflater() in ("libdeflate", "zlib", "")
    if ops.file_pq_statistics_available():
        assert ops.png_inflater() in ("libdeflate", "zlib")


@needs_reader
def test_zlib_inflater_reads_the_same_ids(tmp_path):
    """EYECOOL_PNG_INFLATER=zlib skips libdeflate: the portable inflater gives the same ids and refuses the same
    broken files."""
    ids = np.random.default_rng(3).integers(0, 2**24, (7, 9))
    good = _write(tmp_path, "g.png", id_png(ids, "RGBA", 9))
    data = bytearray(id_png(ids))
    data[-20] ^= 0x40
    broken = _write(tmp_path, "b.png", bytes(data))
    code = ("import numpy as np, sys; from eyecool_ext import ops\n"
            "assert ops.png_inflater() == 'zlib', ops.png_inflater()\n"
            f"ids = ops.read_panoptic_png({good!r}).numpy(); np.save(sys.argv[1], ids)\n"
            f"assert ops.read_panoptic_png({broken!r}) is None\n")
    out = str(tmp_path / "ids.npy")
    env = dict(os.environ, EYECOOL_PNG_INFLATER="zlib")
    res = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert np.array_equal(np.load(out), ids)


def test_reading_without_the_compiled_extension(tmp_path):
    """With _C unimportable the reader handles nothing (None) and read_id_map decodes with PIL."""
    ids = np.arange(12 * 9).reshape(12, 9) * 1234567 % 2**24
    path = _write(tmp_path, "x.png", id_png(ids))
    code = ("import sys, warnings; sys.modules['eyecool_ext._C'] = None\n"
            "warnings.simplefilter('ignore')\n"
            "import numpy as np; import eyecool_ext; from eyecool_ext import ops\n"
            "from eyecool.panoptic_format import read_id_map\n"
            "assert not eyecool_ext.compiled() and ops.png_inflater() == ''\n"
            f"assert ops.read_panoptic_png({path!r}) is None and not ops.file_pq_statistics_available()\n"
            f"ids = read_id_map({path!r}); assert ids.dtype == np.int32\n"
            f"assert np.array_equal(ids, np.arange(12 * 9).reshape(12, 9) * 1234567 % 2**24)\n"
            "print('fallback ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "fallback ok" in res.stdout


# ---- panoptic_png_file_pq_statistics: pair counting straight from the two files' rows, then the matching ----


def _tables(gt_ids, pred_ids, num_categories=2):
    """Segment tables listing every id of the two maps: gt ids alternate between the two categories (areas from
    the map), predictions too; gt ids divisible by 7 are crowd."""
    from eyecool.evaluation.panoptic_quality import CategoryTable, segment_table

    categories = CategoryTable([{"id": c + 1, "isthing": c % 2} for c in range(num_categories)])

    def info(ids, crowd):
        values, areas = np.unique(ids, return_counts=True)
        return [{"id": int(v), "category_id": 1 + int(v) % num_categories, "area": int(a),
                 "iscrowd": int(crowd and v % 7 == 0)} for v, a in zip(values, areas) if v != 0]

    gt = segment_table(info(gt_ids, True), categories, 0, "gt")
    pred = segment_table(info(pred_ids, False), categories, 0, "prediction")
    return gt, pred, num_categories


@needs_reader
@pytest.mark.parametrize("gt_channels,pred_channels", [(3, 3), (3, 4), (4, 3), (4, 4)])
def test_file_statistics_equal_the_numpy_rules_on_every_filter_mix(tmp_path, gt_channels, pred_channels):
    """Rows that repeat the row above on one side only, on both, and not at all, each with every filter type,
    RGB against RGBA: the statistics equal match_segments of pq_pair_counts of the reference's id maps."""
    from eyecool.evaluation.panoptic_quality import match_segments

    rng = np.random.default_rng(gt_channels * 10 + pred_channels)
    height, width = 14, 11
    values = np.arange(6, dtype=np.uint8) * 40  # few distinct bytes: segments share ids across the two maps
    gt_pixels = values[rng.integers(0, 3, (5, 4, gt_channels))].repeat(3, 0).repeat(3, 1)[:height, :width]
    pred_pixels = values[rng.integers(0, 3, (7, 3, pred_channels))].repeat(2, 0).repeat(4, 1)[:height, :width]
    gt_pixels[rng.random((height, width)) < 0.1] = values[rng.integers(0, 3, gt_channels)]
    gt_filters = [4, 2, 2, 1, 0, 3, 2, 2, 4, 2, 1, 2, 2, 3]
    pred_filters = [1, 2, 4, 2, 2, 2, 3, 0, 2, 4, 2, 2, 1, 2]
    scanlines = [filter_scanlines(gt_pixels, gt_filters), filter_scanlines(pred_pixels, pred_filters)]
    paths = [_write(tmp_path, f"{side}.png", png_from_scanlines(lines, height, width, channels))
             for side, lines, channels in (("gt", scanlines[0], gt_channels), ("pred", scanlines[1], pred_channels))]
    gt_ids = reference.panoptic_png_ids(scanlines[0], height, width, gt_channels)
    pred_ids = reference.panoptic_png_ids(scanlines[1], height, width, pred_channels)
    gt, pred, num_categories = _tables(gt_ids.numpy(), pred_ids.numpy())
    pairs = tuple(t.numpy() for t in reference.pq_pair_counts(gt_ids, pred_ids))
    expected = match_segments(pairs, gt, pred, num_categories, 0)
    problem, *ours = ops.panoptic_png_file_pq_statistics(
        *paths, gt.packed(True), pred.packed(False), torch.from_numpy(gt.crowd_of_category), num_categories)
    assert problem == 0
    for got, want in zip(ours, (expected.category, expected.iou, expected.tp, expected.fp, expected.fn)):
        assert np.array_equal(got.numpy(), want)


def _one_image_tables():
    """A 2x3 gt with six one-pixel segments of category 0 and a prediction of one segment, with their tables."""
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    gt_ids = np.sort(pixel_ids(rgb).ravel())
    gt_segments = torch.from_numpy(np.stack([gt_ids, np.zeros(6, np.int64), np.zeros(6, np.int64),
                                             np.ones(6, np.int64)]))
    pred_segments = torch.tensor([[9 + 9 * 256 + 9 * 65536], [0]])
    return rgb, gt_segments, pred_segments, torch.full((2,), -1, dtype=torch.int64)


@needs_reader
def test_file_statistics_values_and_opcheck(tmp_path):
    rgb, gt_segments, pred_segments, crowd = _one_image_tables()
    gt = _write(tmp_path, "gt.png", png_from_scanlines(filter_scanlines(rgb, [1, 4]), 2, 3, 3))
    pred = _write(tmp_path, "pred.png", png_from_scanlines(filter_scanlines(np.full((2, 3, 4), 9, np.uint8), [0, 2]),
                                                           2, 3, 4))
    args = (gt, pred, gt_segments, pred_segments, crowd, 2)
    torch.library.opcheck(torch.ops.eyecool.panoptic_png_file_pq_statistics.default, args)
    problem, category, iou, tp, fp, fn = ops.panoptic_png_file_pq_statistics(*args)
    # Six one-pixel gt segments of category 0 against one six-pixel prediction: IoU 1/6 each, no match, six
    # misses and one false positive.
    assert problem == 0 and category.tolist() == [0]
    assert tp.tolist() == [0] and fp.tolist() == [1] and fn.tolist() == [6] and iou.tolist() == [0.0]
    taller = _write(tmp_path, "taller.png", id_png(np.zeros((3, 3), np.int64)))
    assert ops.panoptic_png_file_pq_statistics(gt, taller, gt_segments, pred_segments, crowd, 2)[0] == 5


@needs_compiled
def test_file_statistics_check_their_tables(tmp_path):
    _, gt_segments, pred_segments, crowd = _one_image_tables()
    op = torch.ops.eyecool.panoptic_png_file_pq_statistics
    paths = ("gt.png", "pred.png")  # checked before any file is opened
    with pytest.raises(RuntimeError, match=r"gt_segments must be a contiguous int64 CPU tensor \[4, segments\]"):
        op(*paths, gt_segments[:2].contiguous(), pred_segments, crowd, 2)
    with pytest.raises(RuntimeError, match="pred_segments row 0 has category index 5, expected"):
        op(*paths, gt_segments, torch.tensor([[592137], [5]]), crowd, 2)
    with pytest.raises(RuntimeError, match="gt_segments ids must be strictly ascending"):
        op(*paths, gt_segments.flip(1).contiguous(), pred_segments, crowd, 2)
    with pytest.raises(RuntimeError, match=r"crowd_of_category must be a contiguous int64 CPU tensor \[2\]"):
        op(*paths, gt_segments, pred_segments, crowd[:1], 2)
    with pytest.raises(RuntimeError, match="num_categories must be >= 0"):
        op(*paths, gt_segments, pred_segments, crowd, -1)
