"""RPN-FCN fusion (RFF) in plain PyTorch: the test oracle for the fused kernel and its fallback.

It is the literal composition (softmax over classes, sum of the thing channels, adaptive average pooling to each
RPN level, multiply), so it materialises the ``[N, S + K, H, W]`` softmax that the kernel avoids.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from eyecool_ext._autocast import reference_policy
from eyecool_ext._utils import check_fg_fusion_args


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
