"""eyecool.panoptic_format: the segment rule and its messages, every problem check_segments reports, prediction
annotations measured on hand-built id maps, PNG writing and reading (C++ reader and PIL fallback, errors naming
the file), and the one error class that the data, evaluation and engine APIs all export."""
import gc
import json

import numpy as np
import pytest
from PIL import Image

import eyecool.data
import eyecool.evaluation
from eyecool import panoptic_format as fmt


def test_one_error_class_everywhere():
    assert eyecool.data.PanopticFormatError is fmt.PanopticFormatError
    assert eyecool.evaluation.PanopticFormatError is fmt.PanopticFormatError
    assert eyecool.evaluation.PanopticFormatWarning is fmt.PanopticFormatWarning
    assert issubclass(fmt.PanopticFormatError, ValueError)


def test_segment_mismatches_name_both_directions():
    png_ids = np.array([[0, 3, 3], [5, 5, 9]])
    assert fmt.segment_mismatches(png_ids, np.array([3, 5, 9]), "image 1") == []
    messages = fmt.segment_mismatches(png_ids, np.array([3, 7, 8]), "image 1", "gt ")
    assert messages == ["image 1: gt segment 5 is in the PNG but not in its segments_info (segments in the PNG only: "
                        "[5, 9])",
                        "image 1: gt segment 7 is in segments_info but not in the PNG (segments in the JSON only: "
                        "[7, 8])"]
    # An id reported already (e.g. listed with an unknown category) is not reported again; void never is.
    assert fmt.segment_mismatches(png_ids, np.array([3, 5]), "x.png", excused_ids=[9]) == []


def test_check_segments_reports_every_problem():
    ids, counts = np.array([0, 1, 2, 4]), np.array([10, 5, 6, 7])
    segments = [{"id": 1, "category_id": 1, "area": 5}, {"id": 2, "category_id": 99, "area": 6},
                {"id": 2, "category_id": 1}, {"id": 3, "category_id": 1}, {"id": 0, "category_id": 1},
                {"id": 1, "category_id": 1, "area": 4}]
    problems = fmt.check_segments(segments, ids, counts, [1, 2], "a.png")
    expected = ["a.png: segment 2 has unknown category_id 99", "a.png: segments_info lists segment 2 twice",
                "a.png: segments_info lists segment id 0, which means void",
                "a.png: segments_info lists segment 1 twice",
                "a.png: segment 4 is in the PNG but not in its segments_info",
                "a.png: segment 3 is in segments_info but not in the PNG",
                "a.png: segment 1 has area 4 in the JSON but 5 pixels in the PNG"]
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)
    assert fmt.check_segments(segments[:1], np.array([0, 1]), np.array([3, 5]), [1], "a.png") == []


def test_prediction_annotation_measures_the_id_map():
    seg = np.zeros((4, 6), dtype=np.int64)
    seg[1:3, 2:5] = 7  # 6 pixels, x 2..4, y 1..2
    seg[3, 0] = 9
    info = [{"id": 7, "category_id": 3, "score": 0.5}, {"id": 9, "category_id": 4}, {"id": 11, "category_id": 5}]
    annotation = fmt.prediction_annotation(12, "a.png", seg, info)
    assert annotation["image_id"] == 12 and annotation["file_name"] == "a.png"
    assert annotation["segments_info"] == [
        {"id": 7, "category_id": 3, "iscrowd": 0, "area": 6, "bbox": [2, 1, 3, 2], "score": 0.5},
        {"id": 9, "category_id": 4, "iscrowd": 0, "area": 1, "bbox": [0, 3, 1, 1]}]  # 11 has no pixel: left out


def test_written_pngs_read_back(tmp_path):
    ids = np.array([[0, 1, 256], [65536, 2**24 - 1, 77]])
    path = str(tmp_path / "p.png")
    fmt.write_panoptic_png(path, ids)
    read = fmt.read_id_map(path)
    assert read.dtype == np.int32 and np.array_equal(read, ids)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(fmt.rgb2id(rgb), ids)  # panopticapi's colour rule, independently of the reader
    # Another kind of PNG (palette) goes through PIL and reads the same.
    Image.open(path).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    assert np.array_equal(fmt.read_id_map(str(tmp_path / "palette.png")), ids)


def test_read_id_map_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="image 4: panoptic PNG .*missing.png does not exist"):
        fmt.read_id_map(str(tmp_path / "missing.png"), image_id=4)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(fmt.PanopticFormatError, match="junk.png: cannot read the panoptic PNG"):
        fmt.read_id_map(str(tmp_path / "junk.png"))


def test_load_json_restores_the_collector(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": []}))
    assert gc.isenabled()
    assert fmt.load_json(str(path)) == {"images": []} and gc.isenabled()
    path.write_text("{")
    with pytest.raises(ValueError):
        fmt.load_json(str(path))
    assert gc.isenabled()
    with pytest.raises(fmt.PanopticFormatError, match="a.json: cannot read the JSON"):
        fmt.load_panoptic_json(str(path))


def test_coco_categories_ship_with_the_package():
    categories = fmt.load_coco_categories()
    assert len(categories) == 133 and sum(c["isthing"] for c in categories) == 80
