"""ResNet backbone (torchvision's definitions): the first stage of the network, returning C2..C5.

Weights come only from a local torchvision-format state dict (``model.backbone.weights``); nothing is
downloaded. Pretrained runs use frozen BatchNorm and freeze the stem and res2 (``freeze_at=2``); runs from
scratch use BatchNorm or GroupNorm and train everything.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}


def norm_layer_factory(norm: str) -> Callable[[int], nn.Module]:
    """``frozen_bn`` | ``bn`` | ``gn`` (32 groups) -> a constructor taking the channel count."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"norm must be one of frozen_bn, bn, gn, got {norm!r}")


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier: ``[B, 3, H, W] -> [C2, C3, C4, C5]``.

    ``C_l`` is ``[B, out_channels[l-2], H / 2^l, W / 2^l]`` (strides 4, 8, 16, 32); out_channels is
    (64, 128, 256, 512) for ResNet-18/34 and (256, 512, 1024, 2048) for the bottleneck ResNets. Submodule names
    are torchvision's, so its state dicts load directly.
    """

    def __init__(self, *, depth: int = 50, norm: str = "frozen_bn", freeze_at: int = 2,
                 weights: Optional[str] = None):
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"depth must be one of {sorted(RESNETS)}, got {depth}")
        resnet = RESNETS[depth](weights=None, norm_layer=norm_layer_factory(norm))
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        expansion = 1 if depth < 50 else 4
        self.out_channels: List[int] = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        self.strides: List[int] = [4, 8, 16, 32]
        if weights:
            self.load_torchvision_weights(weights)
        self.freeze(freeze_at)

    def load_torchvision_weights(self, path: str) -> None:
        """Load a torchvision ResNet state dict (its ``fc.*`` entries are ignored)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"backbone weights {path}: not a torchvision ResNet state dict for this depth/norm "
                             f"(missing {missing[:5]}..., unexpected {unexpected[:5]}...)")

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients into the stem (``freeze_at >= 1``) and res2..res_{freeze_at} (``freeze_at >= 2``)."""
        stages = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        self._frozen_modules = [module for stage in stages[:freeze_at] for module in stage]
        for module in self._frozen_modules:
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        # A frozen stage keeps its BatchNorm statistics too (eval mode), whatever the model's mode.
        super().train(mode)
        for module in getattr(self, "_frozen_modules", []):
            module.eval()
        return self

    def forward(self, images: Tensor) -> List[Tensor]:
        """images ``[B, 3, H, W]`` (normalised) -> ``[C2, C3, C4, C5]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

