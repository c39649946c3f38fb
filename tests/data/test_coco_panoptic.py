import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from eyecool.data import CocoPanopticDataset, DatasetMeta, PanopticFormatError, id2rgb, load_coco_categories, rgb2id
from eyecool.data.synthetic import SYNTHETIC_CATEGORIES


def _expected_targets(paths, image_info, annotation, meta):
    """The targets of one image computed directly from its PNG and JSON, pixel by pixel rules."""
    png = np.asarray(Image.open(os.path.join(paths.png_dir, annotation["file_name"]))).astype(np.int64)
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    sem = np.full(ids.shape, 255, dtype=np.int64)
    crowd = np.zeros(ids.shape, dtype=bool)
    instances = []
    for segment in annotation["segments_info"]:
        pixels = ids == segment["id"]
        assert pixels.sum() == segment["area"]
        x, y, w, h = segment["bbox"]
        rows, cols = np.nonzero(pixels)
        assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
        contiguous = meta.category_id_to_contiguous(segment["category_id"])
        sem[pixels] = contiguous
        is_thing = any(c["id"] == segment["category_id"] and c["isthing"] for c in meta.categories)
        if is_thing and segment["iscrowd"]:
            crowd |= pixels
        elif is_thing:
            instances.append((pixels, [x, y, x + w, y + h], contiguous - meta.num_stuff))
    return sem, crowd, instances


@pytest.mark.parametrize("variant", ["synthetic_splits", "coco_splits"])
def test_round_trip_targets_agree_with_png_and_json(variant, request):
    splits = request.getfixturevalue(variant)
    for paths in splits.values():
        dataset = CocoPanopticDataset(*paths)
        with open(paths.json_file) as f:
            data = json.load(f)
        assert len(dataset) == len(data["images"]) > 0
        for index in range(len(dataset)):
            item = dataset[index]
            image_info = data["images"][index]
            annotation = data["annotations"][index]
            assert item["image_id"] == image_info["id"] == annotation["image_id"]
            assert item["orig_size"] == item["size"] == (image_info["height"], image_info["width"])
            image = np.array(Image.open(os.path.join(paths.image_dir, image_info["file_name"])))
            torch.testing.assert_close(item["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
            sem, crowd, instances = _expected_targets(paths, image_info, annotation, dataset.meta)
            assert torch.equal(item["sem_seg"], torch.from_numpy(sem))
            assert torch.equal(item["crowd_mask"], torch.from_numpy(crowd))
            assert item["masks"].shape == (len(instances), *sem.shape) and item["masks"].dtype == torch.uint8
            assert item["boxes"].dtype == torch.float32 and item["classes"].dtype == torch.int64
            # Every JSON instance appears exactly once, with its box and class.
            for pixels, box, thing_index in instances:
                matches = [k for k in range(len(item["masks"])) if torch.equal(item["masks"][k].bool(), torch.from_numpy(pixels))]
                assert len(matches) == 1
                assert item["boxes"][matches[0]].tolist() == box
                assert int(item["classes"][matches[0]]) == thing_index


def test_category_mapping_both_ways_on_synthetic_ids():
    meta = DatasetMeta.from_categories(SYNTHETIC_CATEGORIES)
    assert meta.stuff_ids == (100, 101, 102, 104) and meta.thing_ids == (1, 2, 3, 5)
    assert (meta.num_stuff, meta.num_things, meta.num_classes) == (4, 4, 8)
    assert meta.class_names == ["stripes", "dots", "checker", "grain", "disc", "square", "triangle", "cross"]
    for contiguous, category_id in enumerate((100, 101, 102, 104, 1, 2, 3, 5)):
        assert meta.category_id_to_contiguous(category_id) == contiguous
        assert meta.contiguous_to_category_id(contiguous) == category_id
    assert meta.thing_index_to_category_id(3) == 5 and meta.is_thing(5) and not meta.is_thing(104)
    semantic = torch.tensor([[0, 7], [4, 3]])
    assert meta.contiguous_to_category_id(semantic).tolist() == [[100, 5], [1, 104]]
    assert meta.contiguous_to_category_id(np.array([6, 2])).tolist() == [3, 102]
    with pytest.raises(KeyError, match="unknown category_id 4"):
        meta.category_id_to_contiguous(4)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        meta.contiguous_to_category_id(8)
    with pytest.raises(ValueError, match="unique"):
        DatasetMeta.from_categories([SYNTHETIC_CATEGORIES[0], SYNTHETIC_CATEGORIES[0]])


def test_coco_categories_file_is_the_panoptic_label_space():
    categories = load_coco_categories()
    meta = DatasetMeta.from_categories(categories)
    assert (meta.num_stuff, meta.num_things) == (53, 80)
    assert meta.thing_ids[0] == 1 and meta.thing_ids[-1] == 90 and 12 not in meta.thing_ids
    assert meta.stuff_ids[0] == 92 and meta.stuff_ids[-1] == 200 and 94 not in meta.stuff_ids
    assert meta.contiguous_to_category_id(0) == 92 and meta.contiguous_to_category_id(53) == 1
    by_name = {c["name"]: c for c in categories}
    assert by_name["person"]["color"] == [220, 20, 60] and by_name["wall-other-merged"]["id"] == 199
    all_ids = torch.arange(133)
    assert torch.equal(
        torch.tensor([meta.category_id_to_contiguous(int(c)) for c in meta.contiguous_to_category_id(all_ids)]), all_ids
    )


def test_reader_on_coco_categories_keeps_dataset_ids(coco_splits):
    dataset = CocoPanopticDataset(*coco_splits["train"])
    assert (dataset.num_stuff, dataset.num_things) == (53, 80)
    assert dataset.meta == DatasetMeta.from_json_file(coco_splits["train"].json_file)
    assert dataset.stuff_ids == DatasetMeta.from_categories(load_coco_categories()).stuff_ids
    with open(coco_splits["train"].json_file) as f:
        annotations = json.load(f)["annotations"]
    for index in range(len(dataset)):
        item = dataset[index]
        written = {s["category_id"] for s in annotations[index]["segments_info"]}
        labels = item["sem_seg"].unique()
        labels = labels[labels != 255]
        assert set(dataset.contiguous_to_category_id(labels).tolist()) == written
        assert all(dataset.meta.thing_index_to_category_id(int(c)) in written for c in item["classes"])


def test_rgb_id_conversion_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 65536], [123456, (1 << 24) - 1, 7]], dtype=np.uint32)
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb[1, 0].tolist() == [0, 1, 0] and rgb[1, 2].tolist() == [0, 0, 1]
    assert np.array_equal(rgb2id(rgb), ids)
    with pytest.raises(ValueError, match="2\\^24"):
        id2rgb(np.array([1 << 24]))


def test_reader_raises_on_a_broken_image_naming_file_and_segment(synthetic_splits, tmp_path):
    paths = synthetic_splits["val"]
    with open(paths.json_file) as f:
        data = json.load(f)
    dropped = data["annotations"][1]["segments_info"].pop(0)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text(json.dumps(data))
    dataset = CocoPanopticDataset(paths.image_dir, str(broken_json), paths.png_dir)
    dataset[0]
    with pytest.raises(PanopticFormatError) as error:
        dataset[1]
    assert f"segment {dropped['id']} is in the PNG" in str(error.value)
    assert data["annotations"][1]["file_name"] in str(error.value)


def test_images_only_reads_no_png(synthetic_splits, monkeypatch):
    """with_targets=False (the val split of an evaluation): the items have the image and its ids and sizes,
    no training target, and no PNG is opened (a missing PNG goes unnoticed: the evaluator reads the gt)."""
    import os

    from eyecool.data import coco_panoptic

    monkeypatch.setattr(coco_panoptic, "read_id_map", lambda *args: pytest.fail("read a PNG"))
    with_targets = CocoPanopticDataset(*synthetic_splits["val"])
    images_only = CocoPanopticDataset(*synthetic_splits["val"], with_targets=False)
    item = images_only[1]
    assert set(item) == {"image", "image_id", "file_name", "orig_size", "size"}
    assert item["image_id"] == with_targets.images[1]["id"] and item["orig_size"] == tuple(item["image"].shape[-2:])
    monkeypatch.setattr(os.path, "isfile", lambda path: not path.endswith(".png") and os.path.exists(path))
    assert images_only[0]["image"].shape[0] == 3
