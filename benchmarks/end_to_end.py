"""The network end to end with eyecool's ops against the same network with torchvision's ops (``model.ops``).

    python benchmarks/end_to_end.py [--sizes 128 256] [--train-iters 10] [--infer-images 8] [--threads N]
                                    [--weights CKPT] [--json FILE]

Per image size: the demo configuration (``eyecool/configs/demo.yaml``: ResNet-18, DAM, RFF, deformable
semantic branch, batch ``solver.ims_per_batch``) with ``data.min_size = data.max_size = size``, on batches of the
synthetic data set (``eyecool.data.synthetic``, no flip, so both op sets see identical batches). Both networks
start from the same weights (a fresh initialisation, or ``--weights``) and the same random state, and take the
same optimiser steps (SGD with the configuration's warm-up); the first iteration's losses are printed for both
to show that they compute the same thing. The two networks take turns, one iteration (or image) each, so that
the load of a shared machine weighs on both alike. Training: iterations per second over ``--train-iters``
timed iterations after ``--warmup``; inference: seconds per image (batch 1, eval mode, panoptic output) over
``--infer-images`` val images. ``torchvision`` swaps in ``torchvision.ops.deform_conv2d``, per-level
``torchvision.ops.roi_align`` (MultiScaleRoIAlign's algorithm) and the unfused PyTorch RFF; the panoptic merge
and everything else are the same code in both. Ratio = torchvision time / eyecool time (above 1: eyecool is
faster). Prints a markdown table; ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

DEFAULT_CONFIG = "demo"  # a shipped configuration (eyecool/configs/demo.yaml)
OPS = ("eyecool", "torchvision")


def _batches(dataset, batch_size: int, count: int):
    from eyecool.data import collate_panoptic

    items = [dataset[i] for i in range(min(len(dataset), batch_size * count))]
    return [collate_panoptic(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def _build(cfg, ops: str, categories, state):
    """The network of ``cfg`` with the op set ``ops``, holding the weights ``state``."""
    from eyecool.engine.api import _build_model

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ops=ops))
    model = _build_model(cfg, categories, torch.device("cpu"))
    model.load_state_dict(state)
    return model


class TrainingRun:
    """One network with its optimiser and schedule, stepped one iteration at a time."""

    def __init__(self, model, cfg):
        from eyecool.engine.schedule import WarmupMultiStepLR, build_optimizer

        s = cfg.solver
        self.model, self.clip_grad = model.train(), s.clip_grad
        self.optimizer = build_optimizer(model, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        self.scheduler = WarmupMultiStepLR(self.optimizer, milestones=s.steps, gamma=s.gamma,
                                           warmup_iters=s.warmup_iters, warmup_factor=s.warmup_factor)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, batch) -> Dict[str, float]:
        """Forward, backward, gradient clipping, SGD step; returns the losses."""
        images, sizes, targets = batch
        losses = self.model(images, sizes, targets)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        return {k: round(v.item(), 5) for k, v in losses.items()}


def time_training(models: Dict[str, torch.nn.Module], cfg, batches, warmup: int, iters: int):
    """Per op set: the seconds of each timed training iteration and the first iteration's losses.

    The op sets take turns, one iteration each, so a change of load on a shared machine hits both alike; before
    each step the random state is reset to the iteration's seed, so both draw the same anchors, ROIs and kept
    instances.
    """
    runs = {ops: TrainingRun(model, cfg) for ops, model in models.items()}
    times = {ops: [] for ops in runs}
    first_losses = {}
    for i in range(warmup + iters):
        batch = batches[i % len(batches)]
        for ops, run in runs.items():
            torch.manual_seed(1000 + i)
            t0 = time.perf_counter()
            losses = run.step(batch)
            elapsed = time.perf_counter() - t0
            first_losses.setdefault(ops, losses)
            if i >= warmup:
                times[ops].append(elapsed)
    return times, first_losses


@torch.no_grad()
def time_inference(models: Dict[str, torch.nn.Module], images, warmup: int = 1):
    """Per op set: seconds per image (batch 1, taking turns as in training) and segments per prediction."""
    for model in models.values():
        model.eval()
    times = {ops: [] for ops in models}
    segments = {ops: [] for ops in models}
    for i, (batch, sizes, targets) in enumerate([images[0]] * warmup + images):
        for ops, model in models.items():
            t0 = time.perf_counter()
            outputs = model(batch, sizes, orig_sizes=[t["orig_size"] for t in targets])
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                times[ops].append(elapsed)
                segments[ops].append(len(outputs[0]["segments_info"]))
    return times, segments


def benchmark_size(size: int, args) -> List[Dict[str, object]]:
    from eyecool.config import load_config
    from eyecool.data import generate_synthetic_dataset
    from eyecool.engine.api import _build_model, build_dataset
    from eyecool.engine.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="eyecool_e2e_") as data_root:
        cfg = load_config(args.config, [f"data.root={data_root}", f"data.min_size={size}", f"data.max_size={size}",
                                        "data.num_workers=0"] + list(args.overrides))
        batch_size = cfg.solver.ims_per_batch
        generate_synthetic_dataset(data_root, batch_size * args.train_batches, args.infer_images, size=size, seed=0)
        train_batches = _batches(build_dataset(cfg, "train", is_train=False), batch_size, args.train_batches)
        val_images = _batches(build_dataset(cfg, "val"), 1, args.infer_images)
        categories = build_dataset(cfg, "val").meta.to_categories()
    torch.manual_seed(0)
    initial = _build_model(cfg, categories, torch.device("cpu")).state_dict()
    if args.weights:
        initial = load_checkpoint(args.weights, map_location="cpu")["model"]

    print(f"size {size}: training ...", file=sys.stderr, flush=True)
    train_times, first_losses = time_training({ops: _build(cfg, ops, categories, initial) for ops in OPS}, cfg,
                                              train_batches, args.warmup, args.train_iters)
    print(f"size {size}: inference ...", file=sys.stderr, flush=True)
    infer_times, segments = time_inference({ops: _build(cfg, ops, categories, initial) for ops in OPS}, val_images)
    rows = []
    for ops in OPS:
        train, infer = train_times[ops], infer_times[ops]
        rows.append({
            "size": size, "batch": batch_size, "ops": ops, "threads": torch.get_num_threads(),
            "train_iters": len(train),
            "train_it_per_s": round(len(train) / sum(train), 3),
            "train_s_per_iter_median": round(statistics.median(train), 4),
            "train_s_per_iter_min": round(min(train), 4),
            "first_iteration_losses": first_losses[ops],
            "infer_images": len(infer),
            "infer_s_per_image_median": round(statistics.median(infer), 4),
            "infer_s_per_image_min": round(min(infer), 4),
            "infer_s_per_image_mean": round(statistics.fmean(infer), 4),
            "segments_per_image": round(statistics.fmean(segments[ops]), 2),
        })
    ours, peer = rows
    ratio = {"size": size, "batch": batch_size, "ops": "ratio (torchvision / eyecool time)",
             "train_ratio": round(ours["train_it_per_s"] / peer["train_it_per_s"], 2),
             "infer_ratio": round(peer["infer_s_per_image_median"] / ours["infer_s_per_image_median"], 2)}
    return rows + [ratio]


def markdown_table(rows: List[Dict[str, object]]) -> str:
    lines = ["| image size | batch | train it/s eyecool | train it/s torchvision | train ratio | "
             "infer s/image eyecool (median / min) | infer s/image torchvision (median / min) | infer ratio |",
             "|" + "---|" * 8]
    by_size: Dict[int, Dict[str, Dict[str, object]]] = {}
    for r in rows:
        by_size.setdefault(r["size"], {})[r["ops"] if r["ops"] in OPS else "ratio"] = r
    for size, group in by_size.items():
        ours, peer, ratio = group["eyecool"], group["torchvision"], group["ratio"]
        lines.append(f"| {size}x{size} | {ours['batch']} | {ours['train_it_per_s']:.2f} | "
                     f"{peer['train_it_per_s']:.2f} | {ratio['train_ratio']:.2f}x | "
                     f"{ours['infer_s_per_image_median']:.3f} / {ours['infer_s_per_image_min']:.3f} | "
                     f"{peer['infer_s_per_image_median']:.3f} / {peer['infer_s_per_image_min']:.3f} | "
                     f"{ratio['infer_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="network and solver: a file or a shipped name (default: demo)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128], help="image sides (default: 128, the demo)")
    parser.add_argument("--train-iters", type=int, default=10, help="timed training iterations per op set")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training iterations first")
    parser.add_argument("--train-batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--infer-images", type=int, default=8, help="timed inference images per op set")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--weights", default=None, help="checkpoint to start from (default: a fresh initialisation)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for size in args.sizes:
        rows += benchmark_size(size, args)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"Machine: {machine}\n")
    print(markdown_table(rows))
    for r in rows:
        if r["ops"] in OPS:
            print(f"size {r['size']} {r['ops']}: first-iteration losses {r['first_iteration_losses']}, "
                  f"{r['segments_per_image']} segments per image")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "config": args.config, "weights": args.weights, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
