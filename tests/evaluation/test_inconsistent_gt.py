"""pq_compute on inconsistent ground truth: panopticapi's numbers by default (with a PanopticFormatWarning naming
the image and the segment), PanopticFormatError with strict=True.

panopticapi checks only the prediction against its PNG; on the gt side it scores whatever it is given. Each case
here is compared with panopticapi (panopticapi-lite) and, where the numbers are easy, with the value worked out by
hand, so that a wrong reference would be noticed too.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest

from eyecool.cli import main
from eyecool.evaluation import PanopticEvaluator, PanopticFormatError, PanopticFormatWarning, pq_compute
from eyecool.evaluation import panoptic_quality
from panoptic_data import random_pair, segments_info, write_split

try:
    from panopticapi.evaluation import pq_compute as panopticapi_pq_compute
except ImportError:
    panopticapi_pq_compute = None

try:
    from hotcoco import panoptic as hotcoco_panoptic
except ImportError:
    hotcoco_panoptic = None

needs_panopticapi = pytest.mark.skipif(panopticapi_pq_compute is None, reason="panopticapi-lite not installed")


def theirs(gt_json, pred_json, gt_dir, pred_dir):
    with contextlib.redirect_stdout(io.StringIO()):
        return panopticapi_pq_compute(gt_json, pred_json, gt_dir, pred_dir)


def assert_same(ours, reference, tol=1e-9):
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == reference[name]["n"], name
        for metric in ("pq", "sq", "rq"):
            assert abs(ours[name][metric] - reference[name][metric]) <= tol, (name, metric)
    assert set(ours["per_class"]) == set(reference["per_class"])
    for cat_id, r in reference["per_class"].items():
        for metric in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][cat_id][metric] - r[metric]) <= tol, (cat_id, metric)


def write(tmp_path, gt_images, pred_images, filler=None):
    """Writes both splits; ``filler`` (a category id) adds image 99, a perfect match of one segment of that
    category, so that panopticapi has a Things and a Stuff category to average (it divides by zero otherwise)."""
    if filler is not None:
        ids = np.ones((2, 2), dtype=np.int64)
        gt_images = gt_images + [image(99, ids, [seg(1, filler, 4)])]
        pred_images = pred_images + [image(99, ids, [seg(1, filler, 4)])]
    gt_json, gt_dir = write_split(str(tmp_path), "gt", gt_images)
    pred_json, pred_dir = write_split(str(tmp_path), "pred", pred_images)
    return gt_json, pred_json, gt_dir, pred_dir


def lenient_and_strict(paths, warning_match):
    """pq_compute's default result (which must warn, matching ``warning_match``) after checking that
    strict=True refuses the same data with the same message."""
    with pytest.raises(PanopticFormatError, match=warning_match):
        pq_compute(*paths, verbose=False, strict=True)
    with pytest.warns(PanopticFormatWarning, match=warning_match):
        return pq_compute(*paths, verbose=False)


def image(image_id, ids, segments):
    return {"image_id": image_id, "ids": np.asarray(ids), "segments_info": segments}


def seg(segment_id, category_id, area, iscrowd=0):
    return {"id": segment_id, "category_id": category_id, "area": area, "iscrowd": iscrowd, "bbox": [0, 0, 1, 1]}


def unknown_gt_label_case():
    """hotcoco's "unknown-gt-label" case (tests/test_parity_panoptic.py): the gt PNG's left half is id 9, which the
    gt JSON does not list; the prediction (car, 24 pixels) covers 8 of those and all 16 of car segment 1. Id 9 is
    not void, so it stays in the union: IoU = 16 / (24 + 16 - 16) = 2/3, a match; PQ = SQ = 2/3, RQ = 1."""
    gt = np.zeros((4, 8), dtype=np.int64)
    gt[:, :4] = 9
    gt[:, 4:] = 1
    pred = np.zeros_like(gt)
    pred[:, 2:] = 11
    return image(3, gt, [seg(1, 2, 16)]), image(3, pred, [seg(11, 2, 24)])


@needs_panopticapi
def test_gt_png_id_missing_from_the_gt_json(tmp_path):
    """Mirrors hotcoco's "unknown-gt-label" parity case (66.7 PQ with panopticapi)."""
    gt, pred = unknown_gt_label_case()
    paths = write(tmp_path, [gt], [pred], filler=11)
    ours = lenient_and_strict(paths, r"image 3: gt segment 9 is in the PNG but not in its segments_info")
    assert_same(ours, theirs(*paths))
    assert ours["Things"]["n"] == 1 and abs(100 * ours["Things"]["pq"] - 66.67) < 0.01
    assert ours["per_class"][2] == pytest.approx({"pq": 2 / 3, "sq": 2 / 3, "rq": 1.0}, abs=1e-12)
    if hotcoco_panoptic is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            hot = hotcoco_panoptic.pq_compute(*paths)
        assert abs(hot["Things"]["pq"] - ours["Things"]["pq"]) <= 1e-9


@needs_panopticapi
def test_unlisted_gt_pixels_do_not_excuse_a_prediction(tmp_path):
    """A prediction lying on an unlisted gt id is a false positive (the id is neither void nor crowd), where the
    same prediction on void is ignored."""
    gt = np.array([[9, 9, 1, 1], [9, 9, 1, 1]])
    pred = np.array([[5, 5, 6, 6], [5, 5, 6, 6]])
    gt_image = image(4, gt, [seg(1, 10, 4)])
    pred_image = image(4, pred, [seg(5, 10, 4), seg(6, 10, 4)])
    paths = write(tmp_path, [gt_image], [pred_image], filler=1)
    ours = lenient_and_strict(paths, "image 4: gt segment 9 is in the PNG")
    assert_same(ours, theirs(*paths))
    # sky: segment 6 matches segment 1 (IoU 1), segment 5 is a false positive: PQ = 1 / (1 + 0.5).
    assert ours["per_class"][10]["pq"] == pytest.approx(2 / 3, abs=1e-12)


@needs_panopticapi
def test_gt_json_segment_missing_from_the_png(tmp_path):
    """A listed gt segment with no pixels is a false negative (here person 7); a crowd one is ignored (car 8)."""
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    gt_image = image(5, gt, [seg(1, 1, 4), seg(2, 10, 4), seg(7, 1, 3), seg(8, 2, 5, iscrowd=1)])
    pred_image = image(5, gt * 10, [seg(10, 1, 4), seg(20, 10, 4)])
    paths = write(tmp_path, [gt_image], [pred_image])
    ours = lenient_and_strict(paths, r"image 5: gt segment 7 is in segments_info but not in the PNG "
                                     r"\(segments in the JSON only: \[7, 8\]\)")
    assert_same(ours, theirs(*paths))
    assert ours["per_class"][1] == pytest.approx({"pq": 1 / 1.5, "sq": 1.0, "rq": 1 / 1.5}, abs=1e-12)
    assert ours["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # crowd: no FN, not averaged
    assert ours["Things"]["n"] == 1


@needs_panopticapi
def test_gt_segment_of_an_unknown_category(tmp_path):
    """panopticapi counts gt segment 2 (category 555) under 555, which it never averages: its pixels act as an
    unlisted id, so the prediction on them is a false positive of its own category."""
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    gt_image = image(6, gt, [seg(1, 1, 4), seg(2, 555, 4)])
    pred_image = image(6, gt * 10, [seg(10, 1, 4), seg(20, 10, 4)])
    paths = write(tmp_path, [gt_image], [pred_image])
    ours = lenient_and_strict(paths, "image 6: gt segment 2 has unknown category_id 555")
    assert_same(ours, theirs(*paths))
    assert ours["per_class"][1]["pq"] == 1.0 and ours["per_class"][10]["pq"] == 0.0  # sky: one FP
    assert ours["All"]["n"] == 2
    with warnings.catch_warnings(record=True) as caught:  # one warning: not also "in the PNG but not in the JSON"
        warnings.simplefilter("always")
        pq_compute(*paths, verbose=False)
    # (PanopticFormatWarnings only: panopticapi's unclosed multiprocessing pool above may be finalised in here)
    assert [str(w.message).split(";")[0] for w in caught if issubclass(w.category, PanopticFormatWarning)] == [
        "image 6: gt segment 2 has unknown category_id 555"]


@needs_panopticapi
def test_gt_png_with_an_empty_segment_list(tmp_path):
    """Every gt id of image 2 is unlisted: its predictions are false positives, while image 1 (consistent, the
    same maps) gives every category a true positive."""
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    good = image(1, gt, segments_info(gt, {1: 1, 2: 10}))
    good_pred = image(1, gt * 10, segments_info(gt * 10, {10: 1, 20: 10}))
    empty = image(2, gt, [])
    empty_pred = image(2, gt * 10, segments_info(gt * 10, {10: 1, 20: 10}))
    paths = write(tmp_path, [good, empty], [good_pred, empty_pred])
    ours = lenient_and_strict(paths, r"image 2: gt segment 1 is in the PNG but not in its segments_info "
                                     r"\(segments in the PNG only: \[1, 2\]\)")
    assert_same(ours, theirs(*paths))
    # Each category: one TP (IoU 1) and one FP -> PQ = 1 / (1 + 0.5) = 2/3.
    assert ours["All"]["n"] == 2 and ours["All"]["pq"] == pytest.approx(2 / 3, abs=1e-12)


@needs_panopticapi
@pytest.mark.parametrize("seed", range(4))
def test_random_inconsistent_gt_matches_panopticapi(tmp_path, seed):
    """Random images whose gt JSON drops entries, lists phantom segments (crowd and not), names unknown
    categories or is empty, evaluated by the C++ fast path where the image is consistent and the Python rules
    where it is not: the same numbers as panopticapi, one warning per broken image."""
    rng = np.random.default_rng(1000 + seed)
    gts, preds = [], []
    broken = set()
    for image_id in range(12):
        gt, pred = random_pair(rng, image_id)
        info = gt["segments_info"]
        kind = int(rng.integers(0, 5))
        if kind == 1 and info:
            info.pop(int(rng.integers(0, len(info))))
        elif kind == 2:
            info.append(seg(7777, int(rng.choice([1, 2, 10, 11])), int(rng.integers(1, 50)),
                            iscrowd=int(rng.random() < 0.5)))
        elif kind == 3 and info:
            info[int(rng.integers(0, len(info)))]["category_id"] = 999
        elif kind == 4:
            info.clear()
        if kind and (kind == 2 or gt["ids"].any()):
            broken.add(image_id)
        gts.append(gt)
        preds.append(pred)
    paths = write(tmp_path, gts, preds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = pq_compute(*paths, verbose=False, num_workers=2)
    warned = {int(str(w.message).split(":")[0].split()[1]) for w in caught
              if issubclass(w.category, PanopticFormatWarning)}
    assert warned == broken
    assert_same(ours, theirs(*paths))


@needs_panopticapi
def test_repeated_segment_ids_keep_their_last_entry(tmp_path):
    """panopticapi reads segments_info into a dict: a repeated id keeps its last entry, at the place of its first
    one. Gt segment 1 is listed as person then sky (sky counts); prediction 10 likewise. Crowd segments 5 and 7
    (both car) are listed 5, 7, 5 again: the dict's order is 5, 7, so 7 is the crowd region that excuses car
    predictions, and car prediction 40, lying on crowd 5, is a false positive (were 5 the crowd region, as the
    last entries' order would say, it would be ignored and car would have no figures)."""
    gt = np.array([[1, 1, 5, 5, 7, 7], [1, 1, 5, 5, 7, 7]])
    gt_image = image(2, gt, [seg(1, 1, 4), seg(5, 2, 4, iscrowd=1), seg(7, 2, 4, iscrowd=1), seg(1, 10, 4),
                             seg(5, 2, 4, iscrowd=1)])
    pred = np.array([[10, 10, 40, 40, 0, 0], [10, 10, 40, 40, 0, 0]])
    pred_image = image(2, pred, [seg(10, 1, 4), seg(40, 2, 4), seg(10, 10, 4)])
    paths = write(tmp_path, [gt_image], [pred_image], filler=1)
    with pytest.raises(PanopticFormatError, match="image 2: gt segments_info lists segment 1 twice"):
        pq_compute(*paths, verbose=False, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = pq_compute(*paths, verbose=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, PanopticFormatWarning)]
    assert any(m.startswith("image 2: gt segments_info lists segment 1 2 times (repeated ids: [1, 5])")
               for m in messages)
    assert any(m.startswith("image 2: prediction segments_info lists segment 10 2 times") for m in messages)
    assert_same(ours, theirs(*paths))
    assert ours["per_class"][10]["pq"] == 1.0  # sky: segment 1's last entry, matched by prediction 10's
    assert ours["Things"]["n"] == 2 and ours["per_class"][2]["rq"] == 0.0  # car: prediction 40 is a FP


def test_warnings_are_capped(tmp_path, monkeypatch):
    """Past MAX_WARNINGS images, one last warning gives their number instead of naming each."""
    monkeypatch.setattr(panoptic_quality, "MAX_WARNINGS", 2)
    gt = np.array([[1, 1, 2, 2]])
    gts = [image(i, gt, [seg(1, 1, 2)]) for i in range(5)]  # segment 2 unlisted in each
    preds = [image(i, gt, segments_info(gt, {1: 1, 2: 10})) for i in range(5)]
    paths = write(tmp_path, gts, preds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pq_compute(*paths, verbose=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, PanopticFormatWarning)]
    assert [m.split(":")[0] for m in messages[:2]] == ["image 0", "image 1"]
    assert len(messages) == 3 and messages[2].startswith("5 images have inconsistent annotations")


def test_predictions_stay_checked(tmp_path):
    """panopticapi raises for a prediction that disagrees with its PNG; so does the lenient mode."""
    gt = np.array([[1, 1, 2, 2]])
    gt_image = image(8, gt, segments_info(gt, {1: 1, 2: 10}))
    pred_image = image(8, gt, [seg(1, 1, 2)])
    with pytest.raises(PanopticFormatError, match="image 8: prediction segment 2 is in the PNG"):
        pq_compute(*write(tmp_path, [gt_image], [pred_image]), verbose=False)


def test_evaluator_and_command_line_follow_the_same_rules(tmp_path):
    gt, pred = unknown_gt_label_case()
    gt_json, pred_json, gt_dir, pred_dir = write(tmp_path, [gt], [pred])
    evaluator = PanopticEvaluator(gt_json, gt_dir, verbose=False)
    with pytest.warns(PanopticFormatWarning, match="image 3: gt segment 9 is in the PNG"):
        evaluator.update(3, pred["ids"], pred["segments_info"])
    assert evaluator.summarize()["All"]["pq"] == pytest.approx(2 / 3, abs=1e-12)
    with pytest.raises(PanopticFormatError, match="image 3: gt segment 9"):
        PanopticEvaluator(gt_json, gt_dir, verbose=False, strict=True).update(3, pred["ids"], pred["segments_info"])
    args = ["pq", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", pred_json, "--pred-dir", pred_dir]
    with pytest.warns(PanopticFormatWarning):
        assert main(args) == 0
    with pytest.raises(PanopticFormatError):
        main(args + ["--strict"])
