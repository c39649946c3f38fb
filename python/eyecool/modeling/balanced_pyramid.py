"""DAM part 1: the balanced feature pyramid of Libra R-CNN, refined by an embedded-Gaussian non-local block.

It sits between the FPN and the instance branch (RPN, box and mask heads): every level receives the same
refined, balanced summary of all levels. The semantic branch keeps reading the plain FPN levels.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018), residual, output conv zero-initialised.

    ``x [B, C, H, W] -> x + W_z(g(x) softmax(theta(x)^T phi(x) / sqrt(inter_channels)))``, with 1x1 convs
    theta, phi, g: C -> inter_channels and W_z: inter_channels -> C. At initialisation it is the identity.
    """

    def __init__(self, *, channels: int, inter_channels: int | None = None):
        super().__init__()
        inter = inter_channels or channels
        self.inter_channels = inter
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.out = nn.Conv2d(inter, channels, 1)
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        # Zero output: training starts from the plain balanced pyramid.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, H, W]``."""
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # [B, HW, C']
        phi = self.phi(x).flatten(2)  # [B, C', HW]
        g = self.g(x).flatten(2).transpose(1, 2)  # [B, HW, C']
        attention = torch.softmax(torch.bmm(theta, phi) / math.sqrt(self.inter_channels), dim=-1)  # [B, HW, HW]
        y = torch.bmm(attention, g).transpose(1, 2).reshape(b, self.inter_channels, h, w)
        return x + self.out(y)


class BalancedPyramid(nn.Module):
    """Gather P2..P5 at the refine level's size, average, refine (non-local), scatter back as a residual.

    Gathering uses adaptive max pooling for finer levels and nearest upsampling for coarser ones; scattering
    the refined map uses nearest upsampling to finer levels and adaptive max pooling to coarser ones. Input and
    output: ``[P2..P5]``, ``P_l: [B, C, H_l, W_l]``; each output level is ``P_l + resize(refined)``.
    """

    def __init__(self, *, channels: int, num_levels: int = 4, refine_level: int = 2):
        super().__init__()
        if not 0 <= refine_level < num_levels:
            raise ValueError(f"refine_level must be in [0, {num_levels}), got {refine_level}")
        self.num_levels = num_levels
        self.refine_level = refine_level
        self.refine = NonLocalBlock(channels=channels)

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        """``[P2..P5]`` (plain FPN) -> ``[P2..P5]`` (balanced)."""
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(features)}")
        size = features[self.refine_level].shape[-2:]
        gathered = [
            F.adaptive_max_pool2d(f, size) if i < self.refine_level else F.interpolate(f, size=size, mode="nearest")
            for i, f in enumerate(features)
        ]
        balanced = self.refine(torch.stack(gathered).mean(dim=0))
        outputs = []
        for i, f in enumerate(features):
            if i < self.refine_level:
                residual = F.interpolate(balanced, size=f.shape[-2:], mode="nearest")
            else:
                residual = F.adaptive_max_pool2d(balanced, f.shape[-2:])
            outputs.append(f + residual)
        return outputs
