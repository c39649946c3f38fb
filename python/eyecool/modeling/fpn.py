"""Feature pyramid network: C2..C5 of the backbone -> P2..P6, read by the semantic and instance branches."""
from __future__ import annotations

from typing import List, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """1x1 laterals, nearest x2 top-down sum, 3x3 outputs; P6 = max-pool (kernel 1, stride 2) of P5.

    Input ``[C2, C3, C4, C5]`` with ``C_l: [B, in_channels[l-2], H / 2^l, W / 2^l]``; output
    ``[P2, P3, P4, P5, P6]`` with ``P_l: [B, channels, H / 2^l, W / 2^l]`` (P6 at stride 64).
    """

    def __init__(self, *, in_channels: Sequence[int], channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        for conv in list(self.lateral_convs) + list(self.output_convs):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # detectron2's c2_xavier_fill
            nn.init.zeros_(conv.bias)
        self.channels = channels
        self.strides = [4, 8, 16, 32, 64]

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        """``[C2..C5]`` -> ``[P2..P6]``."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            # Resize to the lateral's size rather than a fixed x2, so odd sizes also work.
            merged.insert(0, lateral + F.interpolate(merged[0], size=lateral.shape[-2:], mode="nearest"))
        outputs = [conv(m) for conv, m in zip(self.output_convs, merged)]
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs
