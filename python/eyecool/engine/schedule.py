"""The optimiser and the learning-rate schedule (UPSNet / detectron2): SGD with momentum and weight decay, a
linear warm-up, then a step decay by ``gamma`` at each milestone; the learning rate is given for a total batch
and scales linearly with it."""
from __future__ import annotations

import bisect
from typing import List, Sequence

import torch
from torch import nn

# Parameters of these layers are scales and shifts of normalised activations: decaying them towards zero fights
# the normalisation rather than regularising (detectron2's WEIGHT_DECAY_NORM = 0).
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def linear_scaled_lr(lr: float, ims_per_batch: int, new_ims_per_batch: int) -> float:
    """The learning rate for ``new_ims_per_batch`` images per step when ``lr`` suits ``ims_per_batch``
    (the linear scaling rule of Goyal et al., used by UPSNet and detectron2)."""
    if ims_per_batch < 1 or new_ims_per_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got {ims_per_batch} and {new_ims_per_batch}")
    return lr * new_ims_per_batch / ims_per_batch


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over the trainable parameters, without weight decay on normalisation layers."""
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    seen = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if isinstance(module, _NORM_LAYERS) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """``lr(it) = base_lr * warmup(it) * gamma ** (number of milestones <= it)``, where ``warmup`` rises linearly
    from ``warmup_factor`` at iteration 0 to 1 at ``warmup_iters``. Stepped once per iteration.

    The factor is a closed form of the iteration, so a resumed run (which restores ``last_epoch``) gets exactly
    the learning rate of an uninterrupted one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 warmup_iters: int = 0, warmup_factor: float = 0.001, last_epoch: int = -1):
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, iteration: int) -> float:
        warmup = 1.0
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            warmup = self.warmup_factor * (1.0 - alpha) + alpha
        return warmup * self.gamma ** bisect.bisect_right(self.milestones, iteration)

    def get_lr(self) -> List[float]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]
