"""Image and target transforms for panoptic training: resize by the shorter side with a maximum size, horizontal
flip, normalisation for torchvision weights.

Every transform is a callable ``(image, target) -> (image, target)`` on the uint8 ``[3, H, W]`` image (float
after ``Normalize``) and the target dict of ``CocoPanopticDataset``: geometric transforms move the image
(bilinear, antialiased), the label maps and masks (nearest) and the boxes (scaled or mirrored) together.
Randomness comes from torch's generator, which DataLoader seeds per worker, so runs are reproducible.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

# torchvision's ImageNet statistics, for 0..1 RGB input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = Dict[str, Any]


def shortest_edge_size(height: int, width: int, short_edge: int, max_size: int) -> Tuple[int, int]:
    """Output (height, width) that scales the shorter side to ``short_edge`` unless the longer side would then
    exceed ``max_size``, in which case the longer side becomes ``max_size`` (detectron2's ResizeShortestEdge)."""
    scale = short_edge / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _resize_nearest(label: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest resize of ``[..., H, W]`` integer or bool maps with half-pixel centres (the bilinear image's
    alignment), keeping the dtype."""
    dtype = label.dtype
    lead = label.shape[:-2]
    flat = label.reshape(1, -1, *label.shape[-2:])
    if dtype == torch.bool:
        flat = flat.to(torch.uint8)
    elif dtype not in (torch.uint8, torch.float32):
        flat = flat.to(torch.float32)  # labels here are < 2^24, exact in float32
    out = F.interpolate(flat, size=size, mode="nearest-exact")
    return out.to(dtype).reshape(*lead, *size)


class ResizeShortestEdge:
    """Resize so that the shorter side is ``short_edge`` (one drawn at random from ``short_edge_lengths`` when
    several are given: multi-scale training) and the longer side at most ``max_size``. COCO: 800 / 1333."""

    def __init__(self, short_edge_lengths: Sequence[int] = (800,), max_size: int = 1333):
        if isinstance(short_edge_lengths, int):
            short_edge_lengths = (short_edge_lengths,)
        if not short_edge_lengths or min(short_edge_lengths) <= 0 or max_size <= 0:
            raise ValueError(
                f"ResizeShortestEdge: short_edge_lengths must be positive and non-empty and max_size positive, "
                f"got {tuple(short_edge_lengths)} and {max_size}"
            )
        self.short_edge_lengths = tuple(int(s) for s in short_edge_lengths)
        self.max_size = int(max_size)

    def __call__(self, image: torch.Tensor, target: Target) -> Tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        if len(self.short_edge_lengths) == 1:
            short_edge = self.short_edge_lengths[0]
        else:
            short_edge = self.short_edge_lengths[int(torch.randint(len(self.short_edge_lengths), ()))]
        new_h, new_w = shortest_edge_size(height, width, short_edge, self.max_size)
        if (new_h, new_w) == (height, width):
            return image, target
        image = TF.resize(image, [new_h, new_w], antialias=True)
        target = dict(target)
        for key in ("sem_seg", "masks", "crowd_mask"):
            if key in target:
                target[key] = _resize_nearest(target[key], (new_h, new_w))
        if "boxes" in target:
            scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height], dtype=torch.float32)
            target["boxes"] = target["boxes"] * scale
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(short_edge_lengths={self.short_edge_lengths}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror image, maps, masks and boxes with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must lie in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> Tuple[torch.Tensor, Target]:
        if self.p < 1.0 and not float(torch.rand(())) < self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        for key in ("sem_seg", "masks", "crowd_mask"):
            if key in target:
                target[key] = target[key].flip(-1)
        if "boxes" in target:
            boxes = target["boxes"].clone()
            boxes[:, 0] = width - target["boxes"][:, 2]
            boxes[:, 2] = width - target["boxes"][:, 0]
            target["boxes"] = boxes
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """uint8 (or 0..1 float) RGB -> float32 ``(x / 255 - mean) / std``, torchvision's convention."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: torch.Tensor, target: Target) -> Tuple[torch.Tensor, Target]:
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        return TF.normalize(image, list(self.mean), list(self.std)), target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def denormalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Inverse of ``Normalize`` for display: ``[..., 3, H, W]`` float -> uint8."""
    mean_t = torch.tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std_t + mean_t).mul(255.0).round().clamp(0, 255).to(torch.uint8)


class Compose:
    def __init__(self, transforms: List):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> Tuple[torch.Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def build_transforms(
    is_train: bool,
    min_size: Sequence[int] | int = 800,
    max_size: int = 1333,
    flip_prob: float = 0.5,
    min_size_test: Optional[int] = None,
) -> Compose:
    """The standard pipeline, the one every caller builds (the engine from ``data.min_size``, ``data.max_size`` and
    ``data.flip``). Training: resize (a random shorter side from ``min_size`` when it lists several: multi-scale),
    horizontal flip with probability ``flip_prob`` (none at 0), normalise. Test: resize to ``min_size_test``
    (default: the largest of ``min_size``), normalise. COCO: ``min_size=800, max_size=1333``."""
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    if is_train:
        steps = [ResizeShortestEdge(sizes, max_size)]
        if flip_prob > 0:
            steps.append(RandomHorizontalFlip(flip_prob))
    else:
        steps = [ResizeShortestEdge((min_size_test or max(sizes),), max_size)]
    steps.append(Normalize())
    return Compose(steps)
