"""A toy model and data set with the engine's batch and loss conventions, so the training machinery (resume,
checkpoints, DDP, non-finite losses) is tested without the panoptic network.

The toy model draws from torch's global generator (dropout) and the data set's augmentation does too (random
flip), so the tests also pin the handling of random state."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from eyecool.engine import Trainer, WarmupMultiStepLR, build_optimizer, build_training_stream
from eyecool.engine.distributed import DistributedContext

IMAGE_SIZE = 16


class ToyDataset(torch.utils.data.Dataset):
    """``size`` fixed random images; the target is a class (0/1) and a scalar; random horizontal flip."""

    def __init__(self, size: int = 32):
        generator = torch.Generator().manual_seed(1234)
        self.images = torch.rand(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        self.labels = (self.images.mean(dim=(1, 2, 3)) > 0.5).long()
        self.values = self.images[:, 0].mean(dim=(1, 2))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "label": self.labels[index], "value": self.values[index]}


def toy_collate(items: List[Dict]) -> Tuple[torch.Tensor, List[Tuple[int, int]], List[Dict]]:
    images = torch.stack([item["image"] for item in items])
    sizes = [(IMAGE_SIZE, IMAGE_SIZE)] * len(items)
    targets = [{"label": item["label"], "value": item["value"]} for item in items]
    return images, sizes, targets


class ToyModel(nn.Module):
    """conv -> GroupNorm -> ReLU -> pool -> dropout -> two heads; returns ``loss_cls`` and ``loss_reg``.

    ``nan_at_call``: the forward call (0-based, training mode) whose ``loss_reg`` is NaN."""

    def __init__(self, nan_at_call: Optional[int] = None, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(8, 2)
        self.regressor = nn.Linear(8, 1)
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, images, image_sizes, targets=None):
        x = self.features(images)
        labels = torch.stack([t["label"] for t in targets])
        values = torch.stack([t["value"] for t in targets])
        loss_reg = nn.functional.mse_loss(self.regressor(x).squeeze(1), values)
        if self.nan_at_call is not None and self.calls == self.nan_at_call:
            loss_reg = loss_reg * float("nan")
        self.calls += 1
        return {"loss_cls": nn.functional.cross_entropy(self.classifier(x), labels), "loss_reg": loss_reg}


def make_toy_trainer(out_dir: Optional[str], *, max_iter: int, batch_size: int, ctx: Optional[DistributedContext] = None,
                     num_workers: int = 0, checkpoint_period: int = 0, log_period: int = 1, nonfinite: str = "stop",
                     nan_at_call: Optional[int] = None, dataset_size: int = 32, seed: int = 0,
                     stop_after_batches: Optional[int] = None, dropout: float = 0.2, amp: bool = False,
                     clip_grad: float = 0.0, tensorboard: bool = False) -> Trainer:
    """A Trainer on the toy problem, seeded like ``eyecool.train`` does (model initialised from ``seed``, the
    training generators from ``seed + rank``). ``stop_after_batches``: the data stream raises
    KeyboardInterrupt when asked for one more batch (an interrupted run)."""
    ctx = ctx or DistributedContext(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(seed)
    model = ToyModel(nan_at_call=nan_at_call, dropout=dropout)
    torch.manual_seed(seed + ctx.rank)
    optimizer = build_optimizer(model, lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = WarmupMultiStepLR(optimizer, milestones=[max_iter // 2], gamma=0.1, warmup_iters=3,
                                  warmup_factor=0.1)
    dataset = ToyDataset(dataset_size)

    def stream_factory(start_batch: int):
        stream = build_training_stream(dataset, batch_size, toy_collate, rank=ctx.rank, world_size=ctx.world_size,
                                       seed=seed, num_workers=num_workers, start_batch=start_batch)
        if stop_after_batches is None:
            return stream
        return _interrupted(stream, stop_after_batches - start_batch)

    return Trainer(model, optimizer, scheduler, stream_factory, max_iter=max_iter, ctx=ctx, out_dir=out_dir,
                   checkpoint_period=checkpoint_period, log_period=log_period, nonfinite=nonfinite, amp=amp,
                   clip_grad=clip_grad, tensorboard=tensorboard,
                   config={"seed": seed})


def _interrupted(stream, count: int):
    for _ in range(count):
        yield next(stream)
    raise KeyboardInterrupt("simulated interruption")
