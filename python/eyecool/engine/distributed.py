"""Process-group helpers: one code path for one CPU, one GPU, or N processes under ``torchrun``.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and the rendezvous address) in
every process; without them a run is a single process and every collective below is the identity, so the
training loop never needs to ask which case it is in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` in ``world_size`` processes, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (a no-op for a single process).

    ``device="cuda"`` puts each process on GPU ``LOCAL_RANK`` with the NCCL backend; ``"cpu"`` uses gloo. Calling
    it again in a process that already joined returns the same context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for, but torch sees no CUDA device")
    if use_cuda:
        # One GPU per process: bind before any CUDA allocation so that NCCL and the caching allocator use it.
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, local_rank, torch_device)


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; for small per-rank results)."""
    if get_world_size() == 1:
        return [obj]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_across_ranks(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one: decisions that change which collectives run
    next (skip a step, stop training) must be taken by all ranks together, or the others wait forever."""
    if get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def average_across_ranks(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """The mean of each scalar over all ranks (for logging losses that every rank computed on its own shard)."""
    if get_world_size() == 1 or not values:
        return dict(values)
    names = list(values)  # every rank builds the dict in the same order
    stacked = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= get_world_size()
    return dict(zip(names, stacked.tolist()))


def cleanup_distributed() -> None:
    """Ends the process group after a run that every rank completed. The barrier first: gloo aborts a process
    (``terminate called without an active exception``) when its peer tears down a connection it is still using,
    which happened when one rank reached the teardown while the other was finishing its last collective."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
