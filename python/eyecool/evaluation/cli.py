"""``eyecool pq``: panoptic quality of a folder of prediction PNGs against the gt (panopticapi's rules).

    eyecool pq --gt-json panoptic_val2017.json --gt-dir panoptic_val2017 \\
               --pred-json predictions.json --pred-dir predictions [--per-class] [--json pq.json]
"""
from __future__ import annotations

import argparse
import json

from eyecool.evaluation.panoptic_quality import (format_per_class_table, format_table, pq_compute,
                                                 write_summary_json)


def run(args: argparse.Namespace) -> int:
    results = pq_compute(args.gt_json, args.pred_json, args.gt_dir, args.pred_dir, num_workers=args.workers,
                         verbose=False, strict=args.strict)
    print(format_table(results))
    if args.per_class:
        with open(args.gt_json, "r") as f:
            categories = json.load(f)["categories"]
        print()
        print(format_per_class_table(results, categories))
    if args.json:
        write_summary_json(results, args.json, per_class=args.per_class)
        print(f"wrote {args.json}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("pq", help="panoptic quality (PQ, SQ, RQ) of prediction PNGs",
                                   description="Panoptic quality of a folder of prediction PNGs against the gt, "
                                               "with panopticapi's rules and numbers.")
    parser.add_argument("--gt-json", required=True, help="gt COCO panoptic JSON")
    parser.add_argument("--gt-dir", default=None, help="gt PNG folder (default: --gt-json without .json)")
    parser.add_argument("--pred-json", required=True, help="prediction COCO panoptic JSON")
    parser.add_argument("--pred-dir", default=None, help="prediction PNG folder (default: --pred-json without .json)")
    parser.add_argument("--per-class", action="store_true", help="also print (and write) per-category figures")
    parser.add_argument("--json", default=None, help="write PQ, SQ, RQ, PQ_th, ... RQ_st (x100) to this file")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: number of CPUs)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse inconsistent gt (a gt PNG and its segments_info disagree, an unknown gt "
                             "category) instead of scoring it as panopticapi does, with a warning")
    parser.set_defaults(func=run)
