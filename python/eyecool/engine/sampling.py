"""The training data stream: an endless, resumable sequence of batches that is the same whatever the number of
processes or loader workers.

- Order: epoch ``e`` is ``DistributedSampler``'s permutation for ``set_epoch(e)`` (seeded by the run's seed), each
  rank reading its shard. With the per-process batch ``B`` and ``N`` processes, step ``t`` reads the same ``N*B``
  images as one process with batch ``N*B`` (the shards interleave), so a run under ``torchrun`` follows the
  same trajectory as a single process with the same total batch.
- Resume: the stream is a pure function of the number of batches already consumed (= the iteration), so a
  resumed run starts at exactly the batch the interrupted run would have read next, without reading the skipped
  ones.
- Augmentation: each sample is loaded under its own torch seed, derived from (run seed, epoch, index), so the
  random flips and scales do not depend on which worker or rank loads it, nor on a resume.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one (epoch, sample): a simple mix (splitmix64 finaliser) so neighbours differ."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    return x & (2**63 - 1)


class SeededDataset(Dataset):
    """Wraps a map-style data set: item ``(index, seed)`` is ``dataset[index]`` loaded with torch's generator
    seeded by ``seed``. The caller's generator state is restored afterwards (with ``num_workers=0`` the loading
    happens in the training process, whose generator the model also draws from)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ResumableTrainingSampler(Sampler):
    """Endless ``(index, seed)`` pairs for this rank, whole batches per epoch, starting after ``start_batch``
    batches. Epoch ``e`` is ``DistributedSampler.set_epoch(e)``'s shard; a last incomplete batch is dropped so
    every epoch has the same number of steps (the resume arithmetic relies on it)."""

    def __init__(self, dataset_size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, start_batch: int = 0):
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        # DistributedSampler only needs len() of the data set; num_replicas/rank given explicitly, so it works
        # without an initialised process group (a single process is world size 1).
        self.shard = DistributedSampler(range(dataset_size), num_replicas=world_size, rank=rank, shuffle=shuffle,
                                        seed=seed)
        self.batches_per_epoch = len(self.shard) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the training set has {dataset_size} images, fewer than one batch per process "
                             f"({batch_size} images x {world_size} processes)")

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            # All ranks call set_epoch with the same epoch, so their shards come from one permutation.
            self.shard.set_epoch(epoch)
            indices = list(self.shard)[: self.batches_per_epoch * self.batch_size]
            for index in indices[offset * self.batch_size:]:
                yield index, sample_seed(self.seed, epoch, index)
            epoch, offset = epoch + 1, 0


def build_training_stream(dataset: Dataset, batch_size: int, collate_fn: Callable, *, rank: int = 0,
                          world_size: int = 1, seed: int = 0, num_workers: int = 0, start_batch: int = 0,
                          pin_memory: bool = False) -> Iterator[Any]:
    """An endless iterator of training batches (see the module docstring); ``start_batch`` = batches already
    consumed (the iteration a run resumes at)."""
    sampler = ResumableTrainingSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                       start_batch=start_batch)
    # The loader's own generator (it seeds the workers) keeps it from drawing on the global one, which the model
    # uses and a checkpoint restores; the per-sample seeds make the worker seeds irrelevant to the data.
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_fn, pin_memory=pin_memory, drop_last=True,
                        persistent_workers=num_workers > 0, generator=generator)
    return iter(loader)


def move_to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists and tuples) moved to ``device``; everything else as is."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: move_to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(move_to_device(v, device) for v in value)
    return value


def close_training_stream(stream: Iterator[Any]) -> None:
    """Stops the loader workers behind a stream from ``build_training_stream`` now (a generator is closed).

    Why not leave it to garbage collection: while the DataLoader iterator lives, its SIGCHLD handler checks the
    worker pids it registered on every SIGCHLD the process receives, and raises "DataLoader worker ... is killed"
    for a dead one in whatever code runs at that moment. After a failed run, the traceback keeps the iterator
    alive, so a worker that died would make an unrelated later SIGCHLD (a subprocess exiting) raise. The shutdown
    unregisters the pids; it can itself raise that error once, when a worker died (the caller reports it).
    """
    shutdown = getattr(stream, "_shutdown_workers", None)  # torch's _MultiProcessingDataLoaderIter
    if shutdown is not None:
        shutdown()
    elif hasattr(stream, "close"):
        stream.close()


class ShardSampler(Sampler):
    """Indices ``rank, rank + N, ...`` in order, without the padding DistributedSampler adds: for evaluation,
    where every image must be seen exactly once over all ranks."""

    def __init__(self, dataset_size: int, rank: int = 0, world_size: int = 1, limit: Optional[int] = None):
        total = dataset_size if limit is None else min(limit, dataset_size)
        self.indices = list(range(rank, total, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
