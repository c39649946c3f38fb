"""Checkpoints: a plain dict ``{"model", "optimizer", "scheduler", "iteration", "config", ...}`` saved with
``torch.save`` and loaded with ``torch.load(..., weights_only=True)`` (no pickled code runs on load).

Files in the output folder: ``model_{iter:07d}.pth`` (periodic), ``model_final.pth`` and ``last_checkpoint``
(one line: the file name of the newest checkpoint, which ``--resume`` reads). Every file is written to a
temporary name in the same folder, flushed to disk and renamed over the target: a rename within one file system
is atomic, so a crash at any moment leaves either the previous file or the new one, never a truncated one; a
failed write (a full disk) removes its temporary file and leaves the previous checkpoint and ``last_checkpoint``
as they were.

Loading refuses, with a ``CheckpointError`` naming the file, what is not a checkpoint: a truncated or corrupt
file, and a pickle that holds anything but tensors and plain data (``weights_only=True``: loading a checkpoint
never runs code from it). ``resume_candidates`` lists the checkpoints to try, newest first, so that ``--resume``
falls back to the previous good one. :class:`Checkpointer` saves and restores a training run's whole state
(model, optimizer, scheduler, scaler, iteration, every rank's random generators).
"""
from __future__ import annotations

import errno
import glob
import logging
import os
import pickle
import random
import re
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from . import distributed as du

logger = logging.getLogger("eyecool.engine")

LAST_CHECKPOINT = "last_checkpoint"
_PERIODIC = re.compile(r"model_(\d{7})\.pth$")


class CheckpointError(RuntimeError):
    """A file that cannot be used as a checkpoint (unreadable, not weights-only, or not fitting the model)."""


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        # Interrupted (exception, Ctrl-C): the target is untouched; do not leave the partial file behind.
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    # Make the rename itself durable (the directory entry), so a power loss cannot undo it.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: Dict[str, Any], out_dir: str, file_name: str) -> str:
    """Write ``state`` atomically to ``out_dir/file_name`` and point ``out_dir/last_checkpoint`` at it.

    Refuses (ValueError) to write model weights that are not finite: a checkpoint is what a run resumes from,
    and one with NaN weights would only resume the failure.
    """
    bad = [name for name, t in state.get("model", {}).items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"not writing checkpoint {file_name}: non-finite values in {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    path = os.path.join(out_dir, file_name)
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
        # The pointer is updated only after the checkpoint is complete on disk.
        _atomic_write(os.path.join(out_dir, LAST_CHECKPOINT), lambda f: f.write(file_name.encode()))
    except OSError as error:
        hint = " (disk full: free some space, then --resume)" if error.errno == errno.ENOSPC else ""
        raise OSError(error.errno, f"could not write checkpoint {path}: {error.strerror or error}{hint}; the "
                      f"previous checkpoint and {LAST_CHECKPOINT} are unchanged") from error
    return path


def last_checkpoint_path(out_dir: str) -> Optional[str]:
    """The checkpoint that ``out_dir/last_checkpoint`` names, or None when there is none."""
    pointer = os.path.join(out_dir, LAST_CHECKPOINT)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, "r", encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{pointer} names {name!r}, which does not exist in {out_dir}")
    return path


def resume_candidates(out_dir: str) -> List[str]:
    """The checkpoints of ``out_dir`` to resume from, best first: the one ``last_checkpoint`` names, then the
    periodic ones from the newest iteration down (the fallbacks when a newer one cannot be loaded)."""
    candidates = []
    pointer = os.path.join(out_dir, LAST_CHECKPOINT)
    if os.path.isfile(pointer):
        with open(pointer, "r", encoding="utf-8", errors="replace") as f:
            candidates.append(os.path.join(out_dir, f.read().strip()))
    periodic = [p for p in glob.glob(os.path.join(out_dir, "model_*.pth")) if _PERIODIC.search(p)]
    candidates += sorted(periodic, key=lambda p: int(_PERIODIC.search(p).group(1)), reverse=True)
    unique = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """The checkpoint dict at ``path``; a bare state dict (e.g. torchvision weights) comes back as
    ``{"model": state_dict}``.

    Raises ``CheckpointError`` naming the file when it is truncated or corrupt, or holds objects other than
    tensors and plain data (weights_only=True: nothing in the file is executed), and FileNotFoundError when it is
    missing.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data, and checkpoints "
            f"are loaded with weights_only=True so that no code in them runs. Only load such a file with "
            f"torch.load(weights_only=False) if you trust its origin. ({str(error).splitlines()[0]})") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt file?): "
                              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    if "model" not in state:
        state = {"model": state}
    return state


def load_model_weights(model: torch.nn.Module, path: str) -> Dict[str, Any]:
    """Load the weights of checkpoint ``path`` into ``model`` (strictly: every key must match); returns the
    checkpoint dict."""
    state = load_checkpoint(path)
    load_state_dict_checked(model, state["model"], path)
    return state


def load_state_dict_checked(module: Any, state_dict: Dict[str, Any], path: str) -> None:
    """``module.load_state_dict(state_dict)`` (strict); a mismatch (a checkpoint of another configuration) is a
    ``CheckpointError`` that names the file and the first differing keys and shapes."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = "; ".join(lines[1:6] if len(lines) > 1 else lines[:1])
        raise CheckpointError(f"{path} does not fit this {type(module).__name__} (a checkpoint of another "
                              f"configuration?): {detail}") from error


# ------------------------------------------------------------------------------------------------ RNG states
# Stored as tensors, ints and lists only, so that ``weights_only=True`` loads them.


def capture_rng_state() -> Dict[str, Any]:
    """This process's random generators (torch CPU and CUDA, numpy, Python) as a weights-only-loadable dict."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------- training state


class Checkpointer:
    """Saves and restores a training run's whole state: model, optimizer, scheduler, gradient scaler, the
    iteration and every rank's random generators (so that a resumed run draws what an uninterrupted one would).

    ``model`` is the unwrapped module (its state dict has no DDP ``module.`` prefix, so a checkpoint loads without
    DDP). ``config`` and ``extra_state`` are plain data stored in every checkpoint. ``out_dir`` None writes nothing.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, *,
                 rank: int, world_size: int, out_dir: Optional[str], config: Optional[Dict[str, Any]] = None,
                 extra_state: Optional[Dict[str, Any]] = None):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.rank, self.world_size, self.out_dir = rank, world_size, out_dir
        self.config = config or {}
        self.extra_state = extra_state or {}
        self.start_iter = 0  # the first iteration to run: the restored one + 1
        self.rng_to_restore: Optional[Dict[str, Any]] = None  # this rank's generators, set by resume()
        self.last_saved_iter: Optional[int] = None

    def resume(self, path: Optional[str] = None) -> bool:
        """Restore the state from ``path`` (default: the checkpoint ``out_dir/last_checkpoint`` names). Returns
        False when there is nothing to resume from.

        Without ``path``, a checkpoint that cannot be used (truncated, corrupt, not weights-only, from another
        configuration) is reported and the previous one is tried, newest first; CheckpointError when none works.
        """
        candidates = [path] if path else (resume_candidates(self.out_dir) if self.out_dir else [])
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
        if failures:
            raise CheckpointError("no checkpoint to resume from could be loaded:\n  " + "\n  ".join(failures))
        return False

    def _restore(self, path: str) -> None:
        # map_location="cpu": the RNG states must stay CPU tensors; load_state_dict moves the rest to the
        # parameters' device.
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
        if rng_states is not None and len(rng_states) == self.world_size:
            self.rng_to_restore = rng_states[self.rank]
        else:
            torch.manual_seed(hash((self.config.get("seed", 0), self.rank, self.start_iter)) % 2**63)
            logger.warning(f"{path} was written by {len(rng_states or [])} processes, this run has "
                           f"{self.world_size}: random draws will differ from an uninterrupted run")
        logger.info(f"resuming from {path} at iteration {self.start_iter}")

    def restore_rng(self) -> None:
        """Put back the generators that :meth:`resume` read, once: called when training starts, after the data
        stream is built, so that nothing done at start-up consumes the restored draws."""
        if self.rng_to_restore is not None:
            restore_rng_state(self.rng_to_restore)
            self.rng_to_restore = None

    def save(self, file_name: str, iteration: int) -> None:
        """Write a checkpoint of the state after ``iteration``. Every rank must call it: the RNG states are
        gathered from all of them (rank 0 stores every rank's, so a resumed N-process run replays all of them)."""
        rng_states = du.all_gather_object(capture_rng_state())
        self.last_saved_iter = iteration
        if self.rank != 0 or self.out_dir is None:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "iteration": iteration, "config": self.config,
                 "rng": rng_states, **self.extra_state}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        logger.info(f"saved {save_checkpoint(state, self.out_dir, file_name)}")
