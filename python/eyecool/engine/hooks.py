"""The extras of the training loop, each an object that owns its period and policy (after detectron2's
``HookBase``): periodic and final checkpoints with the restored random state, periodic and final evaluation, and
the clean stop on SIGTERM. :class:`eyecool.engine.Trainer` calls, on every rank and in the order of its list:

- ``before_train()``: once, after the data stream is built, before the first iteration;
- ``after_step()``: after every iteration (``trainer.iter`` is the one just done);
- ``after_loop()``: always, once the loop has ended (normally or by an exception): undoes what
  ``before_train`` installed;
- ``after_train()``: once, after the last iteration (not when training ended with an exception).

A hook that runs a collective (a checkpoint gathers every rank's generators; the stop hook's vote) runs it on
every rank at the same iteration, or the other ranks would wait forever.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Dict, Optional

import torch
from torch import nn

from . import distributed as du
from .checkpoint import Checkpointer, checkpoint_name
from .events import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME + ".engine")

FINAL_CHECKPOINT = "model_final.pth"


class HookBase:
    """Does nothing at each point of the loop; a hook overrides the points it needs. ``trainer`` is set by the
    trainer that runs it (its ``iter``, ``max_iter``, ``model``, ``ctx`` and ``writer`` are what hooks read)."""

    trainer = None

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_loop(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class PeriodicCheckpointer(HookBase):
    """``model_{iter:07d}.pth`` after every ``period``-th iteration but the last (``period`` 0: none), and
    ``model_final.pth`` after the last; at the start, the random generators a resume read are put back."""

    def __init__(self, checkpointer: Checkpointer, period: int):
        self.checkpointer = checkpointer
        self.period = period

    def before_train(self) -> None:
        self.checkpointer.restore_rng()

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.period and done % self.period == 0 and done < self.trainer.max_iter:
            self.checkpointer.save(checkpoint_name(self.trainer.iter), self.trainer.iter)

    def after_train(self) -> None:
        self.checkpointer.save(FINAL_CHECKPOINT, self.trainer.max_iter - 1)


class PeriodicEvaluator(HookBase):
    """``evaluate_fn(model, final)`` after every ``period``-th iteration but the last (``period`` 0: none) and
    after the last one (``final=True``); run by every rank on the unwrapped model in eval mode. Rank 0 appends
    the results to ``metrics.json`` with the iteration; the latest are ``trainer.eval_results``."""

    def __init__(self, evaluate_fn: Callable[[nn.Module, bool], Dict[str, float]], period: int):
        self.evaluate_fn = evaluate_fn
        self.period = period

    def _evaluate(self, iteration: int, final: bool) -> None:
        trainer = self.trainer
        trainer.model.eval()
        # Evaluation must not move the training generators: an uninterrupted run and one resumed from a
        # checkpoint written just before this evaluation must draw the same numbers afterwards.
        cuda_devices = [trainer.ctx.device] if trainer.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            results = self.evaluate_fn(trainer.model, final) or {}
        trainer.model.train()
        if trainer.ctx.is_main and results:
            trainer.writer.append_row({"iteration": iteration, **{k: float(v) for k, v in results.items()}})
        trainer.eval_results = results

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.period and done % self.period == 0 and done < self.trainer.max_iter:
            self._evaluate(self.trainer.iter, final=False)

    def after_train(self) -> None:
        self._evaluate(self.trainer.max_iter - 1, final=True)


class TrainingInterrupted(SystemExit):
    """SIGTERM stopped the run after a complete iteration, whose checkpoint was written (``--resume`` continues
    from it). A ``SystemExit`` with status 143 (128 + SIGTERM), the convention for a process ended by SIGTERM, so
    that an uncaught one exits quietly and schedulers see the usual status."""

    def __init__(self, message: str):
        super().__init__(128 + signal.SIGTERM)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopOnSigterm(HookBase):
    """SIGTERM (a scheduler's preemption, ``kill``, torchrun passing its own on) becomes a flag read between
    iterations instead of a death in the middle of a step: after the iteration during which it came, the run is
    checkpointed (unless ``checkpointer`` just wrote that iteration's) and :class:`TrainingInterrupted` raised.
    Ignored after the last iteration, whose final checkpoint is written anyway. The handler is installed only in
    the main thread (Python delivers signals there) and the previous one is put back when the loop ends."""

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer
        self.requested = False
        self._previous: Optional[object] = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def before_train(self) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def after_step(self) -> None:
        trainer = self.trainer
        # A vote of all ranks every iteration (the identity for one process): the signal may reach the ranks
        # during different iterations, and they must stop after the same one, all taking part in its checkpoint.
        if not du.any_across_ranks(self.requested, trainer.ctx.device) or trainer.iter + 1 >= trainer.max_iter:
            return
        if self.checkpointer.last_saved_iter != trainer.iter:
            self.checkpointer.save(checkpoint_name(trainer.iter), trainer.iter)
        message = (f"SIGTERM: stopped after iteration {trainer.iter}, checkpoint {checkpoint_name(trainer.iter)} "
                   f"written; run again with --resume to continue")
        logger.warning(message)
        raise TrainingInterrupted(message)

    def after_loop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
