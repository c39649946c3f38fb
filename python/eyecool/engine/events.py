"""Training logs: a console line in detectron2's format every ``log_period`` iterations and the same figures as
one JSON object per line in ``DIR/metrics.json`` (rank 0 only), optionally the same scalars as TensorBoard
events in ``DIR/tensorboard/`` (``output.tensorboard=true``), plus the progress bar shown during evaluation.

Console::

    [11/25 04:10:02 eyecool.engine]:  eta: 0:03:12  iter: 199  total_loss: 1.482  loss_sem: 0.31  ...
        time: 0.4120  data_time: 0.0021  lr: 0.01  max_mem: 812M

Losses and timings are medians over the last ``log_period`` iterations (robust to a slow first step or one
odd batch); ``lr`` is the current value; ``max_mem`` the peak CUDA memory allocated, or the peak resident
memory of the process on the CPU, in MiB.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import resource
import statistics
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch

LOGGER_NAME = "eyecool"
METRICS_FILE = "metrics.json"
TENSORBOARD_DIR = "tensorboard"


class _CurrentStdoutHandler(logging.StreamHandler):
    """A console handler that writes to ``sys.stdout`` as it is when a record is emitted, not as it was when the
    handler was made: under pytest's capture or ``contextlib.redirect_stdout`` the stream of the moment of
    set-up is closed or gone later, and every later record would fail with "I/O operation on closed file"."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stdout


def setup_logging(out_dir: Optional[str] = None, rank: int = 0) -> logging.Logger:
    """The ``eyecool`` logger: INFO to stdout (and ``out_dir/log.txt``) on rank 0, warnings only elsewhere, so
    N processes do not print N copies of every line."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    console = _CurrentStdoutHandler()
    console.setFormatter(formatter)
    logger.addHandler(console)
    if out_dir is not None and rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(out_dir, "log.txt"))
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger


def max_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_metrics(path: str) -> List[Dict[str, float]]:
    """The JSON lines of a ``metrics.json``."""
    with open(path, "r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Collects each iteration's scalars and writes them every ``log_period`` iterations (and at the last one).

    Only the main process writes; the others still call :meth:`put` so that the code path is the same. With
    ``tensorboard=True`` every row (training figures and evaluation results) also goes to TensorBoard event
    files in ``out_dir/tensorboard``, with the iteration as the step.
    """

    def __init__(self, out_dir: Optional[str], max_iter: int, log_period: int, device: torch.device,
                 enabled: bool = True, start_iter: int = 0, tensorboard: bool = False):
        self.max_iter = max_iter
        self.log_period = max(1, log_period)
        self.device = device
        self.enabled = enabled
        self.logger = logging.getLogger(LOGGER_NAME + ".engine")
        self.history: Dict[str, List[float]] = defaultdict(list)
        self.path = os.path.join(out_dir, METRICS_FILE) if out_dir is not None else None
        self.tensorboard = None
        if self.enabled and self.path is not None:
            os.makedirs(out_dir, exist_ok=True)
            self._drop_lines_from(start_iter)
            if tensorboard:
                self.tensorboard = _summary_writer(os.path.join(out_dir, TENSORBOARD_DIR), purge_step=start_iter)

    def _drop_lines_from(self, start_iter: int) -> None:
        """On resume, drop the lines of iterations at or after the checkpoint (logged by the interrupted run
        after its last checkpoint; the resumed run logs them again)."""
        if not os.path.isfile(self.path):
            return
        kept = [row for row in read_metrics(self.path) if row.get("iteration", -1) < start_iter]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)

    def put(self, **scalars: float) -> None:
        for name, value in scalars.items():
            self.history[name].append(float(value))

    def _window(self, name: str) -> float:
        return statistics.median(self.history[name][-self.log_period:])

    def write(self, iteration: int, lr: float) -> None:
        """Log iteration ``iteration`` (0-based) if it is due."""
        last = iteration == self.max_iter - 1
        if not self.enabled or ((iteration + 1) % self.log_period != 0 and not last):
            return
        iter_time = self._window("time") if self.history["time"] else 0.0
        eta_seconds = iter_time * (self.max_iter - iteration - 1)
        losses = {name: self._window(name) for name in self.history if name.startswith("loss") or name == "total_loss"}
        row: Dict[str, float] = {"iteration": iteration, **losses, "lr": lr, "max_mem": max_memory_mib(self.device)}
        for name in ("time", "data_time"):
            if self.history[name]:
                row[name] = self._window(name)
        row["eta_seconds"] = eta_seconds
        loss_text = "  ".join(f"{name}: {value:.4g}" for name, value in losses.items())
        self.logger.info(
            f" eta: {datetime.timedelta(seconds=int(eta_seconds))}  iter: {iteration}  {loss_text}  "
            f"time: {row.get('time', 0.0):.4f}  data_time: {row.get('data_time', 0.0):.4f}  lr: {lr:.5g}  "
            f"max_mem: {row['max_mem']:.0f}M"
        )
        self.append_row(row)

    def append_row(self, row: Dict[str, float]) -> None:
        """One JSON line (training figures, or evaluation results with their ``iteration``)."""
        if self.enabled and self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            step = int(row.get("iteration", 0))
            for name, value in row.items():
                if name != "iteration" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(name, value, global_step=step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _summary_writer(log_dir: str, purge_step: int):
    """A TensorBoard ``SummaryWriter``; ``purge_step`` drops events at or after the resumed iteration, like
    ``metrics.json``'s lines."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("output.tensorboard=true needs the tensorboard package: pip install tensorboard") from error
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step or None)


class ProgressBar:
    """``[#####.....] 12/50  0.31 s/it  eta 0:00:12`` on one terminal line; silent when stdout is not a
    terminal (logs, CI) or on ranks other than 0."""

    def __init__(self, total: int, label: str = "eval", enabled: Optional[bool] = None, width: int = 30):
        self.total = max(0, total)
        self.label = label
        self.width = width
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self.count = 0
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled or self.total == 0:
            return
        done = min(self.count, self.total)
        filled = int(self.width * done / self.total)
        elapsed = time.perf_counter() - self.start
        per_item = elapsed / max(1, done)
        eta = datetime.timedelta(seconds=int(per_item * (self.total - done)))
        sys.stdout.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}  "
                         f"{per_item:.2f} s/it  eta {eta}")
        sys.stdout.flush()

    def close(self) -> None:
        if self.enabled and self.total:
            sys.stdout.write("\n")
            sys.stdout.flush()
