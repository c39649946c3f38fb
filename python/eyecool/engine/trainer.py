"""The training loop: data -> loss -> step, with the extras (checkpoints, evaluation, the stop on SIGTERM) as
hooks that own their period and policy (``eyecool.engine.hooks``). It runs unchanged on one CPU, one GPU, or N
processes under ``torchrun``.

A batch is ``(images [B, 3, Hp, Wp], image_sizes [(H, W)] * B, targets [dict] * B)`` (``eyecool.data``'s
``PanopticBatch``), and the model maps ``model(images, image_sizes, targets)`` to a dict of scalar losses whose
sum is minimised. Nothing here knows about panoptic segmentation.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed as du
from .checkpoint import Checkpointer
from .distributed import DistributedContext
from .events import LOGGER_NAME, MetricsWriter
from .hooks import PeriodicCheckpointer, PeriodicEvaluator, StopOnSigterm
from .sampling import close_training_stream, move_to_device

logger = logging.getLogger(LOGGER_NAME + ".engine")

NONFINITE_POLICIES = ("stop", "skip")


def loader_failure(error: BaseException, iteration: int, reading: bool) -> Optional[RuntimeError]:
    """The error naming the iteration to raise instead of ``error`` when it is a DataLoader failure, else None;
    ``reading``: it came out of ``next(stream)``. A killed worker is reported by the DataLoader's SIGCHLD handler,
    which raises in whatever code runs at that moment (the forward, logging). A worker that dies after queueing a
    batch, before this process fetched the batch's shared memory, shows up in ``next(stream)`` as an EOFError or a
    connection error (its fd sharer's connection closes), usually before the SIGCHLD handler reports it."""
    prefix = f"loading the batch of iteration {iteration} failed: "
    if isinstance(error, RuntimeError) and (reading or str(error).startswith("DataLoader worker")):
        return RuntimeError(prefix + str(error))
    if reading and isinstance(error, (EOFError, ConnectionError)):
        return RuntimeError(prefix + f"DataLoader worker connection lost while receiving the batch "
                            f"({type(error).__name__}: {error}); a loader worker process died (killed, e.g. by "
                            f"the out-of-memory killer?)")
    return None


class Trainer:
    """Iteration-based SGD training of ``model`` (unwrapped; wrapped in DDP here when the run is distributed).

    Args:
        model: on ``ctx.device``, returns a dict of scalar losses in train mode.
        optimizer, scheduler: the scheduler is stepped once per iteration.
        stream_factory: ``start_batch -> iterator of batches`` (see ``eyecool.engine.sampling``); called once,
            with the number of batches already consumed, so a resumed run continues the same data order.
        max_iter: iterations to run in total.
        ctx: this process's place in the run (``init_distributed``).
        out_dir: where checkpoints and ``metrics.json`` go (rank 0 writes them); None writes nothing.
        amp: autocast the forward pass (bfloat16 on the CPU; float16 with a gradient scaler on CUDA).
        clip_grad: clip the global gradient norm to this value; 0 disables.
        nonfinite: what a NaN / infinite total loss does: ``"stop"`` raises FloatingPointError naming the loss
            and the iteration; ``"skip"`` drops that step (no parameter update) and goes on.
        checkpoint_period, eval_period, log_period: in iterations; 0 disables periodic checkpoints / evaluation
            (the final checkpoint and evaluation always happen).
        evaluate_fn: ``(model, final) -> dict of metrics``, see :class:`~eyecool.engine.hooks.PeriodicEvaluator`;
            it returns the gathered result on rank 0 (other ranks may return anything).
        config: plain dict stored in every checkpoint (the resolved configuration).
        extra_state: more plain data stored in every checkpoint (e.g. the data set's categories).
        find_unused_parameters: DDP option; needed when some parameters get no gradient in some steps.
        tensorboard: also write the logged scalars as TensorBoard events to ``out_dir/tensorboard``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, stream_factory: Callable[[int], Iterator[Any]],
                 *, max_iter: int, ctx: DistributedContext, out_dir: Optional[str] = None, amp: bool = False,
                 clip_grad: float = 0.0, nonfinite: str = "stop", checkpoint_period: int = 0, eval_period: int = 0,
                 log_period: int = 20, evaluate_fn: Optional[Callable[[nn.Module, bool], Dict[str, float]]] = None,
                 config: Optional[Dict[str, Any]] = None, extra_state: Optional[Dict[str, Any]] = None,
                 find_unused_parameters: bool = False, tensorboard: bool = False):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite: expected one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
        self.model, self.optimizer, self.scheduler, self.stream_factory = model, optimizer, scheduler, stream_factory
        self.max_iter, self.ctx, self.out_dir = max_iter, ctx, out_dir
        self.amp, self.clip_grad, self.nonfinite = amp, clip_grad, nonfinite
        self.log_period, self.tensorboard = log_period, tensorboard
        # float16 needs loss scaling against gradient underflow; bfloat16 (the CPU's autocast type) does not.
        self.amp_dtype = torch.float16 if ctx.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp and self.amp_dtype == torch.float16)
        # DDP broadcasts rank 0's parameters and buffers here, so every rank starts from the same weights; in
        # backward it all-reduces (averages) the gradients, overlapped with the rest of backward, so every rank
        # then takes the same step and the replicas stay in sync without ever exchanging weights.
        self.ddp_model = DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters) if ctx.distributed else model
        self.checkpointer = Checkpointer(model, optimizer, scheduler, self.scaler, rank=ctx.rank,
                                         world_size=ctx.world_size, out_dir=out_dir, config=config,
                                         extra_state=extra_state)
        # In this order after each iteration: checkpoint, evaluate, then stop (after the others' work is done).
        self.hooks = [PeriodicCheckpointer(self.checkpointer, checkpoint_period),
                      *([PeriodicEvaluator(evaluate_fn, eval_period)] if evaluate_fn is not None else []),
                      StopOnSigterm(self.checkpointer)]
        for hook in self.hooks:
            hook.trainer = self
        self.iter, self.eval_results, self.writer, self._reading_batch = 0, {}, None, False

    @property
    def start_iter(self) -> int:
        """The first iteration :meth:`train` runs (0, or the one after the checkpoint :meth:`resume` read)."""
        return self.checkpointer.start_iter

    def resume(self, path: Optional[str] = None) -> bool:
        """See :meth:`eyecool.engine.checkpoint.Checkpointer.resume`: False when there is nothing to resume."""
        return self.checkpointer.resume(path)

    def train(self) -> Dict[str, float]:
        """Run from ``start_iter`` to ``max_iter``; returns the final evaluation results (rank 0)."""
        self.iter = self.start_iter
        self.writer = MetricsWriter(self.out_dir, self.max_iter, self.log_period, self.ctx.device,
                                    enabled=self.ctx.is_main, start_iter=self.start_iter, tensorboard=self.tensorboard)
        try:
            stream = self.stream_factory(self.start_iter)
            try:
                for hook in self.hooks:
                    hook.before_train()
                self.ddp_model.train()
                logger.info(f"training from iteration {self.start_iter} to {self.max_iter} on "
                            f"{self.ctx.world_size} process(es), device {self.ctx.device}")
                for self.iter in range(self.start_iter, self.max_iter):
                    self.run_step(stream)
                    for hook in self.hooks:
                        hook.after_step()
            finally:
                close_training_stream(stream)
                for hook in self.hooks:
                    hook.after_loop()
            for hook in self.hooks:
                hook.after_train()
            return self.eval_results
        except (RuntimeError, EOFError, ConnectionError) as error:
            failure = loader_failure(error, self.iter, self._reading_batch)
            if failure is None:
                raise
            raise failure from error
        finally:
            self.writer.close()

    def run_step(self, stream: Iterator[Any]) -> None:
        """Iteration ``self.iter``: read a batch, forward, backward, optimizer and scheduler step, log."""
        start = time.perf_counter()
        self._reading_batch = True
        images, image_sizes, targets = next(stream)
        self._reading_batch = False
        data_time = time.perf_counter() - start
        images, targets = move_to_device(images, self.ctx.device), move_to_device(targets, self.ctx.device)

        autocast = torch.autocast(self.ctx.device.type, dtype=self.amp_dtype) if self.amp else contextlib.nullcontext()
        with autocast:
            loss_dict = self.ddp_model(images, image_sizes, targets)
        loss_dict = {name: loss.float() for name, loss in loss_dict.items()}
        total_loss = sum(loss_dict.values())
        # DDP: backward all-reduces the gradients across ranks (averaged), so the step is the same on every rank.
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total_loss).backward()
        if self._loss_is_nonfinite(total_loss, loss_dict):
            # "skip": backward still ran, so that DDP's all-reduce of this step happened on every rank; the NaN
            # gradients are thrown away instead of applied.
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()

        # Synchronisation point (all-reduce): the logged losses are the mean over ranks, i.e. over the whole
        # batch, so a logged curve does not depend on the number of processes.
        scalars = du.average_across_ranks({"total_loss": total_loss.item(),
                                           **{n: v.item() for n, v in loss_dict.items()}}, self.ctx.device)
        self.writer.put(**scalars, data_time=data_time, time=time.perf_counter() - start)
        self.writer.write(self.iter, lr)

    def _loss_is_nonfinite(self, total_loss: torch.Tensor, loss_dict: Dict[str, torch.Tensor]) -> bool:
        """True when this step is to be skipped; FloatingPointError under the "stop" policy. Synchronisation
        point: .item() waits for the device, and the all-reduce makes every rank take the same decision (a rank
        that stopped or skipped alone would leave the others blocked in a collective)."""
        if not du.any_across_ranks(not bool(torch.isfinite(total_loss).item()), self.ctx.device):
            return False
        bad = {name: v.item() for name, v in loss_dict.items() if not torch.isfinite(v)}
        where = f"rank {self.ctx.rank}: " if self.ctx.distributed else ""
        message = (f"non-finite loss at iteration {self.iter}: {where}" +
                   (", ".join(f"{name} = {value}" for name, value in bad.items()) or
                    "(finite here, non-finite on another rank)") + f" (total_loss = {total_loss.item()})")
        if self.nonfinite == "stop":
            raise FloatingPointError(message + "; stopping (no checkpoint written). Lower solver.lr, enable "
                                     "solver.clip_grad, or skip such steps with nonfinite=skip")
        logger.warning(message + "; skipping this step")
        return True
