"""Batching: pad images of different sizes into one tensor and keep each image's targets, so any batch size
works (UPSNet trained with one image per GPU); the DataLoader, with workers and a DistributedSampler path."""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from .coco_panoptic import IGNORE_LABEL

# The network's coarsest level (P5 of the FPN) has stride 32: padded sizes divisible by it keep every level
# aligned with the input.
SIZE_DIVISIBILITY = 32


class PanopticBatch(NamedTuple):
    """images: float ``[B, 3, Hp, Wp]``, zero-padded at the bottom and right to multiples of 32; image_sizes:
    each image's ``(H, W)`` before padding; targets: each image's target dict (without ``image``), unpadded."""

    images: torch.Tensor
    image_sizes: List[Tuple[int, int]]
    targets: List[Dict[str, Any]]


def padded_size(sizes: Sequence[Tuple[int, int]], size_divisibility: int = SIZE_DIVISIBILITY) -> Tuple[int, int]:
    """The smallest (Hp, Wp) that holds every size and is divisible by ``size_divisibility``."""
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    d = max(1, size_divisibility)
    return (height + d - 1) // d * d, (width + d - 1) // d * d


def pad_stack(tensors: Sequence[torch.Tensor], size: Tuple[int, int], pad_value: float = 0) -> torch.Tensor:
    """Stack ``[..., H_i, W_i]`` tensors into ``[N, ..., Hp, Wp]``, each in the top-left corner, ``pad_value``
    elsewhere."""
    first = tensors[0]
    out = first.new_full((len(tensors), *first.shape[:-2], *size), pad_value)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]].copy_(t)
    return out


def collate_panoptic(items: List[Dict[str, Any]], size_divisibility: int = SIZE_DIVISIBILITY) -> PanopticBatch:
    """DataLoader ``collate_fn`` for ``CocoPanopticDataset`` items (see PanopticBatch for the result)."""
    if not items:
        raise ValueError("collate_panoptic: empty batch")
    images = [item["image"] for item in items]
    sizes = [tuple(int(s) for s in image.shape[-2:]) for image in images]
    batch = pad_stack(images, padded_size(sizes, size_divisibility), 0.0)
    targets = [{k: v for k, v in item.items() if k != "image"} for item in items]
    return PanopticBatch(batch, sizes, targets)


def stack_semantic_targets(targets: Sequence[Dict[str, Any]], size: Tuple[int, int]) -> torch.Tensor:
    """The semantic maps of a batch as int64 ``[B, Hp, Wp]`` for a loss on padded logits: padding is void (255),
    so it never contributes."""
    return pad_stack([t["sem_seg"] for t in targets], size, IGNORE_LABEL)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_replicas: Optional[int] = None,
    rank: Optional[int] = None,
) -> DataLoader:
    """A DataLoader that batches with ``collate_panoptic``.

    ``distributed=True`` shards the data set with a DistributedSampler (``num_replicas``/``rank`` default to
    the initialised process group); call ``loader.sampler.set_epoch(epoch)`` every epoch so that the shuffle
    changes while all ranks agree on it. The shuffle order and the workers' random streams (flip, scale) follow
    ``seed`` (with ``num_workers=0`` the augmentations use torch's global generator instead), so a run is
    reproducible.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"build_dataloader: need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    if distributed:
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        # Each rank's workers draw their own augmentations.
        generator.manual_seed(seed + sampler.rank)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_panoptic,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        # DataLoader derives each worker's torch seed from this generator.
        generator=generator,
    )
