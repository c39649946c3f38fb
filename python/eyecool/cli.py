"""The ``eyecool`` command. Every subcommand is a thin wrapper over a Python API function and lives beside it:
the module named in COMMANDS defines ``add_parser(subparsers)``, which registers its parser and sets
``func(args) -> int`` as the parser default."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# subcommand -> module that defines it (imported only when the command line is built).
COMMANDS = {
    "synth": "eyecool.data.synthetic",
    "validate-data": "eyecool.data.validate",
    "train": "eyecool.engine.cli",
    "eval": "eyecool.engine.cli",
    "predict": "eyecool.engine.cli",
    "demo": "eyecool.engine.cli",
    "ablate": "eyecool.engine.ablation",
    "pq": "eyecool.evaluation.cli",
    "export": "eyecool.engine.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eyecool", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
