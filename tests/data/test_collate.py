import pytest
import torch

from eyecool.data import (
    CocoPanopticDataset,
    build_dataloader,
    build_transforms,
    collate_panoptic,
    padded_size,
    stack_semantic_targets,
)


def test_batch_of_three_different_sizes_is_padded_to_multiples_of_32(synthetic_splits):
    dataset = CocoPanopticDataset(*synthetic_splits["train"], transforms=build_transforms(False, 70, 1000))
    items = [dataset[i] for i in range(3)]
    sizes = [item["size"] for item in items]
    assert len(set(sizes)) == 3, "the fixture's size jitter should give three different sizes"
    images, image_sizes, targets = collate_panoptic(items)
    hp, wp = images.shape[-2:]
    assert images.shape[:2] == (3, 3) and hp % 32 == 0 and wp % 32 == 0
    assert hp == padded_size(sizes)[0] >= max(h for h, _ in sizes) and wp < max(w for _, w in sizes) + 32
    assert image_sizes == sizes
    for i, (h, w) in enumerate(sizes):
        assert torch.equal(images[i, :, :h, :w], items[i]["image"])
        assert images[i, :, h:].abs().sum() == 0 and images[i, :, :, w:].abs().sum() == 0
        assert "image" not in targets[i] and targets[i]["sem_seg"].shape == (h, w)
        assert targets[i]["image_id"] == items[i]["image_id"]
    semantic = stack_semantic_targets(targets, (hp, wp))
    assert semantic.shape == (3, hp, wp) and semantic.dtype == torch.int64
    for i, (h, w) in enumerate(sizes):
        assert torch.equal(semantic[i, :h, :w], targets[i]["sem_seg"])
        assert (semantic[i, h:] == 255).all() and (semantic[i, :, w:] == 255).all()


def test_dataloader_with_workers_covers_the_data_set_once(synthetic_splits):
    dataset = CocoPanopticDataset(*synthetic_splits["train"], transforms=build_transforms(True, (48, 64), 1000))
    loader = build_dataloader(dataset, batch_size=3, num_workers=1, shuffle=True, seed=7)
    ids = [t["image_id"] for batch in loader for t in batch.targets]
    assert sorted(ids) == sorted(img["id"] for img in dataset.images)
    assert [len(batch.targets) for batch in loader] == [3, 3, 2]
    again = build_dataloader(dataset, batch_size=3, num_workers=1, shuffle=True, seed=7)
    assert ids == [t["image_id"] for batch in again for t in batch.targets]


def test_distributed_sampler_shards_without_overlap(synthetic_splits):
    dataset = CocoPanopticDataset(*synthetic_splits["train"])
    shards = []
    for rank in range(2):
        loader = build_dataloader(dataset, batch_size=2, shuffle=True, distributed=True, seed=1, num_replicas=2, rank=rank)
        loader.sampler.set_epoch(0)
        shards.append([t["image_id"] for batch in loader for t in batch.targets])
    assert len(shards[0]) == len(shards[1]) == len(dataset) // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(img["id"] for img in dataset.images)


def test_collate_rejects_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        collate_panoptic([])
