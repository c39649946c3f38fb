"""Argument handling shared by the op wrappers and the reference implementations."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

BoxesLike = Union[Tensor, Sequence[Tensor]]


class BoxesShapeError(ValueError, AssertionError):
    """``boxes`` of ``roi_align`` / ``multilevel_roi_align`` is neither a ``Tensor[K, 5]`` nor a list of
    ``Tensor[L, 4]``.

    A ValueError, eyecool's type for bad arguments, and also an AssertionError, the type torchvision's
    ``roi_align`` raises for the same boxes (its ``check_roi_boxes_shape`` uses ``torch._assert``), so code written
    against either catches it.
    """


class ShapeError(ValueError, RuntimeError):
    """A ``deform_conv2d`` argument of the wrong shape, dtype or device (the message names it, with the expected
    and the given shape).

    A ValueError, eyecool's type for bad arguments, and also a RuntimeError, the type torchvision's
    ``deform_conv2d`` raises for wrongly sized inputs (a Python check for the offset channels, ``TORCH_CHECK``
    for the rest), so code written against either catches it.
    """


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
            raise BoxesShapeError(
                f"boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of Tensor[L, 4], "
                f"got a tensor of shape {tuple(boxes.shape)}"
            )
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise BoxesShapeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    parts: List[Tensor] = []
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise BoxesShapeError(f"boxes[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {shape}")
        if b.is_quantized:  # torch.full has no quantized dtypes; full_like keeps the boxes' quantization
            index = torch.full_like(b[:, :1], float(i))
        else:
            index = torch.full((b.size(0), 1), float(i), dtype=b.dtype, device=b.device)
        parts.append(torch.cat([index, b], dim=1))
    if not parts:
        return like.new_zeros((0, 5))
    return torch.cat(parts, dim=0)
