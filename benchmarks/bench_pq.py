"""Panoptic quality: eyecool's pq_compute against panopticapi's and hotcoco's (Rust) on 300 COCO-sized pairs.

    python benchmarks/bench_pq.py [--images 300] [--repeat 3] [--inflater zlib]

generates 300 gt / prediction PNG pairs of 640x480 (Voronoi segments of 16 categories, things and stuff,
crowd regions and void; predictions with moved boundaries, wrong categories and extra segments) into a
temporary folder, checks that the three implementations agree, and prints their times and ratios, and the
inflater the PNG reader uses (libdeflate, found by the dynamic loader, else zlib; ``--inflater zlib`` times the
zlib path on a machine that has libdeflate).
``cases(device)`` gives the same figures as rows for benchmarks/run.py, plus the pair-counting op against
panopticapi's inner loop (``np.unique`` of the encoded pairs).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import PIL.Image as Image
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
from timing import markdown_table, measure, row  # noqa: E402

from eyecool.evaluation import pq_compute  # noqa: E402
from eyecool_ext import ops  # noqa: E402

CATEGORIES = ([{"id": 1 + i, "name": f"thing{i}", "isthing": 1, "color": [0, 0, 0]} for i in range(10)]
              + [{"id": 101 + i, "name": f"stuff{i}", "isthing": 0, "color": [0, 0, 0]} for i in range(6)])


def _voronoi(seeds_y, seeds_x, height, width):
    """Index of the nearest seed per pixel, computed at half resolution and upsampled (blocky edges)."""
    yy = np.arange(0, height, 2, dtype=np.float32)[:, None, None]
    xx = np.arange(0, width, 2, dtype=np.float32)[None, :, None]
    dist = (yy - seeds_y.astype(np.float32)) ** 2 + (xx - seeds_x.astype(np.float32)) ** 2
    return dist.argmin(-1).repeat(2, 0).repeat(2, 1)[:height, :width]


def _to_rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _segments(id_map, categories, crowd):
    """segments_info of an id map; ``categories``/``crowd`` map segment id -> value."""
    ids, areas = np.unique(id_map, return_counts=True)
    out = []
    for seg_id, area in zip(ids.tolist(), areas.tolist()):
        if seg_id == 0:
            continue
        out.append({"id": seg_id, "category_id": categories[seg_id], "iscrowd": int(crowd.get(seg_id, 0)),
                    "area": area, "bbox": [0, 0, 0, 0]})
    return out


def write_dataset(folder, num_images=300, height=480, width=640, seed=0):
    """Writes gt.json, gt/, pred.json, pred/ under ``folder``; returns the four paths."""
    rng = np.random.default_rng(seed)
    paths = {k: os.path.join(folder, k) for k in ("gt", "pred")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    cat_ids = [c["id"] for c in CATEGORIES]
    gt_anns, pred_anns, images = [], [], []
    for image_id in range(num_images):
        n = int(rng.integers(8, 30))
        sy, sx = rng.uniform(0, height, n), rng.uniform(0, width, n)
        gt_cells = _voronoi(sy, sx, height, width)
        gt_seg_ids = rng.choice(np.arange(1, 2**24), size=n, replace=False)
        gt_seg_ids[rng.random(n) < 0.08] = 0  # void cells
        gt_ids = gt_seg_ids[gt_cells]
        gt_ids[:, :3] = 0  # a void border strip, as annotators leave
        cell_cat = rng.choice(cat_ids, size=n)
        gt_cat = {int(i): int(c) for i, c in zip(gt_seg_ids, cell_cat)}
        gt_crowd = {int(i): int(c < 100 and rng.random() < 0.1) for i, c in zip(gt_seg_ids, cell_cat)}

        m = n + int(rng.integers(0, 4))
        py = np.concatenate([sy + rng.normal(0, 12, n), rng.uniform(0, height, m - n)])
        px = np.concatenate([sx + rng.normal(0, 12, n), rng.uniform(0, width, m - n)])
        pred_cells = _voronoi(py, px, height, width)
        pred_seg_ids = rng.choice(np.arange(1, 2**24), size=m, replace=False)
        pred_seg_ids[rng.random(m) < 0.05] = 0
        pred_ids = pred_seg_ids[pred_cells]
        pred_cat_of_cell = np.concatenate([cell_cat, rng.choice(cat_ids, size=m - n)])
        flip = rng.random(m) < 0.12
        pred_cat_of_cell[flip] = rng.choice(cat_ids, size=int(flip.sum()))
        pred_cat = {int(i): int(c) for i, c in zip(pred_seg_ids, pred_cat_of_cell)}

        name = f"{image_id:012d}.png"
        Image.fromarray(_to_rgb(gt_ids)).save(os.path.join(paths["gt"], name))
        Image.fromarray(_to_rgb(pred_ids)).save(os.path.join(paths["pred"], name))
        images.append({"id": image_id, "file_name": name.replace(".png", ".jpg"), "height": height, "width": width})
        gt_anns.append({"image_id": image_id, "file_name": name, "segments_info": _segments(gt_ids, gt_cat, gt_crowd)})
        pred_anns.append({"image_id": image_id, "file_name": name,
                          "segments_info": _segments(pred_ids, pred_cat, {})})
    gt_json = os.path.join(folder, "gt.json")
    pred_json = os.path.join(folder, "pred.json")
    with open(gt_json, "w") as f:
        json.dump({"images": images, "annotations": gt_anns, "categories": CATEGORIES}, f)
    with open(pred_json, "w") as f:
        json.dump({"images": images, "annotations": pred_anns, "categories": CATEGORIES}, f)
    return gt_json, pred_json, paths["gt"], paths["pred"]


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def peers():
    """{name: pq_compute} of the peer implementations that are installed."""
    out = {}
    try:
        from panopticapi.evaluation import pq_compute as panopticapi_pq_compute
        out["panopticapi"] = panopticapi_pq_compute
    except ImportError:
        pass
    try:
        from hotcoco.panoptic import pq_compute as hotcoco_pq_compute
        out["hotcoco"] = hotcoco_pq_compute
    except ImportError:
        pass
    return out


def _max_difference(a, b):
    keys = [(k, m) for k in ("All", "Things", "Stuff") for m in ("pq", "sq", "rq")]
    return max(abs(float(a[k][m]) - float(b[k][m])) for k, m in keys)


def time_pq_compute(dataset, repeat=3):
    """{name: {"median_ms", "min_ms", "runs", "max_diff"}} for eyecool and each installed peer."""
    ours = lambda: pq_compute(*dataset, verbose=False)  # noqa: E731
    reference = ours()
    timings = {"eyecool": measure(ours, "cpu", warmup=1, repeat=repeat, max_seconds=60)}
    timings["eyecool"]["max_diff"] = 0.0
    for name, fn in peers().items():
        result = _quiet(fn, *dataset)
        timings[name] = measure(lambda: _quiet(fn, *dataset), "cpu", warmup=0, repeat=repeat, max_seconds=60)
        timings[name]["max_diff"] = _max_difference(result, reference)
    return timings


def op_rows(device: str):
    """The op on one COCO-sized image pair, against panopticapi's inner loop (np.unique of the encoded pairs)."""
    rows = []
    # The op on one COCO-sized image pair, against panopticapi's inner loop (np.unique of gt * 2^24 + pred).
    rng = np.random.default_rng(0)
    cells = _voronoi(rng.uniform(0, 480, 25), rng.uniform(0, 640, 25), 480, 640)
    cells_pred = _voronoi(rng.uniform(0, 480, 28), rng.uniform(0, 640, 28), 480, 640)
    gt = torch.from_numpy(rng.integers(1, 2**24, 25)[cells].astype(np.int32)).to(device)
    pred = torch.from_numpy(rng.integers(1, 2**24, 28)[cells_pred].astype(np.int32)).to(device)
    ours = measure(lambda: ops.pq_pair_counts(gt, pred), device)
    if device == "cpu":
        g64, p64 = gt.numpy().astype(np.uint64), pred.numpy().astype(np.uint64)
        peer = measure(lambda: np.unique(g64 * np.uint64(2**24) + p64, return_counts=True), device)
        rows.append(row("pq_pair_counts", "640x480 pair", device, "int32", ours, "np.unique (panopticapi)", peer))
    else:
        key = lambda: torch.unique(gt.long() * 2**24 + pred.long(), return_counts=True)  # noqa: E731
        rows.append(row("pq_pair_counts", "640x480 pair", device, "int32", ours, "torch.unique", measure(key, device)))
        batch_gt, batch_pred = gt.expand(16, -1, -1).contiguous(), pred.expand(16, -1, -1).contiguous()
        rows.append(row("pq_pair_counts", "16 x 640x480 batched", device, "int32",
                        measure(lambda: ops.batched_pq_pair_counts(batch_gt, batch_pred), device), "-", None))
    return rows


def cases(device: str = "cpu"):
    rows = op_rows(device)
    if device != "cpu":
        return rows  # pq_compute reads PNGs on the CPU: timed on the CPU run only
    with tempfile.TemporaryDirectory() as folder:
        dataset = write_dataset(folder, 300)
        timings = time_pq_compute(dataset, repeat=3)
    compared = 0
    for name in ("panopticapi", "hotcoco"):
        if name in timings:
            compared += 1
            rows.append(row("pq_compute", "300 images 640x480", "cpu", "-", timings["eyecool"], name, timings[name],
                            max_abs_difference=timings[name]["max_diff"]))
    if not compared:
        rows.append(row("pq_compute", "300 images 640x480", "cpu", "-", timings["eyecool"], "-", None))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", default=None, help="write the data set here (and reuse it) instead of a temp dir")
    parser.add_argument("--inflater", choices=("default", "zlib"), default="default",
                        help="zlib: the PNG reader skips libdeflate (EYECOOL_PNG_INFLATER=zlib)")
    args = parser.parse_args(argv)
    if args.inflater == "zlib":
        os.environ["EYECOOL_PNG_INFLATER"] = "zlib"  # read when the reader loads its inflater, at its first file
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        start = time.perf_counter()
        if args.keep and os.path.isfile(os.path.join(folder, "pred.json")):
            dataset = (os.path.join(folder, "gt.json"), os.path.join(folder, "pred.json"),
                       os.path.join(folder, "gt"), os.path.join(folder, "pred"))
        else:
            dataset = write_dataset(folder, args.images)
        print(f"data set: {args.images} pairs of 640x480 PNGs in {folder} ({time.perf_counter() - start:.1f} s)")
        timings = time_pq_compute(dataset, repeat=args.repeat)
    print(f"PNG inflater: {ops.png_inflater() or 'none (PIL fallback)'}")
    ours = timings["eyecool"]["median_ms"]
    print(f"{'implementation':14s} {'median s':>9s} {'min s':>7s} {'ours faster by':>15s} {'max |diff|':>11s}")
    for name, t in timings.items():
        print(f"{name:14s} {t['median_ms'] / 1e3:9.3f} {t['min_ms'] / 1e3:7.3f} {t['median_ms'] / ours:14.2f}x "
              f"{t['max_diff']:11.2e}")
    missing = {"panopticapi", "hotcoco"} - set(timings)
    if missing:
        print(f"not installed, not timed: {', '.join(sorted(missing))}")
    print()
    print(markdown_table(op_rows("cpu")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
