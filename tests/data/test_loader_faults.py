"""The COCO panoptic reader on broken data sets: a corrupt PNG, a truncated JPEG, JSON entries with missing keys,
an image listed twice, a PNG segment absent from the JSON. With ``on_error="raise"`` (the default) the first
problem stops with a PanopticFormatError naming the file; with ``"skip"`` the broken image is left out with a
warning naming it, and the rest is read. A run that fails on bad data overwrites nothing in its output folder."""
import json
import os

import pytest
from PIL import Image

from eyecool.data import CocoPanopticDataset
from eyecool.panoptic_format import PanopticFormatError, id2rgb, read_id_map
from eyecool.data.synthetic import generate_synthetic_dataset


@pytest.fixture()
def split(tmp_path):
    """A fresh 4-image synthetic train split this test may break: (image_dir, json_file, png_dir)."""
    return generate_synthetic_dataset(str(tmp_path / "data"), num_train=4, num_val=1, size=32, seed=7)["train"]


def _json(split):
    with open(split.json_file) as f:
        return json.load(f)


def _write_json(split, data):
    with open(split.json_file, "w") as f:
        json.dump(data, f)


def _read_all(dataset):
    return [dataset[i] for i in range(len(dataset))]


def _break_file(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncate" else data[:16] + b"\x00garbage" * 8 + data[80:])


@pytest.mark.parametrize("which, how", [("png", "corrupt"), ("png", "truncate"), ("image", "truncate"),
                                        ("image", "corrupt")])
def test_broken_file_names_the_file_or_is_skipped(split, which, how):
    data = _json(split)
    folder, entry = (split.png_dir, data["annotations"][1]) if which == "png" else (split.image_dir,
                                                                                      data["images"][1])
    path = os.path.join(folder, entry["file_name"])
    _break_file(path, how)

    strict = CocoPanopticDataset(*split)
    strict[0]
    with pytest.raises(PanopticFormatError, match=entry["file_name"]):
        strict[1]

    lenient = CocoPanopticDataset(*split, on_error="skip")
    with pytest.warns(RuntimeWarning, match=entry["file_name"]):
        items = _read_all(lenient)
    # Item 1 is replaced by the next readable image, and counted.
    assert [item["image_id"] for item in items] == [data["images"][i]["id"] for i in (0, 2, 2, 3)]
    assert lenient.skipped == 1


def test_json_with_missing_keys(split):
    data = _json(split)
    del data["annotations"][2]["segments_info"]
    del data["images"][0]["file_name"]
    _write_json(split, data)
    with pytest.raises(PanopticFormatError) as error:
        CocoPanopticDataset(*split)
    assert "annotations[2]" in str(error.value) and "'segments_info'" in str(error.value)
    assert "images[0]" in str(error.value) and "'file_name'" in str(error.value)
    # An entry of 'images' without its file name cannot even be named: that stops the run in skip mode too.
    with pytest.raises(PanopticFormatError, match="images\\[0\\]"):
        CocoPanopticDataset(*split, on_error="skip")

    data = _json(split)
    data["images"][0]["file_name"] = os.path.basename(data["annotations"][0]["file_name"])[:-4] + ".jpg"
    _write_json(split, data)
    with pytest.warns(RuntimeWarning, match="annotations\\[2\\]"):
        dataset = CocoPanopticDataset(*split, on_error="skip")
    assert len(dataset) == 3 and data["images"][2]["id"] not in [img["id"] for img in dataset.images]


def test_json_without_a_top_level_key_always_stops(split):
    data = _json(split)
    del data["categories"]
    _write_json(split, data)
    for on_error in ("raise", "skip"):
        with pytest.raises(PanopticFormatError, match="no 'categories' list"):
            CocoPanopticDataset(*split, on_error=on_error)


def test_unreadable_json_names_the_file(split):
    with open(split.json_file, "w") as f:
        f.write('{"images": [')
    with pytest.raises(PanopticFormatError, match="cannot read the JSON"):
        CocoPanopticDataset(*split)


def test_image_listed_twice(split):
    data = _json(split)
    data["images"].append(dict(data["images"][1]))
    _write_json(split, data)
    with pytest.raises(PanopticFormatError, match=f"image id {data['images'][1]['id']} is listed twice"):
        CocoPanopticDataset(*split)
    with pytest.warns(RuntimeWarning, match="listed twice"):
        dataset = CocoPanopticDataset(*split, on_error="skip")
    assert [img["id"] for img in dataset.images] == [data["images"][i]["id"] for i in (0, 2, 3)]


def test_png_segment_absent_from_the_json(split):
    data = _json(split)
    annotation = data["annotations"][3]
    png_path = os.path.join(split.png_dir, annotation["file_name"])
    ids = read_id_map(png_path)
    ids[0, 0] = 4242  # a segment no JSON entry describes
    Image.fromarray(id2rgb(ids)).save(png_path)
    with pytest.raises(PanopticFormatError, match=f"{annotation['file_name']}: segment 4242 is in the PNG"):
        CocoPanopticDataset(*split)[3]
    with pytest.warns(RuntimeWarning, match="segment 4242"):
        item = CocoPanopticDataset(*split, on_error="skip")[3]
    assert item["image_id"] == data["images"][0]["id"]  # wrapped around to the next readable image


def test_on_error_must_be_known(split):
    with pytest.raises(ValueError, match="on_error"):
        CocoPanopticDataset(*split, on_error="ignore")


def test_failed_run_overwrites_nothing_in_the_output_folder(split, tmp_path):
    """A training run whose data set is broken stops before it writes anything: the previous run's files in the
    output folder keep their contents."""
    import eyecool
    from eyecool.config import load_config

    out = tmp_path / "run"
    out.mkdir()
    previous = {"config.yaml": "previous run's configuration\n", "metrics.json": '{"iteration": 0}\n',
                "last_checkpoint": "model_final.pth", "model_final.pth": "weights"}
    for name, text in previous.items():
        (out / name).write_text(text)
    data = _json(split)
    data["images"].append(dict(data["images"][0]))
    _write_json(split, data)
    val = split._replace(**{k: v.replace("train", "val") for k, v in split._asdict().items()})
    cfg = load_config(None, ["data.num_workers=0", f"data.train_image_dir={split.image_dir}",
                             f"data.train_json={split.json_file}", f"data.train_png_dir={split.png_dir}",
                             f"data.val_image_dir={val.image_dir}", f"data.val_json={val.json_file}",
                             f"data.val_png_dir={val.png_dir}"])
    with pytest.raises(PanopticFormatError, match="listed twice"):
        eyecool.train(cfg, str(out))
    for name, text in previous.items():
        assert (out / name).read_text() == text, name
