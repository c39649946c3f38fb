"""RPN-FCN fusion (RFF) in plain PyTorch: the test oracle for the fused kernel and its fallback.

It is the literal composition (softmax over classes, sum of the thing channels, adaptive average pooling to each
RPN level, multiply), so it materialises the ``[N, S + K, H, W]`` softmax that the kernel avoids.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from eyecool_ext._autocast import autocast_on, reference_policy

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


def foreground_probability(sem_logits: Tensor, num_stuff: int) -> Tensor:
    """``[N, S + K, H, W]`` logits -> ``[N, 1, H, W]`` probability that a pixel is a thing (sum of thing softmax)."""
    return torch.softmax(sem_logits, dim=1)[:, num_stuff:].sum(dim=1, keepdim=True)


@reference_policy("fg_fusion", ("sem_logits", "rpn_logits"))
def fg_fusion(sem_logits: Tensor, rpn_logits: Sequence[Tensor], num_stuff: int, mode: str = "logit") -> List[Tensor]:
    """Reference RFF; see ``eyecool_ext.ops.fg_fusion`` for the contract."""
    levels = check_fg_fusion_args(sem_logits, rpn_logits, num_stuff, mode)
    fg = foreground_probability(sem_logits, num_stuff)
    out = []
    for level in levels:
        fg_level = F.adaptive_avg_pool2d(fg, level.shape[-2:])
        gate = level if mode == "logit" else torch.sigmoid(level)
        out.append(gate * fg_level)
    return out
