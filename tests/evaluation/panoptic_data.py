"""Writing small COCO panoptic data sets (JSON + RGB PNGs) for the evaluation tests."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import PIL.Image as Image

# Two things (1, 2) and two stuff categories (10, 11).
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 10, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 11, "name": "road", "isthing": 0, "color": [128, 64, 128]},
]


def id_map_to_rgb(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def segments_info(ids: np.ndarray, categories: Dict[int, int], crowd: Optional[Dict[int, int]] = None) -> List[Dict]:
    """segments_info of an id map, areas counted from it; ``categories`` maps segment id -> category id."""
    crowd = crowd or {}
    values, areas = np.unique(ids, return_counts=True)
    return [{"id": int(v), "category_id": int(categories[int(v)]), "iscrowd": int(crowd.get(int(v), 0)),
             "area": int(a), "bbox": [0, 0, 1, 1]} for v, a in zip(values, areas) if v != 0]


def write_split(folder: str, name: str, images: Sequence[Dict], categories=CATEGORIES) -> tuple:
    """Writes ``<folder>/<name>.json`` and ``<folder>/<name>/<file>.png``; each image dict has ``image_id``,
    ``ids`` ([H, W] id map) and ``segments_info``. Returns (json path, png folder)."""
    png_folder = os.path.join(folder, name)
    os.makedirs(png_folder, exist_ok=True)
    annotations = []
    for image in images:
        file_name = f"{image['image_id']:06d}.png"
        Image.fromarray(id_map_to_rgb(image["ids"])).save(os.path.join(png_folder, file_name))
        annotations.append({"image_id": image["image_id"], "file_name": file_name,
                            "segments_info": image["segments_info"]})
    json_path = os.path.join(folder, f"{name}.json")
    h, w = np.asarray(images[0]["ids"]).shape if images else (0, 0)
    with open(json_path, "w") as f:
        json.dump({"images": [{"id": im["image_id"], "file_name": f"{im['image_id']:06d}.jpg", "height": h,
                               "width": w} for im in images],
                   "annotations": annotations, "categories": list(categories)}, f)
    return json_path, png_folder


def random_pair(rng: np.random.Generator, image_id: int, height: int = 24, width: int = 32):
    """A random gt / prediction pair with things, stuff, crowd and void; the prediction moves boundaries,
    flips some categories and adds segments. Returns (gt image dict, pred image dict)."""
    cat_ids = [c["id"] for c in CATEGORIES]

    def cells(n):
        ys, xs = rng.uniform(0, height, n), rng.uniform(0, width, n)
        yy, xx = np.mgrid[0:height, 0:width]
        return ((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2).argmin(-1), ys, xs

    n = int(rng.integers(3, 9))
    gt_cells, ys, xs = cells(n)
    gt_seg = rng.choice(np.arange(1, 5000), size=n, replace=False)
    gt_seg[rng.random(n) < 0.15] = 0
    gt_ids = gt_seg[gt_cells]
    cell_cat = rng.choice(cat_ids, size=n)
    gt_cat = {int(s): int(c) for s, c in zip(gt_seg, cell_cat)}
    gt_crowd = {int(s): int(c < 10 and rng.random() < 0.25) for s, c in zip(gt_seg, cell_cat)}

    m = n + int(rng.integers(0, 3))
    py = np.concatenate([ys + rng.normal(0, 2.5, n), rng.uniform(0, height, m - n)])
    px = np.concatenate([xs + rng.normal(0, 2.5, n), rng.uniform(0, width, m - n)])
    yy, xx = np.mgrid[0:height, 0:width]
    pred_cells = ((yy[..., None] - py) ** 2 + (xx[..., None] - px) ** 2).argmin(-1)
    pred_seg = rng.choice(np.arange(1, 2**24), size=m, replace=False)
    pred_seg[rng.random(m) < 0.1] = 0
    pred_ids = pred_seg[pred_cells]
    pred_cell_cat = np.concatenate([cell_cat, rng.choice(cat_ids, size=m - n)])
    flip = rng.random(m) < 0.2
    pred_cell_cat[flip] = rng.choice(cat_ids, size=int(flip.sum()))
    pred_cat = {int(s): int(c) for s, c in zip(pred_seg, pred_cell_cat)}
    gt = {"image_id": image_id, "ids": gt_ids, "segments_info": segments_info(gt_ids, gt_cat, gt_crowd)}
    pred = {"image_id": image_id, "ids": pred_ids, "segments_info": segments_info(pred_ids, pred_cat)}
    return gt, pred
