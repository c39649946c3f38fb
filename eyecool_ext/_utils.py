"""Argument handling shared by the op wrappers and the reference implementations."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

BoxesLike = Union[Tensor, Sequence[Tensor]]


IntPair = Union[int, Sequence[int]]


def pair(value: IntPair, name: str, minimum: int = 1) -> Tuple[int, int]:
    """``7 -> (7, 7)``; ``(7, 5) -> (7, 5)``; a ValueError naming ``name`` unless both are ``>= minimum``."""
    if isinstance(value, int):
        out = (value, value)
    else:
        out = tuple(int(v) for v in value)
        if len(out) == 1:
            out = (out[0], out[0])
    if len(out) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if out[0] < minimum or out[1] < minimum:
        requirement = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return out  # type: ignore[return-value]


def boxes_to_rois(boxes: BoxesLike, like: Tensor) -> Tensor:
    """torchvision's two box formats -> ``Tensor[K, 5]`` rows (batch index, x1, y1, x2, y2).

    ``boxes`` is either already ``Tensor[K, 5]`` or a list with one ``Tensor[L_i, 4]`` per image.
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise ValueError(
                f"boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of Tensor[L, 4], "
                f"got a tensor of shape {tuple(boxes.shape)}"
            )
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    parts: List[Tensor] = []
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {shape}")
        index = torch.full((b.size(0), 1), float(i), dtype=b.dtype, device=b.device)
        parts.append(torch.cat([index, b], dim=1))
    if not parts:
        return like.new_zeros((0, 5))
    return torch.cat(parts, dim=0)
