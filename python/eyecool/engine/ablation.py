"""The report's Table 1 on the synthetic data set (``eyecool ablate --out DIR``): the UPSNet baseline, +DAM,
+DAM +RFF (logit, the paper's formula) and +DAM +RFF (prob, probability gating), each trained with the same
schedule, data and seeds, and evaluated on the val split.

Everything else is the configuration (default: the shipped ``demo``); a row changes only ``model.dam.enabled``
and ``model.rff.mode``. Each run trains into ``DIR/runs/<row>_seed<N>`` with ``eyecool.train``; a run whose
``metrics_eval.json`` is already there is read back instead of retrained, so an interrupted ablation continues
where it stopped. After every run ``DIR/ablation.json`` (every run's PQ summary, final training losses and wall
time, and per row the mean and the sample standard deviation over seeds), ``DIR/ablation.md`` (the table) and
``DIR/ablation.png`` (the plot) are rewritten, so a partial ablation leaves a partial table.

    from eyecool.engine.ablation import run_ablation
    table = run_ablation("out/ablation", seeds=(0, 1, 2), max_iter=400)
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from eyecool.evaluation.panoptic_quality import PQ_KEYS

from .events import LOGGER_NAME, setup_logging

logger = logging.getLogger(LOGGER_NAME + ".ablation")

DEFAULT_CONFIG = "demo"  # shipped in eyecool/configs
# Table 1's rows: (key, label, the overrides that make the row).
ROWS = (
    ("baseline", "UPSNet baseline", ["model.dam.enabled=false", "model.rff.mode=off"]),
    ("dam", "+DAM", ["model.dam.enabled=true", "model.rff.mode=off"]),
    ("dam_rff_logit", "+DAM +RFF (logit)", ["model.dam.enabled=true", "model.rff.mode=logit"]),
    ("dam_rff_prob", "+DAM +RFF (prob)", ["model.dam.enabled=true", "model.rff.mode=prob"]),
)
ROW_KEYS = tuple(key for key, _, _ in ROWS)
METRICS = PQ_KEYS  # the evaluation summary's nine keys


def final_losses(run_dir: str) -> Dict[str, float]:
    """The losses of the last training row of ``run_dir/metrics.json`` (medians over its log period)."""
    from .events import read_metrics

    path = os.path.join(run_dir, "metrics.json")
    rows = [r for r in read_metrics(path) if "total_loss" in r] if os.path.isfile(path) else []
    return {k: round(v, 4) for k, v in rows[-1].items() if k.startswith("loss_") or k == "total_loss"} if rows else {}


def schedule_overrides(max_iter: int, warmup_iters: Optional[int] = None) -> List[str]:
    """``max_iter`` iterations with the demo's shape of schedule: lr x0.1 at 75% and 92.5% of the run, warm-up
    over min(50, max_iter / 8) iterations unless given."""
    steps = sorted({max(1, round(0.75 * max_iter)), max(1, round(0.925 * max_iter))})
    warmup = min(50, max(1, max_iter // 8)) if warmup_iters is None else warmup_iters
    return [f"solver.max_iter={max_iter}", f"solver.steps={steps}", f"solver.warmup_iters={warmup}",
            f"output.checkpoint_period={max_iter}"]


def summarize_runs(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per row (in :data:`ROWS` order): ``seeds``, and for every metric its ``mean`` and ``std`` (sample
    standard deviation over seeds; 0 for one seed)."""
    rows = []
    for key, label, _ in ROWS:
        mine = [r for r in runs if r["row"] == key]
        if not mine:
            continue
        entry: Dict[str, Any] = {"row": key, "label": label, "seeds": [r["seed"] for r in mine]}
        for metric in METRICS:
            values = [r["metrics"][metric] for r in mine]
            entry[metric] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        rows.append(entry)
    return rows


def markdown_table(summary: Sequence[Dict[str, Any]]) -> str:
    """The All / Things / Stuff table, ``mean ± std`` over the seeds of each row."""
    header = ("| row | seeds | PQ | SQ | RQ | PQ_th | SQ_th | RQ_th | PQ_st | SQ_st | RQ_st |\n"
              "|---|---|" + "---|" * len(METRICS))
    lines = [header]
    for entry in summary:
        cells = [f"{entry[m]['mean']:.1f} ± {entry[m]['std']:.1f}" for m in METRICS]
        lines.append(f"| {entry['label']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary: Sequence[Dict[str, Any]], runs: Sequence[Dict[str, Any]], path: str,
                 title: str = "") -> None:
    """PQ, PQ_th and PQ_st per row: bars at the mean, error bars of one standard deviation, each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("PQ", "PQ_th", "PQ_st")
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(7.0, 2.2 * len(summary) + 2), 4.5))
    for j, (metric, color) in enumerate(zip(metrics, ("#495057", "#1c7ed6", "#f59f00"))):
        xs = [i + (j - 1) * width for i in range(len(summary))]
        ax.bar(xs, [e[metric]["mean"] for e in summary], width, yerr=[e[metric]["std"] for e in summary],
               capsize=3, color=color, alpha=0.8, label=metric)
        for x, entry in zip(xs, summary):
            values = [r["metrics"][metric] for r in runs if r["row"] == entry["row"]]
            ax.plot([x] * len(values), values, "k.", markersize=4)
    ax.set_xticks(range(len(summary)), [e["label"] for e in summary])
    ax.set_ylabel("x100 on the synthetic val split")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_outputs(out_dir: str, runs: List[Dict[str, Any]], settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    summary = summarize_runs(runs)
    with open(os.path.join(out_dir, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "summary": summary, "runs": runs}, f, indent=1)
    seeds = settings["seeds"]
    text = (f"Table 1 on the synthetic data set: {settings['schedule']}, seeds {seeds}, mean ± sample std over "
            f"seeds.\n\n{markdown_table(summary)}\n")
    with open(os.path.join(out_dir, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot_summary(summary, runs, os.path.join(out_dir, "ablation.png"), f"{settings['schedule']}\nseeds {seeds}")
    return summary


def run_ablation(out_dir: str, config: Optional[str] = None, overrides: Sequence[str] = (),
                 rows: Sequence[str] = ROW_KEYS, seeds: Sequence[int] = (0, 1, 2), max_iter: Optional[int] = None,
                 num_train: int = 400, num_val: int = 50, image_size: int = 128) -> List[Dict[str, Any]]:
    """Train and evaluate every row of ``rows`` (keys of :data:`ROWS`) once per seed; returns the summary
    (see :func:`summarize_runs`) and writes ``ablation.{json,md,png}`` in ``out_dir``.

    ``config``: the base configuration (default: the shipped ``demo``), ``overrides`` applied to every run;
    ``max_iter``: a shorter (or longer) schedule of the same shape (:func:`schedule_overrides`); the synthetic
    data set (``num_train`` / ``num_val`` images of ``image_size`` pixels, data seed 0) is written once to
    ``out_dir/data`` and shared by every run. ``seed`` is the run's seed: model initialisation and the order
    and augmentation of the training data, identical across rows.
    """
    from eyecool.config import load_config
    from eyecool.data import generate_synthetic_dataset
    from eyecool.engine.api import train

    unknown = [r for r in rows if r not in ROW_KEYS]
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; known: {list(ROW_KEYS)}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    config = str(config or DEFAULT_CONFIG)
    os.makedirs(out_dir, exist_ok=True)
    setup_logging(out_dir)
    data_root = os.path.join(out_dir, "data")
    if not os.path.isfile(os.path.join(data_root, "annotations", "panoptic_val.json")):
        generate_synthetic_dataset(data_root, num_train, num_val, size=image_size, seed=0)
    common = [f"data.root={data_root}"] + (schedule_overrides(max_iter) if max_iter else []) + list(overrides)
    base = load_config(config, common)
    settings = {
        "config": config, "overrides": common, "seeds": list(seeds), "rows": list(rows),
        "data": {"num_train": num_train, "num_val": num_val, "image_size": image_size},
        "schedule": f"{base.solver.max_iter} iterations x {base.solver.ims_per_batch} images "
                    f"({os.path.basename(config)}, {num_train} train / {num_val} val images of {image_size} px)",
    }
    runs: List[Dict[str, Any]] = []
    definitions = {key: (label, row_overrides) for key, label, row_overrides in ROWS}
    summary: List[Dict[str, Any]] = []
    # Seeds outermost: a stopped ablation has every row at its first seeds rather than some rows missing.
    for seed in seeds:
        for key in [k for k in ROW_KEYS if k in rows]:
            label, row_overrides = definitions[key]
            run_dir = os.path.join(out_dir, "runs", f"{key}_seed{seed}")
            metrics_file = os.path.join(run_dir, "metrics_eval.json")
            time_file = os.path.join(run_dir, "train_seconds.txt")
            read_back = os.path.isfile(metrics_file)
            if read_back:
                with open(metrics_file, encoding="utf-8") as f:
                    metrics = json.load(f)
                seconds = float(Path(time_file).read_text()) if os.path.isfile(time_file) else None
            else:
                start = time.perf_counter()
                cfg = load_config(config, common + row_overrides + [f"seed={seed}"])
                metrics = train(cfg, run_dir)
                seconds = round(time.perf_counter() - start, 1)
                Path(time_file).write_text(f"{seconds}\n")
                setup_logging(out_dir)  # train() pointed the log at the run's folder
            runs.append({"row": key, "label": label, "seed": seed, "dir": run_dir, "seconds": seconds,
                         "read_back": read_back, "metrics": {m: float(metrics[m]) for m in METRICS},
                         "final_losses": final_losses(run_dir)})
            logger.info(f"ablation {label}, seed {seed}: PQ {metrics['PQ']:.1f} (things {metrics['PQ_th']:.1f}, "
                        f"stuff {metrics['PQ_st']:.1f})" + (" (read back)" if read_back else f" in {seconds:.0f} s"))
            summary = _write_outputs(out_dir, runs, settings)
    return summary


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablate", help="the report's Table 1 (baseline, +DAM, +RFF logit / prob) on the synthetic data set",
        description="Train and evaluate UPSNet baseline, +DAM, +DAM +RFF (logit) and +DAM +RFF (prob) with the "
                    "same schedule, data and seeds; writes OUT/ablation.md, OUT/ablation.json and "
                    "OUT/ablation.png (PQ, SQ, RQ for All / Things / Stuff, mean and spread over seeds). "
                    "Finished runs under OUT/runs are read back, so a rerun continues an interrupted ablation.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=None, help="base configuration: a file or a shipped name (default: demo)")
    parser.add_argument("--rows", nargs="+", default=list(ROW_KEYS), choices=ROW_KEYS, help="rows to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="iterations per run; the lr steps and warm-up are scaled to it (default: the config's)")
    parser.add_argument("--num-train", type=int, default=400, help="synthetic training images")
    parser.add_argument("--num-val", type=int, default=50, help="synthetic validation images")
    parser.add_argument("--image-size", type=int, default=128, help="synthetic image side (pixels)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides for every run")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = run_ablation(args.out, config=args.config, overrides=args.overrides, rows=args.rows, seeds=args.seeds,
                           max_iter=args.max_iter, num_train=args.num_train, num_val=args.num_val,
                           image_size=args.image_size)
    print(markdown_table(summary))
    return 0
