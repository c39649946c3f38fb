import json
import os
import shutil

import pytest
from PIL import Image

from eyecool.cli import main
from eyecool.data import CocoPanopticDataset, PanopticFormatError, validate_dataset
from eyecool.data.synthetic import split_paths


def _cli_args(paths):
    return ["validate-data", "--json", paths.json_file, "--png-dir", paths.png_dir, "--image-dir", paths.image_dir]


def test_sound_synthetic_set_has_no_problems(synthetic_splits, capsys):
    for paths in synthetic_splits.values():
        assert validate_dataset(paths.json_file, paths.png_dir, paths.image_dir) == []
    assert main(_cli_args(synthetic_splits["train"])) == 0
    assert "OK" in capsys.readouterr().out


@pytest.fixture
def broken_copy(synthetic_splits, tmp_path):
    """A copy of the train split with one problem of every kind, each on its own image; returns the paths and
    the fragments that each problem's message must contain."""
    source_root = os.path.dirname(os.path.dirname(synthetic_splits["train"].image_dir))
    root = tmp_path / "broken"
    shutil.copytree(source_root, root)
    paths = split_paths(str(root), "train")
    with open(paths.json_file) as f:
        data = json.load(f)
    annotations = data["annotations"]
    expected = []

    dropped = annotations[0]["segments_info"].pop()
    expected.append((annotations[0]["file_name"], f"segment {dropped['id']} is in the PNG"))
    annotations[1]["segments_info"].append({"id": 4242, "category_id": 1, "area": 10, "bbox": [0, 0, 1, 1], "iscrowd": 0})
    expected.append((annotations[1]["file_name"], "segment 4242 is in segments_info but not in the PNG"))
    segment = annotations[2]["segments_info"][0]
    segment["category_id"] = 999
    expected.append((annotations[2]["file_name"], f"segment {segment['id']} has unknown category_id 999"))
    segment = annotations[3]["segments_info"][1]
    segment["area"] += 7
    expected.append((annotations[3]["file_name"], f"segment {segment['id']} has area {segment['area']}"))
    os.remove(os.path.join(paths.image_dir, data["images"][4]["file_name"]))
    expected.append((data["images"][4]["file_name"], "missing file"))
    os.remove(os.path.join(paths.png_dir, annotations[5]["file_name"]))
    expected.append((annotations[5]["file_name"], "missing file"))
    image_path = os.path.join(paths.image_dir, data["images"][6]["file_name"])
    Image.open(image_path).resize((40, 30)).save(image_path)
    expected.append((data["images"][6]["file_name"], "is 40x30"))

    with open(paths.json_file, "w") as f:
        json.dump(data, f)
    return paths, expected


def test_every_problem_is_reported_with_file_and_segment(broken_copy, capsys):
    paths, expected = broken_copy
    problems = validate_dataset(paths.json_file, paths.png_dir, paths.image_dir)
    assert len(problems) == len(expected), "\n".join(problems)
    for file_name, fragment in expected:
        assert any(file_name in p and fragment in p for p in problems), (file_name, fragment, problems)
    assert main(_cli_args(paths)) == 1
    out = capsys.readouterr().out
    assert f"{len(expected)} problem(s) found" in out and all(fragment in out for _, fragment in expected)


def test_reader_raises_the_same_messages(broken_copy):
    paths, expected = broken_copy
    dataset = CocoPanopticDataset(*paths)
    for index, (file_name, fragment) in enumerate(expected):
        with pytest.raises(PanopticFormatError) as error:
            dataset[index]
        assert file_name in str(error.value) and fragment in str(error.value)
    dataset[7]  # the one image left intact still loads


def test_json_level_problems(synthetic_splits, tmp_path):
    paths = synthetic_splits["val"]
    with open(paths.json_file) as f:
        data = json.load(f)
    data["annotations"][0]["image_id"] = 10**6
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    problems = validate_dataset(str(broken), paths.png_dir, paths.image_dir)
    assert any("names image_id 1000000" in p for p in problems)
    assert any("has no annotation" in p for p in problems)
    with pytest.raises(PanopticFormatError, match="has no annotation"):
        CocoPanopticDataset(paths.image_dir, str(broken), paths.png_dir)
