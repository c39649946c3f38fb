"""Tiny configurations and a hand-drawn synthetic batch for the modeling tests."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import pytest
import torch

from eyecool.config import load_config

NUM_STUFF = 3
NUM_THINGS = 2
STUFF_IDS = [101, 102, 103]
THING_IDS = [1, 7]

TINY_OVERRIDES = [
    f"model.num_stuff={NUM_STUFF}", f"model.num_things={NUM_THINGS}",
    "model.backbone.depth=18", "model.backbone.norm=bn", "model.backbone.freeze_at=0",
    "model.fpn.channels=32", "model.semantic_head.hidden_channels=32", "model.semantic_head.out_channels=16",
    "model.rpn.batch_size_per_image=64", "model.rpn.pre_nms_topk_train=200", "model.rpn.pre_nms_topk_test=100",
    "model.rpn.post_nms_topk_train=64", "model.rpn.post_nms_topk_test=32",
    "model.rpn.anchor_sizes=[8, 16, 32, 64, 128]",
    "model.roi_heads.batch_size_per_image=32", "model.roi_heads.box_fc_dim=64", "model.roi_heads.mask_conv_dim=16",
    "model.roi_heads.mask_num_conv=2", "model.panoptic.stuff_area_limit=16",
]


def tiny_config(*overrides: str):
    return load_config(overrides=TINY_OVERRIDES + list(overrides))


# (class, x1, y1, x2, y2) per image; colours make classes learnable.
_INSTANCES = [
    [(0, 4, 5, 20, 25), (1, 25, 10, 45, 30), (0, 30, 32, 47, 45)],
    [(1, 6, 4, 30, 20), (0, 35, 25, 60, 45)],
]
_THING_COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1]])
_STUFF_COLOURS = torch.tensor([[0.2, 0.2, 0.8], [0.6, 0.6, 0.2], [0.5, 0.3, 0.5]])


def make_image(instances: Sequence[Tuple[int, int, int, int, int]], height: int, width: int,
               crowd_box: Tuple[int, int, int, int] | None = None, generator: torch.Generator | None = None):
    """An image and its targets: three stuff bands, rectangular things, optionally a crowd region."""
    sem = torch.zeros(height, width, dtype=torch.long)
    sem[height // 3: 2 * height // 3] = 1
    sem[2 * height // 3:] = 2
    image = _STUFF_COLOURS[sem].permute(2, 0, 1).clone()
    masks, boxes, classes = [], [], []
    for cls, x1, y1, x2, y2 in instances:
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[y1:y2, x1:x2] = True
        sem[mask] = NUM_STUFF + cls
        image[:, mask] = _THING_COLOURS[cls].view(3, 1)
        masks.append(mask)
        boxes.append([x1, y1, x2, y2])
        classes.append(cls)
    crowd = torch.zeros(height, width, dtype=torch.bool)
    if crowd_box is not None:
        x1, y1, x2, y2 = crowd_box
        crowd[y1:y2, x1:x2] = True
        sem[crowd] = NUM_STUFF + 0
        image[:, crowd] = _THING_COLOURS[0].view(3, 1)
    image = (image + 0.05 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
    target = {
        "sem_seg": sem,
        "boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
        "classes": torch.tensor(classes, dtype=torch.long),
        "masks": torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool),
        "crowd_mask": crowd,
        "size": (height, width),
        "orig_size": (height, width),
    }
    return image, target


def collate(images: List[torch.Tensor], targets: List[Dict], divisor: int = 32):
    hp = max(i.shape[1] for i in images)
    wp = max(i.shape[2] for i in images)
    hp, wp = -(-hp // divisor) * divisor, -(-wp // divisor) * divisor
    batch = torch.zeros(len(images), 3, hp, wp)
    for b, img in zip(batch, images):
        b[:, : img.shape[1], : img.shape[2]] = img
    sizes = [(img.shape[1], img.shape[2]) for img in images]
    return batch, sizes, targets


@pytest.fixture
def batch():
    """Two images of different sizes (48x64 and 64x62) padded to 64x64, with a crowd region in the second."""
    g = torch.Generator().manual_seed(1)
    a = make_image(_INSTANCES[0], 48, 64, generator=g)
    b = make_image(_INSTANCES[1], 64, 62, crowd_box=(5, 50, 20, 62), generator=g)
    return collate([a[0], b[0]], [a[1], b[1]])


@pytest.fixture(autouse=True)
def _single_thread():
    """The network tests use tiny tensors, for which one intra-op thread is fastest; on a shared 2-core machine
    a second OpenMP worker that spins while descheduled made them up to 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
