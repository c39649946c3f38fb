"""The training loop: one readable function of data -> loss -> step, with checkpoints, evaluation and logs kept
beside it. It runs unchanged on one CPU, one GPU, or N processes under ``torchrun``.

A batch is ``(images [B, 3, Hp, Wp], image_sizes [(H, W)] * B, targets [dict] * B)`` (``eyecool.data``'s
``PanopticBatch``), and the model maps ``model(images, image_sizes, targets)`` to a dict of scalar losses whose
sum is minimised. Nothing here knows about panoptic segmentation.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed as du
from .checkpoint import (CheckpointError, capture_rng_state, checkpoint_name, load_checkpoint,
                         load_state_dict_checked, restore_rng_state, resume_candidates, save_checkpoint)
from .distributed import DistributedContext
from .events import LOGGER_NAME, MetricsWriter
from .sampling import close_training_stream

logger = logging.getLogger(LOGGER_NAME + ".engine")

NONFINITE_POLICIES = ("stop", "skip")


class TrainingInterrupted(SystemExit):
    """SIGTERM stopped the run after a complete iteration, whose checkpoint was written (``--resume`` continues
    from it). A ``SystemExit`` with status 143 (128 + SIGTERM), the convention for a process ended by SIGTERM, so
    that an uncaught one exits quietly and schedulers see the usual status."""

    def __init__(self, message: str):
        super().__init__(128 + signal.SIGTERM)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _StopRequest:
    """Turns SIGTERM (a scheduler's preemption, ``kill``, torchrun passing its own SIGTERM on) into a flag that
    the loop reads between iterations, instead of dying in the middle of a step. Installed only in the main
    thread (Python delivers signals there); the previous handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def move_to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists and tuples) moved to ``device``; everything else as is."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: move_to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(move_to_device(v, device) for v in value)
    return value


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
        evaluate_fn: ``(model, final) -> dict of metrics`` run by every rank on the unwrapped model in eval mode
            (``final`` is True for the evaluation after the last iteration); it returns the gathered result on
            rank 0 (other ranks may return anything).
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
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stream_factory = stream_factory
        self.max_iter = max_iter
        self.ctx = ctx
        self.out_dir = out_dir
        self.amp = amp
        self.clip_grad = clip_grad
        self.nonfinite = nonfinite
        self.checkpoint_period = checkpoint_period
        self.eval_period = eval_period
        self.log_period = log_period
        self.tensorboard = tensorboard
        self.evaluate_fn = evaluate_fn
        self.config = config or {}
        self.extra_state = extra_state or {}
        self.start_iter = 0
        self._rng_to_restore: Optional[Dict[str, Any]] = None  # this rank's generators, set by resume()
        self.eval_results: Dict[str, float] = {}
        # float16 needs loss scaling against gradient underflow; bfloat16 (the CPU's autocast type) does not.
        self.amp_dtype = torch.float16 if ctx.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp and self.amp_dtype == torch.float16)
        if ctx.distributed:
            # DDP broadcasts rank 0's parameters and buffers here, so every rank starts from the same weights
            # even if their initialisation differed; in backward it all-reduces (averages) the gradients in
            # buckets, overlapped with the rest of backward, so every rank then takes the same step.
            self.ddp_model: nn.Module = DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters)
        else:
            self.ddp_model = model

    # ------------------------------------------------------------------------------------------ checkpoints

    def resume(self, path: Optional[str] = None) -> bool:
        """Restore model, optimizer, scheduler, scaler, RNG states and the iteration from ``path`` (default: the
        checkpoint ``out_dir/last_checkpoint`` names). Returns False when there is nothing to resume from.

        Without ``path``, a checkpoint that cannot be used (truncated, corrupt, not weights-only, from another
        configuration) is reported and the previous one is tried, newest first; CheckpointError when none works.
        """
        candidates = [path] if path else (resume_candidates(self.out_dir) if self.out_dir else [])
        if not candidates:
            return False
        failures = []
        for candidate in candidates:
            try:
                self._restore(candidate)
            except (CheckpointError, FileNotFoundError) as error:
                failures.append(str(error))
                logger.warning(f"cannot resume from {candidate}: {error}")
                continue
            if failures:
                logger.warning(f"resumed from {candidate} instead, the newest checkpoint that loads")
            return True
        raise CheckpointError("no checkpoint to resume from could be loaded:\n  " + "\n  ".join(failures))

    def _restore(self, path: str) -> None:
        # On the CPU: the RNG states must stay CPU tensors; load_state_dict moves the rest to the parameters'
        # device.
        state = load_checkpoint(path, map_location="cpu")
        missing = [key for key in ("model", "optimizer", "scheduler", "iteration") if key not in state]
        if missing:
            raise CheckpointError(f"{path}: not a training checkpoint (no {', '.join(missing)}); weights alone "
                                  f"cannot be resumed from")
        load_state_dict_checked(self.model, state["model"], path)
        load_state_dict_checked(self.optimizer, state["optimizer"], path)
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.start_iter = int(state["iteration"]) + 1
        rng_states = state.get("rng")
        # Each rank restores its own generators when the process count matches; otherwise the draws cannot be
        # replayed, and each rank reseeds from (seed, rank, iteration) so that the ranks still differ.
        if rng_states is not None and len(rng_states) == self.ctx.world_size:
            self._rng_to_restore = rng_states[self.ctx.rank]
        else:
            torch.manual_seed(hash((self.config.get("seed", 0), self.ctx.rank, self.start_iter)) % 2**63)
            logger.warning(f"{path} was written by {len(rng_states or [])} processes, this run has "
                           f"{self.ctx.world_size}: random draws will differ from an uninterrupted run")
        logger.info(f"resuming from {path} at iteration {self.start_iter}")
        return True

    def save(self, file_name: str, iteration: int) -> None:
        """Write a checkpoint. Every rank must call it: the RNG states are gathered from all of them."""
        # Collective: rank 0 stores every rank's generators, so a resumed N-process run replays all of them.
        rng_states = du.all_gather_object(capture_rng_state())
        if not self.ctx.is_main or self.out_dir is None:
            return
        state = {
            "model": self.model.state_dict(),  # the unwrapped model: no "module." prefix, loadable without DDP
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": iteration,
            "config": self.config,
            "rng": rng_states,
            **self.extra_state,
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        path = save_checkpoint(state, self.out_dir, file_name)
        logger.info(f"saved {path}")

    # ------------------------------------------------------------------------------------------- evaluation

    def run_evaluation(self, writer: MetricsWriter, iteration: int, final: bool = False) -> Dict[str, float]:
        if self.evaluate_fn is None:
            return {}
        self.model.eval()
        # Evaluation must not move the training generators: an uninterrupted run and one resumed from a
        # checkpoint written just before this evaluation must draw the same numbers afterwards.
        cuda_devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            results = self.evaluate_fn(self.model, final)
        self.model.train()
        if self.ctx.is_main and results:
            writer.append_row({"iteration": iteration, **{k: float(v) for k, v in results.items()}})
        self.eval_results = results or {}
        return self.eval_results

    # ----------------------------------------------------------------------------------------------- the loop

    def train(self) -> Dict[str, float]:
        """Run from ``start_iter`` to ``max_iter``; returns the final evaluation results (rank 0)."""
        self._iteration = self.start_iter
        try:
            return self._train()
        except RuntimeError as error:
            # A killed loader worker is reported by the DataLoader's SIGCHLD handler, which raises in whatever
            # code runs at that moment (logging, the forward), not only in next(stream): say where it happened.
            if str(error).startswith("DataLoader worker"):
                raise RuntimeError(f"loading the batch of iteration {self._iteration} failed: {error}") from error
            raise

    def _train(self) -> Dict[str, float]:
        ctx = self.ctx
        writer = MetricsWriter(self.out_dir, self.max_iter, self.log_period, ctx.device, enabled=ctx.is_main,
                               start_iter=self.start_iter, tensorboard=self.tensorboard)
        stream = self.stream_factory(self.start_iter)
        # Restored after the stream is built: nothing that happens at start-up may consume the restored draws.
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
        params = [p for p in self.model.parameters() if p.requires_grad]
        autocast = (torch.autocast(ctx.device.type, dtype=self.amp_dtype) if self.amp else contextlib.nullcontext())
        self.ddp_model.train()
        logger.info(f"training from iteration {self.start_iter} to {self.max_iter} on {ctx.world_size} "
                    f"process(es), device {ctx.device}")
        try:
            try:
                with _StopRequest() as stop:
                    self._loop(stream, writer, params, autocast, stop)
            finally:
                close_training_stream(stream)
            self.save("model_final.pth", self.max_iter - 1)
            return self.run_evaluation(writer, self.max_iter - 1, final=True)
        finally:
            writer.close()

    def _loop(self, stream, writer: MetricsWriter, params, autocast, stop: _StopRequest) -> None:
        ctx = self.ctx
        iter_start = time.perf_counter()
        for iteration in range(self.start_iter, self.max_iter):
            self._iteration = iteration
            try:
                images, image_sizes, targets = next(stream)
            except RuntimeError as error:  # e.g. a loader worker killed (out of memory): say where it happened
                raise RuntimeError(f"loading the batch of iteration {iteration} failed: {error}") from error
            except (EOFError, ConnectionError) as error:
                # A worker that dies after queueing a batch, before this process fetched the batch's shared
                # memory from it, shows up here (the connection to its fd sharer closes), usually before the
                # SIGCHLD handler has reported the death.
                raise RuntimeError(f"loading the batch of iteration {iteration} failed: DataLoader worker "
                                   f"connection lost while receiving the batch ({type(error).__name__}: {error}); "
                                   "a loader worker process died (killed, e.g. by the out-of-memory killer?)"
                                   ) from error
            data_time = time.perf_counter() - iter_start
            images = move_to_device(images, ctx.device)
            targets = move_to_device(targets, ctx.device)

            with autocast:
                loss_dict = self.ddp_model(images, image_sizes, targets)
            loss_dict = {name: loss.float() for name, loss in loss_dict.items()}
            total_loss = sum(loss_dict.values())

            # Synchronisation point: .item() waits for the device, and the all-reduce makes every rank take the
            # same decision; a rank that stopped or skipped alone would leave the others blocked in a collective.
            local_nonfinite = not bool(torch.isfinite(total_loss).item())
            if du.any_across_ranks(local_nonfinite, ctx.device):
                bad = {name: v.item() for name, v in loss_dict.items() if not torch.isfinite(v)}
                where = f"rank {ctx.rank}: " if ctx.distributed else ""
                message = (f"non-finite loss at iteration {iteration}: {where}" +
                           (", ".join(f"{name} = {value}" for name, value in bad.items()) or
                            "(finite here, non-finite on another rank)") + f" (total_loss = {total_loss.item()})")
                if self.nonfinite == "stop":
                    raise FloatingPointError(message + "; stopping (no checkpoint written). Lower solver.lr, "
                                             "enable solver.clip_grad, or skip such steps with nonfinite=skip")
                logger.warning(message + "; skipping this step")
                # Still run backward so that DDP's all-reduce of this step happens on every rank; the NaN
                # gradients are thrown away instead of applied.
                self.scaler.scale(total_loss).backward()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                iter_start = time.perf_counter()
                continue

            self.optimizer.zero_grad(set_to_none=True)
            # DDP: backward all-reduces the gradients across ranks (averaged), so the step below is identical
            # on every rank and the replicas stay in sync without ever exchanging weights.
            self.scaler.scale(total_loss).backward()
            if self.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()

            # Synchronisation point (all-reduce): the logged losses are the mean over ranks, i.e. over the whole
            # batch, so a logged curve does not depend on the number of processes. The same all-reduce carries the
            # SIGTERM flag: the signal may reach the ranks during different iterations, and they must agree to stop
            # after the same one (and all take part in that checkpoint's collectives).
            scalars = du.average_across_ranks({"total_loss": total_loss.item(),
                                               **{n: v.item() for n, v in loss_dict.items()},
                                               "stop_requested": float(stop.requested)}, ctx.device)
            stop_requested = scalars.pop("stop_requested") > 0
            writer.put(**scalars, data_time=data_time, time=time.perf_counter() - iter_start)
            writer.write(iteration, lr)

            done = iteration + 1
            saved = False
            if self.checkpoint_period and done % self.checkpoint_period == 0 and done < self.max_iter:
                self.save(checkpoint_name(iteration), iteration)
                saved = True
            if self.eval_period and done % self.eval_period == 0 and done < self.max_iter:
                self.run_evaluation(writer, iteration)
            if done < self.max_iter and stop_requested:
                if not saved:
                    self.save(checkpoint_name(iteration), iteration)
                message = (f"SIGTERM: stopped after iteration {iteration}, checkpoint {checkpoint_name(iteration)} "
                           f"written; run again with --resume to continue")
                logger.warning(message)
                raise TrainingInterrupted(message)
            iter_start = time.perf_counter()
