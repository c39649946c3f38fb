"""pq_compute: every panopticapi rule on hand-built images, a randomised comparison with panopticapi itself,
and the errors for inconsistent data."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch

from eyecool.evaluation import PanopticFormatError, format_table, pq_compute, summary, write_summary_json
from eyecool.evaluation.panoptic_quality import (CategoryTable, file_statistics, match_segments, pair_counts,
                                                 segment_table)
from eyecool.panoptic_format import read_id_map
from eyecool_ext import ops
from panoptic_data import CATEGORIES, id_map_to_rgb, random_pair, segments_info, write_split

try:
    from panopticapi.evaluation import pq_compute as panopticapi_pq_compute
except ImportError:  # the comparisons skip; the hand-computed expectations still run
    panopticapi_pq_compute = None

needs_panopticapi = pytest.mark.skipif(panopticapi_pq_compute is None, reason="panopticapi-lite not installed")


def evaluate(tmp_path, gt_images, pred_images, categories=CATEGORIES, compare=True):
    gt_json, gt_dir = write_split(str(tmp_path), "gt", gt_images, categories)
    pred_json, pred_dir = write_split(str(tmp_path), "pred", pred_images, categories)
    ours = pq_compute(gt_json, pred_json, gt_dir, pred_dir, verbose=False)
    if compare and panopticapi_pq_compute is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            theirs = panopticapi_pq_compute(gt_json, pred_json, gt_dir, pred_dir)
        assert_same_results(ours, theirs)
    return ours


def assert_same_results(ours, theirs, tol=1e-9):
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == theirs[name]["n"], name
        for metric in ("pq", "sq", "rq"):
            assert abs(ours[name][metric] - theirs[name][metric]) <= tol, (name, metric)
    assert set(ours["per_class"]) == set(theirs["per_class"])
    for cat_id, r in theirs["per_class"].items():
        for metric in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][cat_id][metric] - r[metric]) <= tol, (cat_id, metric)


def image(image_id, ids, categories, crowd=None):
    ids = np.asarray(ids)
    return {"image_id": image_id, "ids": ids, "segments_info": segments_info(ids, categories, crowd)}


def test_iou_of_exactly_one_half_does_not_match(tmp_path):
    gt = np.full((4, 10), 2)
    gt[:2, :5] = 1                      # car, 10 px; sky (2) 30 px
    pred = np.full((4, 10), 8)          # sky prediction: rows 2-3, 20 px
    pred[:2] = 7                        # car prediction, 20 px: 10 on the car, 10 on sky -> IoU 10/20
    r = evaluate(tmp_path, [image(1, gt, {1: 2, 2: 10})], [image(1, pred, {7: 2, 8: 10})])
    assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}          # FP + FN, no TP
    assert r["per_class"][10]["pq"] == pytest.approx(2 / 3, abs=1e-12)     # 20 / (20 + 30 - 20)
    assert r["All"]["n"] == 2 and r["All"]["pq"] == pytest.approx(1 / 3, abs=1e-12)
    assert r["Things"]["n"] == 1 and r["Stuff"]["n"] == 1


def test_iou_just_above_one_half_matches(tmp_path):
    gt = np.full((4, 10), 2)
    gt[:2, :5] = 1
    pred = np.full((4, 10), 8)
    pred[:2] = 7
    pred[1, 9] = 0                      # one car-predicted pixel (on sky) becomes void: IoU 10/19
    r = evaluate(tmp_path, [image(1, gt, {1: 2, 2: 10})], [image(1, pred, {7: 2, 8: 10})])
    assert r["per_class"][2]["pq"] == pytest.approx(10 / 19, abs=1e-12)
    assert r["per_class"][2]["rq"] == 1.0


def test_pixels_on_gt_void_leave_the_union(tmp_path):
    gt = np.full((4, 10), 2)
    gt[0, :] = 1                        # person, 10 px
    gt[1, :] = 0                        # void, 10 px
    pred = np.full((4, 10), 9)
    pred[0, 4:] = 5                     # person prediction: 6 px on the person ...
    pred[1, :] = 5                      # ... and 10 px on void: IoU 6 / (16 + 10 - 6 - 10) = 0.6, not 6/20
    pred[0, :4] = 9
    r = evaluate(tmp_path, [image(1, gt, {1: 1, 2: 10})], [image(1, pred, {5: 1, 9: 10})])
    assert r["per_class"][1]["pq"] == pytest.approx(0.6, abs=1e-12)
    assert r["per_class"][1]["rq"] == 1.0


def test_crowd_regions_never_match_nor_count_as_misses(tmp_path):
    gt = np.full((4, 10), 2)
    gt[:2] = 3                          # a crowd of cars, 20 px; sky 20 px
    pred = np.full((4, 10), 11)
    pred[:2, :] = 9                     # car prediction: 20 px, all on the car crowd -> ignored
    pred[2, :3] = 10                    # person prediction on sky: a false positive
    r = evaluate(tmp_path, [image(1, gt, {3: 2, 2: 10}, crowd={3: 1})],
                 [image(1, pred, {9: 2, 10: 1, 11: 10})])
    assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["Things"]["n"] == 1                       # only the person (FP) counts; the car is left out
    assert r["per_class"][1]["rq"] == 0.0
    assert r["per_class"][10]["pq"] == pytest.approx(17 / 20, abs=1e-12)


def test_prediction_mostly_on_void_is_ignored_exactly_half_is_not(tmp_path):
    gt = np.full((4, 10), 2)
    gt[0] = 0                           # void row
    pred = np.full((4, 10), 8)
    pred[0, :6] = 4                     # road prediction: 6 px, all void -> ignored
    pred[0, 6:] = 5                     # car prediction: 4 px on void + 4 px on sky = exactly half -> FP
    pred[1, 6:] = 5
    r = evaluate(tmp_path, [image(1, gt, {2: 10})], [image(1, pred, {4: 11, 5: 2, 8: 10})])
    assert r["per_class"][11] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["Stuff"]["n"] == 1                        # road ignored: left out
    assert r["Things"]["n"] == 1 and r["per_class"][2]["rq"] == 0.0


def test_last_crowd_segment_of_a_category_is_the_one_that_counts(tmp_path):
    gt = np.full((4, 10), 2)
    gt[0] = 3                           # first car crowd
    gt[3] = 4                           # second car crowd (listed last)
    pred = np.full((4, 10), 8)
    pred[0] = 6                         # car prediction on the first crowd only: panopticapi counts it
    r = evaluate(tmp_path, [image(1, gt, {2: 10, 3: 2, 4: 2}, crowd={3: 1, 4: 1})],
                 [image(1, pred, {6: 2, 8: 10})])
    assert r["per_class"][2]["rq"] == 0.0 and r["Things"]["n"] == 1     # a false positive


def test_categories_absent_from_both_sides_are_left_out(tmp_path):
    gt = np.full((3, 3), 2)
    pred = np.full((3, 3), 5)
    # panopticapi raises ZeroDivisionError for the empty Things average: nothing to compare with.
    r = evaluate(tmp_path, [image(1, gt, {2: 11})], [image(1, pred, {5: 11})], compare=False)
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert r["Things"]["n"] == 0 and r["Things"]["pq"] == 0.0           # panopticapi divides by zero here
    assert set(r["per_class"]) == {1, 2, 10, 11}


@needs_panopticapi
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_data_matches_panopticapi(tmp_path, seed):
    rng = np.random.default_rng(seed)
    pairs = [random_pair(rng, image_id) for image_id in range(12)]
    gt_json, gt_dir = write_split(str(tmp_path), "gt", [g for g, _ in pairs])
    pred_json, pred_dir = write_split(str(tmp_path), "pred", [p for _, p in pairs])
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = panopticapi_pq_compute(gt_json, pred_json, gt_dir, pred_dir)
    ours = pq_compute(gt_json, pred_json, gt_dir, pred_dir, verbose=False)
    assert_same_results(ours, theirs)
    assert ours["All"]["n"] >= 3  # the data exercises matches, misses and false positives
    assert 0.0 < ours["All"]["pq"] < 1.0


def test_folder_defaults_and_printed_table(tmp_path, capsys):
    gt = np.full((3, 4), 2)
    json_gt, _ = write_split(str(tmp_path), "gt", [image(1, gt, {2: 10})])
    json_pred, _ = write_split(str(tmp_path), "pred", [image(1, gt * 3, {6: 10})])
    r = pq_compute(json_gt, json_pred)  # folders default to the JSON paths without .json
    out = capsys.readouterr().out
    assert "All" in out and "Things" in out and "Stuff" in out and "PQ" in out
    assert r["Stuff"]["pq"] == 1.0
    assert format_table(r).splitlines()[2].startswith("All       | 100.0")


def test_summary_json_keys(tmp_path):
    results = {"All": {"pq": 0.5, "sq": 0.75, "rq": 0.25, "n": 2}, "Things": {"pq": 0.1, "sq": 0.2, "rq": 0.3, "n": 1},
               "Stuff": {"pq": 0.4, "sq": 0.5, "rq": 0.6, "n": 1}, "per_class": {1: {"pq": 0.1, "sq": 0.2, "rq": 0.3}}}
    assert summary(results) == pytest.approx({"PQ": 50.0, "SQ": 75.0, "RQ": 25.0, "PQ_th": 10.0, "SQ_th": 20.0,
                                              "RQ_th": 30.0, "PQ_st": 40.0, "SQ_st": 50.0, "RQ_st": 60.0})
    path = str(tmp_path / "out" / "pq.json")
    write_summary_json(results, path, per_class=True)
    with open(path) as f:
        written = json.load(f)
    assert written["PQ_th"] == pytest.approx(10.0) and written["per_class"]["1"]["PQ"] == pytest.approx(10.0)


# ---- bad input ----------------------------------------------------------------------------------------------

def two_segment_case():
    gt = np.full((4, 6), 2)
    gt[:2] = 1
    pred = gt * 10
    return image(7, gt, {1: 1, 2: 10}), image(7, pred, {10: 1, 20: 10})


def run_case(tmp_path, gt_image, pred_image, **kwargs):
    gt_json, gt_dir = write_split(str(tmp_path), "gt", [gt_image])
    pred_json, pred_dir = write_split(str(tmp_path), "pred", [pred_image])
    return pq_compute(gt_json, pred_json, gt_dir, pred_dir, verbose=False, **kwargs)


def test_segment_in_prediction_png_but_not_its_json(tmp_path):
    gt_image, pred_image = two_segment_case()
    pred_image["segments_info"] = pred_image["segments_info"][:1]
    with pytest.raises(PanopticFormatError, match="image 7: prediction segment 20 is in the PNG but not in"):
        run_case(tmp_path, gt_image, pred_image)


def test_segment_in_prediction_json_but_not_its_png(tmp_path):
    gt_image, pred_image = two_segment_case()
    pred_image["segments_info"].append({"id": 99, "category_id": 1, "iscrowd": 0})
    with pytest.raises(PanopticFormatError, match="image 7: prediction segment 99 is in segments_info but not in"):
        run_case(tmp_path, gt_image, pred_image)


def test_gt_png_and_json_must_agree_when_strict(tmp_path):
    """strict=True refuses what panopticapi scores (the default, tests/evaluation/test_inconsistent_gt.py)."""
    gt_image, pred_image = two_segment_case()
    gt_image["segments_info"] = gt_image["segments_info"][1:]
    with pytest.raises(PanopticFormatError, match="image 7: gt segment 1 is in the PNG but not in"):
        run_case(tmp_path, gt_image, pred_image, strict=True)


def test_unknown_category(tmp_path):
    gt_image, pred_image = two_segment_case()
    pred_image["segments_info"][1]["category_id"] = 555
    with pytest.raises(PanopticFormatError, match="image 7: prediction segment 20 has unknown category_id 555"):
        run_case(tmp_path, gt_image, pred_image)


def test_png_size_differs_from_gt(tmp_path):
    gt_image, pred_image = two_segment_case()
    pred_image["ids"] = np.pad(pred_image["ids"], ((0, 1), (0, 0)), mode="edge")
    with pytest.raises(PanopticFormatError, match=r"image 7: the prediction is \(6, 5\) \(width, height\) but the "
                                                  r"gt is \(6, 4\)"):
        run_case(tmp_path, gt_image, pred_image)


def test_missing_png_and_missing_prediction(tmp_path):
    gt_image, pred_image = two_segment_case()
    gt_json, gt_dir = write_split(str(tmp_path), "gt", [gt_image])
    pred_json, pred_dir = write_split(str(tmp_path), "pred", [pred_image])
    os.remove(os.path.join(pred_dir, "000007.png"))
    with pytest.raises(FileNotFoundError, match="image 7: panoptic PNG .*000007.png does not exist"):
        pq_compute(gt_json, pred_json, gt_dir, pred_dir, verbose=False)
    with open(pred_json, "w") as f:
        json.dump({"annotations": [], "categories": CATEGORIES}, f)
    with pytest.raises(ValueError, match="no prediction for the image with id: 7"):
        pq_compute(gt_json, pred_json, gt_dir, pred_dir, verbose=False)
    with pytest.raises(FileNotFoundError, match="doesn't exist"):
        pq_compute(gt_json, pred_json, gt_dir, str(tmp_path / "nowhere"), verbose=False)


def test_read_id_map_falls_back_to_pil_for_other_png_kinds(tmp_path):
    ids = np.array([[0, 1, 2], [300, 70000, 5]])
    rgba = np.concatenate([id_map_to_rgb(ids), np.full((2, 3, 1), 255, np.uint8)], axis=-1)
    from PIL import Image
    Image.fromarray(rgba).save(tmp_path / "rgba.png")          # fast path (colour type 6)
    Image.fromarray(id_map_to_rgb(ids)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    assert np.array_equal(read_id_map(str(tmp_path / "rgba.png")), ids)
    assert np.array_equal(read_id_map(str(tmp_path / "palette.png")), ids)


needs_compiled_statistics = pytest.mark.skipif(not ops.file_pq_statistics_available(),
                                               reason="needs the compiled PNG reader and an inflater")


def file_pair_counts(gt_path, pred_path):
    """The fallback's pair counts of two PNG files: both id maps read, then pq_pair_counts."""
    return pair_counts(read_id_map(gt_path), read_id_map(pred_path))


def _pngs_and_tables(tmp_path, gt_image, pred_image):
    gt_json, gt_dir = write_split(str(tmp_path), "gt", [gt_image])
    pred_json, pred_dir = write_split(str(tmp_path), "pred", [pred_image])
    with open(gt_json) as f:
        categories = CategoryTable(json.load(f)["categories"])
    name = f"{gt_image['image_id']:06d}.png"
    paths = os.path.join(gt_dir, name), os.path.join(pred_dir, name)
    gt_table = segment_table(gt_image["segments_info"], categories, 0, "gt")
    pred_table = segment_table(pred_image["segments_info"], categories, 0, "prediction")
    return paths, gt_table, pred_table, len(categories)


@needs_compiled_statistics
@pytest.mark.parametrize("seed", range(6))
def test_cpp_matching_is_bit_identical_to_the_numpy_rules(tmp_path, seed):
    """panoptic_png_file_pq_statistics (reading, pair counts and matching in one C++ call) against match_segments
    of the pair counts of the two id maps: the same categories, counts and IoU sums, to the last bit."""
    rng = np.random.default_rng(100 + seed)
    gt_image, pred_image = random_pair(rng, 0, height=40, width=56)
    paths, gt_table, pred_table, num_categories = _pngs_and_tables(tmp_path, gt_image, pred_image)
    tables = (gt_table.packed(True), pred_table.packed(False), torch.from_numpy(gt_table.crowd_of_category),
              num_categories)
    expected = match_segments(file_pair_counts(*paths), gt_table, pred_table, num_categories, 0)
    expected = (expected.category, expected.iou, expected.tp, expected.fp, expected.fn)
    assert sum(int(x.sum()) for x in expected[2:]) > 0
    problem, *from_files = ops.panoptic_png_file_pq_statistics(*paths, *tables)
    assert problem == 0
    for ours, theirs in zip(from_files, expected):
        assert np.array_equal(ours.numpy(), theirs)


@needs_compiled_statistics
@pytest.mark.parametrize("kind", [1, 2, 3, 4])
def test_cpp_matching_reports_png_and_table_disagreements(tmp_path, kind):
    """Codes 1/2 (a gt id only in the PNG / only in the table) and 3/4 (the same for the prediction); pq_compute
    then raises the reference's error."""
    ids = np.array([[1, 1, 2], [1, 2, 2]])
    gt_image, pred_image = image(0, ids, {1: 1, 2: 10}), image(0, ids, {1: 1, 2: 10})
    side = gt_image if kind <= 2 else pred_image
    if kind in (1, 3):
        side["segments_info"] = side["segments_info"][:1]  # segment 2 only in the PNG
    else:
        side["segments_info"] = side["segments_info"] + [{"id": 9, "category_id": 1, "iscrowd": 0, "area": 1}]
    paths, gt_table, pred_table, num_categories = _pngs_and_tables(tmp_path, gt_image, pred_image)
    problem, *stats = ops.panoptic_png_file_pq_statistics(*paths, gt_table.packed(True), pred_table.packed(False),
                                                          torch.from_numpy(gt_table.crowd_of_category), num_categories)
    assert problem == kind and all(s.numel() == 0 for s in stats)
    with pytest.raises(PanopticFormatError, match="segment (2|9) is in"):
        file_statistics(*paths, gt_table, pred_table, num_categories, 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_first_bad_image_in_order_raises_across_blocks(tmp_path, workers):
    """Image 3 misses its prediction PNG, image 200 (a later block of the pipeline) has an unknown category:
    the error is image 3's, whichever thread found which first; without image 3's problem, image 200's."""
    ids = np.array([[1, 1, 2], [1, 2, 2]])
    images = [image(i, ids, {1: 1, 2: 10}) for i in range(210)]
    preds = [image(i, ids, {1: 1, 2: 10}) for i in range(210)]
    preds[200]["segments_info"][0]["category_id"] = 555
    gt_json, gt_dir = write_split(str(tmp_path), "gt", images)
    pred_json, pred_dir = write_split(str(tmp_path), "pred", preds)
    missing = os.path.join(pred_dir, "000003.png")
    os.rename(missing, missing + ".moved")
    with pytest.raises(FileNotFoundError, match="image 3: panoptic PNG"):
        pq_compute(gt_json, pred_json, gt_dir, pred_dir, num_workers=workers, verbose=False)
    os.rename(missing + ".moved", missing)
    with pytest.raises(PanopticFormatError, match="image 200: prediction segment 1 has unknown category_id 555"):
        pq_compute(gt_json, pred_json, gt_dir, pred_dir, num_workers=workers, verbose=False)


needs_file_statistics = needs_compiled_statistics


def _png_chunks(data):
    """[(kind, body)] of a PNG's bytes."""
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_bytes(chunks):
    import zlib
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        out += len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    return out


@needs_file_statistics
def test_file_statistics_reads_split_image_data_and_leaves_other_files_to_python(tmp_path):
    """IDAT split over several chunks decodes the same; a missing file, a flipped byte (CRC), another PNG kind
    (16-bit) and two sizes come back as 5 (not handled), and pq_compute's Python path then reports them."""
    rng = np.random.default_rng(7)
    gt_image, pred_image = random_pair(rng, 0, height=30, width=40)
    paths, gt_table, pred_table, num_categories = _pngs_and_tables(tmp_path, gt_image, pred_image)
    tables = (gt_table.packed(True), pred_table.packed(False), torch.from_numpy(gt_table.crowd_of_category),
              num_categories)
    problem, *whole = ops.panoptic_png_file_pq_statistics(*paths, *tables)
    assert problem == 0
    data = open(paths[1], "rb").read()
    chunks = _png_chunks(data)
    idat = b"".join(body for kind, body in chunks if kind == b"IDAT")
    split = [c for c in chunks if c[0] != b"IDAT" and c[0] != b"IEND"]
    split += [(b"IDAT", idat[i:i + 7]) for i in range(0, len(idat), 7)] + [(b"IEND", b"")]
    split_path = str(tmp_path / "split.png")
    with open(split_path, "wb") as f:
        f.write(_png_bytes(split))
    problem, *from_split = ops.panoptic_png_file_pq_statistics(paths[0], split_path, *tables)
    assert problem == 0 and all(torch.equal(a, b) for a, b in zip(from_split, whole))

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    sixteen_bit = np.asarray(gt_image["ids"], dtype=np.uint16)
    bad = {"missing": None, "flipped": bytes(flipped)}
    for name, content in bad.items():
        path = str(tmp_path / f"{name}.png")
        if content is not None:
            with open(path, "wb") as f:
                f.write(content)
        assert ops.panoptic_png_file_pq_statistics(paths[0], path, *tables)[0] == 5, name
    from PIL import Image
    Image.fromarray(sixteen_bit).save(tmp_path / "gray16.png")
    assert ops.panoptic_png_file_pq_statistics(paths[0], str(tmp_path / "gray16.png"), *tables)[0] == 5
    Image.fromarray(id_map_to_rgb(np.pad(gt_image["ids"], ((0, 1), (0, 0))))).save(tmp_path / "taller.png")
    assert ops.panoptic_png_file_pq_statistics(paths[0], str(tmp_path / "taller.png"), *tables)[0] == 5


@needs_file_statistics
def test_file_statistics_on_corrupted_bytes_is_not_handled_or_agrees(tmp_path):
    """Random byte flips and truncations of a valid prediction PNG: the C++ reader either leaves the file to the
    Python path (5) or gives the statistics the Python path gives for the same bytes."""
    rng = np.random.default_rng(11)
    gt_image, pred_image = random_pair(rng, 0, height=20, width=24)
    paths, gt_table, pred_table, num_categories = _pngs_and_tables(tmp_path, gt_image, pred_image)
    tables = (gt_table.packed(True), pred_table.packed(False), torch.from_numpy(gt_table.crowd_of_category),
              num_categories)
    data = open(paths[1], "rb").read()
    corrupt_path = str(tmp_path / "corrupt.png")
    for trial in range(60):
        corrupt = bytearray(data)
        if trial % 3 == 0:
            corrupt = corrupt[:int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                corrupt[int(rng.integers(0, len(corrupt)))] ^= int(rng.integers(1, 256))
        with open(corrupt_path, "wb") as f:
            f.write(corrupt)
        problem, *ours = ops.panoptic_png_file_pq_statistics(paths[0], corrupt_path, *tables)
        if problem == 5:
            continue
        try:
            expected = match_segments(file_pair_counts(paths[0], corrupt_path), gt_table, pred_table,
                                      num_categories, 0)
        except (PanopticFormatError, ValueError, OSError) as exc:
            assert problem in (1, 2, 3, 4), (problem, exc)
            continue
        assert problem == 0
        for a, b in zip(ours, (expected.category, expected.iou, expected.tp, expected.fp, expected.fn)):
            assert np.array_equal(a.numpy(), b)


@pytest.mark.parametrize("route", ["id maps", "PIL"])
def test_fallback_routes_give_the_fast_path_numbers(tmp_path, monkeypatch, route):
    """The one fallback (read_id_map of both files, pq_pair_counts, the numpy rules) gives the whole-file C++
    call's numbers to the last bit, with the id maps from the C++ reader or from PIL."""
    from eyecool.evaluation import panoptic_quality

    rng = np.random.default_rng(21)
    pairs = [random_pair(rng, image_id) for image_id in range(10)]
    gt_json, gt_dir = write_split(str(tmp_path), "gt", [g for g, _ in pairs])
    pred_json, pred_dir = write_split(str(tmp_path), "pred", [p for _, p in pairs])
    fast = pq_compute(gt_json, pred_json, gt_dir, pred_dir, verbose=False)
    monkeypatch.setattr(panoptic_quality.ops, "file_pq_statistics_available", lambda: False)
    if route == "PIL":
        monkeypatch.setattr(ops, "read_panoptic_png", lambda path: None)
    assert pq_compute(gt_json, pred_json, gt_dir, pred_dir, verbose=False) == fast


@pytest.mark.parametrize("seed", range(20))
def test_the_plain_segment_table_equals_the_general_one(seed):
    """segment_table's list path (usual segments_info) builds the same table as its numpy path: ids sorted,
    categories as indices, crowd flags, areas, the last crowd segment of each category, the packed rows."""
    from eyecool.evaluation.panoptic_quality import _general_segment_table, _plain_segment_table
    rng = np.random.default_rng(seed)
    categories = CategoryTable([{"id": int(i), "isthing": int(i % 2)} for i in rng.permutation(40)[:12] + 1])
    count = int(rng.integers(0, 15))
    info = [{"id": int(i), "category_id": int(rng.choice(categories.ids)), "iscrowd": int(rng.random() < 0.4),
             "area": int(rng.integers(0, 1000))} for i in rng.choice(np.arange(1, 10**6), count, replace=False)]
    plain = _plain_segment_table(info, categories)
    general = _general_segment_table(info, categories, 0, "gt", True, None)
    assert plain is not None
    for field in ("ids", "category", "iscrowd", "area", "crowd_of_category", "unknown_category_ids"):
        assert np.array_equal(getattr(plain, field), getattr(general, field)), field
        assert getattr(plain, field).dtype == getattr(general, field).dtype, field
    for gt in (True, False):
        assert torch.equal(plain.packed(gt), general.packed(gt)) and plain.packed(gt).is_contiguous()


@pytest.mark.parametrize("unusual", [
    [{"id": 3, "category_id": 1}, {"id": 3, "category_id": 2}],  # a repeated id
    [{"id": 3, "category_id": 99}],  # an unknown category
    [{"id": 0, "category_id": 1}],  # void
    [{"id": 3.0, "category_id": 1}], [{"id": True, "category_id": 1}], [{"id": 3, "category_id": 1, "area": 2.5}],
])
def test_unusual_segments_info_takes_the_general_path(unusual):
    from eyecool.evaluation.panoptic_quality import _plain_segment_table
    assert _plain_segment_table(unusual, CategoryTable([{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}])) is None
