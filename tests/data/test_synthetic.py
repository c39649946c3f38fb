import collections
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from eyecool.cli import main
from eyecool.data import DatasetMeta, generate_synthetic_dataset, render_scene, rgb2id
from eyecool.data.synthetic import build_label_space


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    a, b, c = (str(tmp_path / name) for name in "abc")
    generate_synthetic_dataset(a, 3, 2, size=64, seed=11)
    generate_synthetic_dataset(b, 3, 2, size=64, seed=11)
    generate_synthetic_dataset(c, 3, 2, size=64, seed=12)
    assert _files(a) == _files(b) == _files(c)
    assert len(_files(a)) == 2 * 5 + 2
    _, mismatch, errors = filecmp.cmpfiles(a, b, _files(a), shallow=False)
    assert mismatch == [] and errors == []
    _, mismatch, _ = filecmp.cmpfiles(a, c, _files(a), shallow=False)
    assert len(mismatch) >= 10


def test_layout_and_json_follow_coco_panoptic(synthetic_splits):
    train = synthetic_splits["train"]
    assert train.image_dir.endswith(os.path.join("images", "train"))
    assert train.json_file.endswith(os.path.join("annotations", "panoptic_train.json"))
    assert train.png_dir == train.json_file[: -len(".json")]
    with open(train.json_file) as f:
        data = json.load(f)
    assert {c["id"] for c in data["categories"]} == {1, 2, 3, 5, 100, 101, 102, 104}
    image = data["images"][0]
    assert set(image) >= {"id", "file_name", "width", "height"}
    assert image["file_name"] == f"{image['id']:012d}.jpg"
    segment = data["annotations"][0]["segments_info"][0]
    assert set(segment) == {"id", "category_id", "area", "bbox", "iscrowd"}
    assert all(isinstance(v, int) for v in segment["bbox"])
    val_ids = {img["id"] for img in json.load(open(synthetic_splits["val"].json_file))["images"]}
    assert not val_ids & {img["id"] for img in data["images"]}


def test_scenes_hold_what_a_model_must_learn():
    """Over a handful of scenes: every stuff texture and thing shape, textured stuff, repeated classes,
    occlusion, crowd regions and void pixels."""
    space = build_label_space("synthetic")
    meta = DatasetMeta.from_categories(space.categories)
    categories, repeated, occluded, crowd, void, thing_sides = set(), 0, 0, 0, 0, []
    for index in range(24):
        scene = render_scene(np.random.default_rng([0, index]), 128, 128, space)
        counts = collections.Counter(s["category_id"] for s in scene.segments_info if not s["iscrowd"])
        categories |= set(counts)
        repeated += any(n > 1 for cid, n in counts.items() if meta.is_thing(cid))
        occluded += scene.num_occluded > 0
        crowd += any(s["iscrowd"] for s in scene.segments_info)
        void += int((scene.segment_ids == 0).any())
        for s in scene.segments_info:
            pixels = scene.image[scene.segment_ids == s["id"]].astype(np.float32)
            if not meta.is_thing(s["category_id"]) and s["area"] > 400:
                assert pixels.std(axis=0).max() > 12, "stuff must be textured, not a plain colour"
            if meta.is_thing(s["category_id"]) and not s["iscrowd"]:
                thing_sides.append(max(s["bbox"][2:]) / 128)
    assert categories == {1, 2, 3, 5, 100, 101, 102, 104}
    assert repeated >= 3 and occluded >= 6 and crowd >= 3 and void >= 6
    assert np.median(thing_sides) > 0.2


def test_thing_colour_does_not_give_the_class_away():
    space = build_label_space("synthetic")
    mean_colour = collections.defaultdict(list)
    for index in range(24):
        scene = render_scene(np.random.default_rng([1, index]), 96, 96, space)
        for s in scene.segments_info:
            if s["category_id"] < 100 and not s["iscrowd"]:
                mean_colour[s["category_id"]].append(scene.image[scene.segment_ids == s["id"]].mean(axis=0))
    spreads = [np.std(np.stack(c), axis=0).mean() for c in mean_colour.values() if len(c) >= 3]
    assert len(spreads) == 4 and min(spreads) > 30


def test_panopticapi_scores_the_ground_truth_against_itself_100(synthetic_splits, coco_splits):
    evaluation = pytest.importorskip("panopticapi.evaluation")
    for paths in (synthetic_splits["val"], coco_splits["val"]):
        results = evaluation.pq_compute(paths.json_file, paths.json_file, paths.png_dir, paths.png_dir)
        assert results["All"]["pq"] == pytest.approx(1.0)
        assert results["Things"]["n"] > 0 and results["Stuff"]["n"] > 0


def test_coco_variant_uses_the_full_label_space(coco_splits):
    with open(coco_splits["train"].json_file) as f:
        data = json.load(f)
    assert len(data["categories"]) == 133
    used = {s["category_id"] for a in data["annotations"] for s in a["segments_info"]}
    assert any(cid > 90 for cid in used) and any(cid <= 90 for cid in used)
    png = np.asarray(Image.open(os.path.join(coco_splits["train"].png_dir, data["annotations"][0]["file_name"])))
    assert set(np.unique(rgb2id(png)).tolist()) - {0} == {s["id"] for s in data["annotations"][0]["segments_info"]}


def test_synth_command(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["synth", "--out", out, "--num-train", "2", "--num-val", "1", "--size", "48", "--seed", "2"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert len(os.listdir(os.path.join(out, "images", "train"))) == 2
    with pytest.raises(ValueError, match="size must be at least 32"):
        generate_synthetic_dataset(out, 1, 1, size=16)


def test_output_does_not_depend_on_the_number_of_processes(tmp_path):
    # 64 images: the size from which the generator uses a process pool.
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    generate_synthetic_dataset(one, 60, 4, size=32, seed=4, workers=1)
    generate_synthetic_dataset(two, 60, 4, size=32, seed=4, workers=2)
    _, mismatch, errors = filecmp.cmpfiles(one, two, _files(one), shallow=False)
    assert len(_files(one)) == 2 * 64 + 2 and mismatch == [] and errors == []
