"""Timing helpers shared by every benchmark: one way to time a callable, one shape for a result row."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: str = "cpu", warmup: int = 2, repeat: int = 7,
            max_seconds: float = 20.0) -> Dict[str, float]:
    """Runs ``fn`` ``warmup`` times, then up to ``repeat`` timed times (stopping early after ``max_seconds``).

    Returns ``{"median_ms", "min_ms", "runs"}``. CUDA work is synchronised around every run.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    for _ in range(repeat):
        times.append(_time_once(fn, device))
        if time.perf_counter() - start_all > max_seconds:
            break
    return _stats(times)


def _time_once(fn: Callable[[], object], device: str) -> float:
    """One run of ``fn`` in milliseconds, device work included."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _stats(times: List[float]) -> Dict[str, float]:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": len(times)}


def measure_paired(ours: Callable[[], object], peer: Callable[[], object], device: str = "cpu", warmup: int = 3,
                   repeat: int = 15, max_seconds: float = 40.0,
                   before: Optional[Callable[[], object]] = None) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Times two callables in alternation (ours, peer, ours, peer, ...) after ``warmup`` runs of each; returns
    ``(ours_stats, peer_stats)`` like ``measure``. ``before``, if given, runs untimed before every run of either
    (e.g. dropping the previous run's gradients, so that neither side is timed freeing the other's memory).

    For a short op on a small machine, the state of the moment (a descheduled thread, the allocator's heap, the
    caches another process flushed) moves a median by tens of percent; alternating exposes both sides to the
    same moments, so their ratio is steadier than from two blocks of runs one after the other.
    """
    def run(fn):
        if before is not None:
            before()
        return _time_once(fn, device)

    for _ in range(warmup):
        run(ours)
        run(peer)
    times: Tuple[List[float], List[float]] = ([], [])
    start_all = time.perf_counter()
    for _ in range(repeat):
        times[0].append(run(ours))
        times[1].append(run(peer))
        if time.perf_counter() - start_all > max_seconds:
            break
    return _stats(times[0]), _stats(times[1])


def row(op: str, case: str, device: str, dtype: str, ours: Dict[str, float], peer: str,
        peer_time: Optional[Dict[str, float]], **extra) -> Dict[str, object]:
    """One result row; ``speedup`` = peer median / our median (above 1: we are faster)."""
    out = {
        "op": op,
        "case": case,
        "device": device,
        "dtype": dtype,
        "ours_ms": round(ours["median_ms"], 3),
        "ours_min_ms": round(ours["min_ms"], 3),
        "peer": peer,
        "peer_ms": round(peer_time["median_ms"], 3) if peer_time else None,
        "peer_min_ms": round(peer_time["min_ms"], 3) if peer_time else None,
        "speedup": round(peer_time["median_ms"] / ours["median_ms"], 2) if peer_time else None,
    }
    out.update(extra)
    return out


def markdown_table(rows: List[Dict[str, object]]) -> str:
    header = "| op | case | device | dtype | ours ms (median / min) | peer | peer ms (median / min) | speedup |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        peer_ms = f"{r['peer_ms']:.2f} / {r['peer_min_ms']:.2f}" if r.get("peer_ms") is not None else "-"
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-"
        lines.append(f"| {r['op']} | {r['case']} | {r['device']} | {r['dtype']} | "
                     f"{r['ours_ms']:.2f} / {r['ours_min_ms']:.2f} | {r['peer']} | {peer_ms} | {speedup} |")
    return "\n".join(lines)
