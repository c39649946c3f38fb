"""Runs the op microbenchmarks: every ``benchmarks/bench_<name>.py`` module's ``cases(device)``.

    python benchmarks/run.py [--ops roi_align deform_conv2d] [--device cpu|cuda] [--json FILE]

Prints a markdown table (op, case, device, dtype, ours, peer, speedup = peer time / our time); with --json
also writes the rows as JSON and a bar chart of the speedups beside it (FILE with .png). ``--ops`` selects modules by name (``bench_<name>.py``) or rows by op name.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import textwrap

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import markdown_table  # noqa: E402


def available_modules():
    return sorted(f[len("bench_"):-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import eyecool_ext
    from eyecool_ext.collect_env import cpu_model

    # The CPU kernels' ISA variant (EYECOOL_CPU_ISA caps it), since their times depend on it.
    return (f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, CPU kernels "
            f"{eyecool_ext.cpu_isa()}, torch {torch.__version__}")


def plot_speedups(rows, path: str, title: str) -> None:
    """Horizontal bar chart of the speedups (peer time / our time), with the break-even line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in rows if r.get("speedup")]
    if not rows:
        return
    # Long case and peer names wrap, so the bars keep most of the width.
    labels = [textwrap.fill(f"{r['op']}: {r['case']} vs {r['peer']}", 60) for r in rows]
    values = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(rows) + 1.5))
    bars = ax.barh(range(len(rows)), values, color=["#2b8a3e" if v >= 1 else "#c92a2a" for v in values])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(0.5, min(values) / 1.5), max(values) * 2.5)  # room for the value labels
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("speedup (peer time / eyecool time, log scale)")
    ax.set_title(textwrap.fill(title, 90), fontsize=10)
    for bar, v in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f}x", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="*", default=None, help=f"subset of {available_modules()} (or op names)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to torch")

    rows = []
    for name in available_modules():
        module = importlib.import_module(f"bench_{name}")
        if args.ops and name not in args.ops and not any(op.startswith(name) for op in args.ops):
            continue
        print(f"running bench_{name} on {args.device} ...", file=sys.stderr, flush=True)
        module_rows = module.cases(args.device)
        if args.ops and name not in args.ops:
            module_rows = [r for r in module_rows if r["op"] in args.ops]
        rows += module_rows

    print(f"Machine: {machine_description(args.device)}\n")
    print(markdown_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(args.device), "rows": rows}, f, indent=1)
        chart = os.path.splitext(args.json)[0] + ".png"
        plot_speedups(rows, chart, f"eyecool ops vs peers on {machine_description(args.device)}")
        print(f"\nwrote {args.json} and {chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
