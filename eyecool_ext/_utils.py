"""Argument handling shared by the op wrappers and the reference implementations: the checks of every op's
arguments (one statement of each rule), box formats, and the FPN level rule that the multilevel ROIAlign, its
reference and the network's torchvision backend share."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from eyecool_ext._autocast import autocast_on

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


# ------------------------------------------------------------------------------------------ per-op checks


class DeformConv2dShape(NamedTuple):
    """Everything the kernels need to know about one call, derived from the argument shapes."""

    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int  # weight groups: C_in / weight.shape[1]
    offset_groups: int  # offset.shape[1] / (2 * kh * kw)
    out_height: int
    out_width: int


def check_deform_conv2d_args(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
                             stride: IntPair, padding: IntPair, dilation: IntPair,
                             mask: Optional[Tensor]) -> DeformConv2dShape:
    """Validate a ``deform_conv2d`` call and infer its groups and output size.

    Raises ValueError naming the argument, the expected shape and the given one.
    """
    stride = pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    for name, t in (("input", input), ("offset", offset), ("weight", weight)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"deform_conv2d: {name} must be a 4-d tensor, got {shape}")
    n, c_in, height, width = input.shape
    c_out, c_in_per_group, kh, kw = weight.shape
    if not input.is_floating_point():
        raise ValueError(f"deform_conv2d: input must be a floating point tensor, got {input.dtype}")
    others = [("offset", offset), ("weight", weight)]
    if mask is not None:
        others.append(("mask", mask))
    if bias is not None:
        others.append(("bias", bias))
    # Under autocast the op's autocast kernel (eyecool_ext.ops.autocast) casts them to one dtype first.
    mixed_ok = autocast_on(input)
    for name, t in others:
        if t.dtype != input.dtype and not (mixed_ok and t.is_floating_point()):
            raise ValueError(f"deform_conv2d: {name} must have the dtype of input ({input.dtype}), got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"deform_conv2d: {name} must be on the device of input ({input.device}), "
                             f"got {t.device}")
    if c_in == 0:
        raise ValueError(f"deform_conv2d: input must have at least one channel, got input {tuple(input.shape)}")
    if c_in_per_group == 0 or kh == 0 or kw == 0 or c_in % c_in_per_group != 0:
        raise ValueError(f"deform_conv2d: input channels ({c_in}) must be divisible by weight.shape[1] "
                         f"(input channels per group); got input {tuple(input.shape)}, weight {tuple(weight.shape)}")
    groups = c_in // c_in_per_group
    if c_out % groups != 0:
        raise ValueError(f"deform_conv2d: output channels (weight.shape[0] = {c_out}) must be divisible by the "
                         f"{groups} weight groups; got weight {tuple(weight.shape)}")
    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
        raise ValueError(f"deform_conv2d: offset must have 2 * offset_groups * kh * kw = a positive multiple of "
                         f"{2 * taps} channels for a {kh}x{kw} kernel, got offset {tuple(offset.shape)}")
    offset_groups = offset.shape[1] // (2 * taps)
    if c_in % offset_groups != 0:
        raise ValueError(f"deform_conv2d: input channels ({c_in}) must be divisible by the {offset_groups} offset "
                         f"groups that offset {tuple(offset.shape)} implies")
    out_height = (height + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    out_width = (width + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if out_height <= 0 or out_width <= 0:
        raise ValueError(f"deform_conv2d: the output would be empty ({out_height}x{out_width}) for input "
                         f"{tuple(input.shape)}, a {kh}x{kw} kernel, stride {stride}, padding {padding}, "
                         f"dilation {dilation}")
    expected_offset = (n, 2 * offset_groups * taps, out_height, out_width)
    if tuple(offset.shape) != expected_offset:
        raise ValueError(f"deform_conv2d: offset must have shape {expected_offset} (batch, 2 * offset_groups * "
                         f"kh * kw, output height, output width), got {tuple(offset.shape)}")
    if mask is not None:
        expected_mask = (n, offset_groups * taps, out_height, out_width)
        if mask.dim() != 4 or tuple(mask.shape) != expected_mask:
            raise ValueError(f"deform_conv2d: mask must have shape {expected_mask} (batch, offset_groups * kh * kw, "
                             f"output height, output width), got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"deform_conv2d: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    return DeformConv2dShape(stride, padding, dilation, groups, offset_groups, out_height, out_width)


FG_FUSION_MODES = ("logit", "prob")


def check_fg_fusion_args(sem_logits: Tensor, rpn_logits: Sequence[Tensor], num_stuff: int, mode: str) -> List[Tensor]:
    """Validate the arguments of ``fg_fusion`` (ValueError naming the argument); returns ``rpn_logits`` as a list."""
    if not isinstance(sem_logits, Tensor) or sem_logits.dim() != 4:
        shape = tuple(sem_logits.shape) if isinstance(sem_logits, Tensor) else type(sem_logits).__name__
        raise ValueError(f"sem_logits must be a 4-d Tensor [N, S + K, H, W], got {shape}")
    if not sem_logits.is_floating_point():
        raise ValueError(f"sem_logits must be a floating point tensor, got {sem_logits.dtype}")
    if mode not in FG_FUSION_MODES:
        raise ValueError(f"mode must be one of {FG_FUSION_MODES}, got {mode!r}")
    channels = sem_logits.size(1)
    if isinstance(num_stuff, bool) or not isinstance(num_stuff, int) or not 0 <= num_stuff < channels:
        raise ValueError(f"num_stuff must be an int in [0, {channels}) (sem_logits has {channels} channels), "
                         f"got {num_stuff!r}")
    if isinstance(rpn_logits, Tensor) or not isinstance(rpn_logits, (list, tuple)) or len(rpn_logits) == 0:
        raise ValueError(f"rpn_logits must be a non-empty list of Tensor[N, A, H_l, W_l], got "
                         f"{type(rpn_logits).__name__}")
    levels = list(rpn_logits)
    for i, level in enumerate(levels):
        if not isinstance(level, Tensor) or level.dim() != 4:
            shape = tuple(level.shape) if isinstance(level, Tensor) else type(level).__name__
            raise ValueError(f"rpn_logits[{i}] must be a 4-d Tensor [N, A, H_l, W_l], got {shape}")
        if level.size(0) != sem_logits.size(0):
            raise ValueError(f"rpn_logits[{i}] must have the batch size of sem_logits ({sem_logits.size(0)}), "
                             f"got shape {tuple(level.shape)}")
        # Under autocast the op's autocast kernel (eyecool_ext.ops.autocast) casts them to one dtype first.
        if level.dtype != sem_logits.dtype and not (autocast_on(sem_logits) and level.is_floating_point()):
            raise ValueError(f"rpn_logits[{i}] must have the dtype of sem_logits ({sem_logits.dtype}), got "
                             f"{level.dtype}")
        if level.device != sem_logits.device:
            raise ValueError(f"rpn_logits[{i}] must be on the device of sem_logits ({sem_logits.device}), got "
                             f"{level.device}")
    return levels


def check_panoptic_merge_args(sem_logits: Tensor, num_stuff: int, boxes: Tensor, classes: Tensor,
                              mask_logits: Tensor, output_size) -> Optional[Tuple[int, int]]:
    """Validate the arguments of ``upsnet_panoptic_merge`` (ValueError naming the argument)."""
    if not isinstance(sem_logits, Tensor) or sem_logits.dim() != 3:
        shape = tuple(sem_logits.shape) if isinstance(sem_logits, Tensor) else type(sem_logits).__name__
        raise ValueError(f"sem_logits must be a 3-d Tensor [S + K, H, W], got {shape}")
    if not sem_logits.is_floating_point():
        raise ValueError(f"sem_logits must be a floating point tensor, got {sem_logits.dtype}")
    channels = sem_logits.size(0)
    if isinstance(num_stuff, bool) or not isinstance(num_stuff, int) or not 0 <= num_stuff < channels:
        raise ValueError(f"num_stuff must be an int in [0, {channels}) (sem_logits has {channels} channels), "
                         f"got {num_stuff!r}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.size(1) != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a Tensor[M, 4] (x1, y1, x2, y2), got {shape}")
    m = boxes.size(0)
    if not isinstance(classes, Tensor) or classes.shape != (m,) or classes.is_floating_point():
        shape = (tuple(classes.shape), classes.dtype) if isinstance(classes, Tensor) else type(classes).__name__
        raise ValueError(f"classes must be an integer Tensor[{m}] (thing index per box), got {shape}")
    if not isinstance(mask_logits, Tensor) or mask_logits.dim() != 3 or mask_logits.size(0) != m:
        shape = tuple(mask_logits.shape) if isinstance(mask_logits, Tensor) else type(mask_logits).__name__
        raise ValueError(f"mask_logits must be a Tensor[{m}, s, s] (one mask per box), got {shape}")
    # Under autocast the op's autocast kernel (eyecool_ext.ops.autocast) casts them to one dtype first.
    mixed_ok = autocast_on(sem_logits)
    for name, t in (("boxes", boxes), ("mask_logits", mask_logits)):
        if t.dtype != sem_logits.dtype and not (mixed_ok and t.is_floating_point()):
            raise ValueError(f"{name} must have the dtype of sem_logits ({sem_logits.dtype}), got {t.dtype}")
    for name, t in (("boxes", boxes), ("classes", classes), ("mask_logits", mask_logits)):
        if t.device != sem_logits.device:
            raise ValueError(f"{name} must be on the device of sem_logits ({sem_logits.device}), got {t.device}")
    # Value checks need the values (a device synchronisation, and a graph break under torch.compile, where the
    # CPU kernel still checks them and the CUDA kernel reads an out-of-range class as a 0 logit).
    if m and not torch.compiler.is_compiling() and (classes.min() < 0 or classes.max() >= channels - num_stuff):
        raise ValueError(f"classes must be thing indices in [0, {channels - num_stuff}), got values in "
                         f"[{int(classes.min())}, {int(classes.max())}]")
    if m and not torch.compiler.is_compiling() and not bool(torch.isfinite(boxes).all()):
        # An infinite box edge makes the mask's sampling position inf / inf: no answer to paste.
        row = int(torch.nonzero(~torch.isfinite(boxes))[0, 0])
        raise ValueError(f"boxes must be finite, got boxes[{row}] = {boxes[row].tolist()}")
    return None if output_size is None else pair(output_size, "output_size")


def per_image_sizes(output_sizes, num_images: int) -> list:
    """``None``, one ``(H, W)`` for all images, or a list with one ``(H, W)`` (or None) per image."""
    if output_sizes is None:
        return [None] * num_images
    if len(output_sizes) == 2 and all(isinstance(v, int) for v in output_sizes):
        return [tuple(output_sizes)] * num_images
    sizes = list(output_sizes)
    if len(sizes) != num_images:
        raise ValueError(f"output_sizes must be one (H, W) or one per image ({num_images}), got {len(sizes)}")
    return sizes


def check_batch_lengths(sem_logits, boxes, classes, mask_logits) -> None:
    lengths = {"sem_logits": len(sem_logits), "boxes": len(boxes), "classes": len(classes),
               "mask_logits": len(mask_logits)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the per-image lists must have the same length, got {lengths}")


def pyramid_levels(scales: Sequence[float]) -> Tuple[int, int]:
    """(min_level, max_level) of the FPN levels whose scales are 2^-min_level, 2^-(min_level+1), ..."""
    if len(scales) == 0:
        raise ValueError("scales must name at least one level")
    levels = [-math.log2(s) for s in scales]
    for i, (s, lvl) in enumerate(zip(scales, levels)):
        if abs(lvl - round(lvl)) > 1e-6:
            raise ValueError(f"scales must be powers of 2, got {s} at level {i}")
        if round(lvl) != round(levels[0]) + i:
            raise ValueError(f"scales must halve from one level to the next (finest first), got {list(scales)}")
    return round(levels[0]), round(levels[0]) + len(scales) - 1


def fpn_level_index(rois: Tensor, min_level: int, max_level: int, canonical_box_size: float = 224.0,
                    canonical_level: int = 4) -> Tensor:
    """detectron2's level assignment as an index into the pooler's levels: ``[K]`` int64.

    ``floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))`` clamped to
    ``[min_level, max_level]``, minus ``min_level``; a NaN (negative area) goes to the finest level.
    """
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    level = torch.nan_to_num(level, nan=float(min_level)).clamp(min_level, max_level)
    return level.to(torch.long) - min_level
