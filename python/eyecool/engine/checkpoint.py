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
falls back to the previous good one.
"""
from __future__ import annotations

import errno
import glob
import os
import pickle
import random
import re
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

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
