"""Runs the op microbenchmarks: every ``benchmarks/bench_<name>.py`` module's ``cases(device)``.

    python benchmarks/run.py [--ops roi_align deform_conv2d] [--device cpu|cuda] [--json FILE]

Prints a markdown table (op, case, device, dtype, ours, peer, speedup = peer time / our time) and writes the
rows as JSON when asked. ``--ops`` selects modules by name (``bench_<name>.py``) or rows by op name.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import markdown_table  # noqa: E402


def available_modules():
    return sorted(f[len("bench_"):-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


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
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
