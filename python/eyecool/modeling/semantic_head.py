"""The semantic branch (UPSNet's "DC subnet"): deformable convolutions shared over P2..P5, then per-pixel logits.

It reads the plain FPN levels. Its 1/4-scale logits feed the semantic loss, RFF (foreground probability for the
RPN) and the panoptic head; its concatenated features ``sem_feat`` feed DAM's semantic-to-mask path.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eyecool.modeling.operators import OpBackend, deformable_conv


class DeformableConv3x3(nn.Module):
    """3x3 deformable convolution (DCN v1, stride 1, padding 1) with its own zero-initialised 3x3 offset conv.

    ``[B, C_in, H, W] -> [B, C_out, H, W]``. With zero offsets it equals a plain 3x3 convolution, so training
    starts from the regular grid.
    """

    def __init__(self, *, in_channels: int, out_channels: int, backend: OpBackend):
        super().__init__()
        self.backend = backend
        self.offset = nn.Conv2d(in_channels, 2 * 3 * 3, 3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return deformable_conv(self.backend, x, self.offset(x), self.weight, self.bias, padding=1, dilation=1)


class SemanticHead(nn.Module):
    """``[P2..P5]`` -> ``(sem_logits [B, S + K, H/4, W/4], sem_feat [B, 4 * out_channels, H/4, W/4])``.

    One subnet with shared weights runs on each level: 3x3 (deformable) conv ``in -> hidden``, ReLU,
    ``hidden -> out``, ReLU, ``out -> out``, ReLU. The results of P3..P5 are upsampled bilinearly to the size of
    P2 and concatenated into ``sem_feat``; a 1x1 conv gives the logits (stuff channels first, then things).
    """

    def __init__(self, *, in_channels: int, num_classes: int, backend: OpBackend, hidden_channels: int = 256,
                 out_channels: int = 128, deformable: bool = True, num_levels: int = 4):
        super().__init__()
        dims = [(in_channels, hidden_channels), (hidden_channels, out_channels), (out_channels, out_channels)]
        if deformable:
            self.convs = nn.ModuleList(DeformableConv3x3(in_channels=a, out_channels=b, backend=backend)
                                       for a, b in dims)
        else:
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in dims)
            for conv in self.convs:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        self.num_levels = num_levels
        self.feature_channels = num_levels * out_channels
        self.classifier = nn.Conv2d(self.feature_channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: List[Tensor]) -> Tuple[Tensor, Tensor]:
        size = features[0].shape[-2:]
        outputs = []
        for level, f in enumerate(features[: self.num_levels]):
            x = f
            for conv in self.convs:
                x = F.relu(conv(x))
            if level > 0:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            outputs.append(x)
        sem_feat = torch.cat(outputs, dim=1)
        return self.classifier(sem_feat), sem_feat


def semantic_loss(sem_logits: Tensor, sem_targets: Tensor) -> Tensor:
    """Cross-entropy (void 255 ignored) of the logits upsampled bilinearly to the targets' size.

    sem_logits ``[B, S + K, h, w]``; sem_targets ``[B, H, W]`` int64, padded with 255.
    """
    logits = F.interpolate(sem_logits.float(), size=sem_targets.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, sem_targets, ignore_index=255, reduction="sum")
    return loss / (sem_targets != 255).sum().clamp(min=1).float()
