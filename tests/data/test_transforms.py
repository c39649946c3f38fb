import pytest
import torch
import torchvision.transforms.v2.functional as TF

from eyecool.data import CocoPanopticDataset, build_transforms
from eyecool.data.transforms import (
    Normalize,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    denormalize,
    shortest_edge_size,
)


def _mask_box(mask):
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)


def _raw_item(paths, index):
    """Image (uint8 [3, H, W]) and target at the original size, as the dataset hands them to its transforms."""
    captured = {}

    def capture(image, target):
        captured["image"], captured["target"] = image, target
        return image, target

    CocoPanopticDataset(*paths, transforms=capture)[index]
    return captured["image"], captured["target"]


def test_shortest_edge_size_follows_coco_rule():
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_size(400, 1000, 800, 1333) == (533, 1333)  # capped by the longer side
    assert shortest_edge_size(640, 427, 800, 1333) == (1199, 800)
    assert shortest_edge_size(96, 96, 64, 1000) == (64, 64)


def test_resize_moves_maps_masks_and_boxes_together(synthetic_splits):
    image, target = _raw_item(synthetic_splits["train"], 0)
    assert len(target["boxes"]) > 0
    h, w = image.shape[-2:]
    out_image, out = ResizeShortestEdge((150,), 1000)(image, target)
    new_h, new_w = shortest_edge_size(h, w, 150, 1000)
    assert out_image.shape == (3, new_h, new_w) and out_image.dtype == torch.uint8
    assert out["sem_seg"].shape == out["crowd_mask"].shape == (new_h, new_w) and out["sem_seg"].dtype == torch.int64
    assert out["masks"].shape == (len(target["masks"]), new_h, new_w) and out["masks"].dtype == torch.uint8
    assert set(out["sem_seg"].unique().tolist()) <= set(target["sem_seg"].unique().tolist())
    scale = torch.tensor([new_w / w, new_h / h] * 2)
    torch.testing.assert_close(out["boxes"], target["boxes"] * scale)
    for mask, box in zip(out["masks"], out["boxes"]):
        # Nearest resampling moves a mask edge by at most one output pixel from the scaled box.
        assert (_mask_box(mask.bool()) - box).abs().max() <= 1.0
    # Masks and the semantic map come from the same nearest sampling, so they still agree pixel for pixel.
    for mask, cls in zip(out["masks"].bool(), out["classes"]):
        assert (out["sem_seg"][mask] == cls + 4).all()


def test_flip_mirrors_image_maps_and_boxes(synthetic_splits):
    image, target = _raw_item(synthetic_splits["train"], 1)
    out_image, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(out_image, image.flip(-1))
    assert torch.equal(out["sem_seg"], target["sem_seg"].flip(-1))
    assert torch.equal(out["crowd_mask"], target["crowd_mask"].flip(-1))
    for mask, box in zip(out["masks"], out["boxes"]):
        assert torch.equal(_mask_box(mask.bool()), box)
    same_image, same = RandomHorizontalFlip(p=0.0)(image, target)
    assert same_image is image and same is target


def test_multiscale_draws_every_listed_size_reproducibly(synthetic_splits):
    image, target = _raw_item(synthetic_splits["train"], 2)
    resize = ResizeShortestEdge((64, 80, 112), 1000)
    torch.manual_seed(1)
    shorter = [min(resize(image, target)[0].shape[-2:]) for _ in range(30)]
    assert set(shorter) == {64, 80, 112}
    torch.manual_seed(1)
    assert shorter == [min(resize(image, target)[0].shape[-2:]) for _ in range(30)]


def test_normalize_matches_torchvision_convention():
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    out, _ = Normalize()(image, {})
    expected = TF.normalize(image.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(out, expected)
    assert torch.equal(denormalize(out), image)


def test_build_transforms_on_the_dataset(synthetic_splits):
    dataset = CocoPanopticDataset(*synthetic_splits["val"], transforms=build_transforms(False, 64, 1000))
    item = dataset[0]
    assert min(item["size"]) == 64 and item["image"].dtype == torch.float32
    assert item["image"].shape[-2:] == item["sem_seg"].shape == item["size"]
    assert item["orig_size"] != item["size"]
    assert item["image"].mean().abs() < 3  # normalised, not 0..255


def test_bad_transform_arguments_name_the_problem():
    with pytest.raises(ValueError, match="short_edge_lengths"):
        ResizeShortestEdge((), 100)
    with pytest.raises(ValueError, match="p must lie"):
        RandomHorizontalFlip(1.5)
