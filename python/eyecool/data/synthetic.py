"""A synthetic panoptic data set written in exactly COCO's format: the embedded default for the demo and the
end-to-end tests, read by the same ``CocoPanopticDataset`` as COCO.

``eyecool synth --out DIR --num-train N --num-val M --size 256 --seed S`` writes
``DIR/images/{train,val}/*.jpg``, ``DIR/annotations/panoptic_{train,val}.json`` and
``DIR/annotations/panoptic_{train,val}/*.png``.

Scenes are made to be learnt, not just parsed: the background is split into 2-4 irregular blobs (argmax of
smooth random fields), each filled with its stuff class's texture (stripes, dots, checker, grain; the colours
drawn around a per-class palette); 2-6 things of distinct shapes (disc, square, triangle, cross) at 20-50% of
the image side, in random colours so that only the shape tells the class, overlap each other (every instance
keeps at least ~45% of its pixels visible), with repeated classes; some images hold a crowd region (a cluster of
small shapes of one class, ``iscrowd=1``), a thin void border or small void patches. ``--categories coco``
draws the categories from COCO's 133 instead (shape and texture follow the category's index), so the full
label space and its non-contiguous ids are exercised.

Everything is drawn with vectorised numpy from one generator per image, seeded by (seed, split, index):
the output does not depend on the number of worker processes.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
from PIL import Image

from eyecool.panoptic_format import id2rgb, load_coco_categories

SHAPES = ("disc", "square", "triangle", "cross")
TEXTURES = ("stripes", "dots", "checker", "grain")

# The default label space: non-contiguous ids in both groups, so that the contiguous mapping is exercised.
SYNTHETIC_CATEGORIES: Tuple[Dict[str, Any], ...] = (
    {"id": 1, "name": "disc", "isthing": 1, "color": [220, 20, 60], "supercategory": "shape"},
    {"id": 2, "name": "square", "isthing": 1, "color": [0, 0, 142], "supercategory": "shape"},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [250, 170, 30], "supercategory": "shape"},
    {"id": 5, "name": "cross", "isthing": 1, "color": [106, 0, 228], "supercategory": "shape"},
    {"id": 100, "name": "stripes", "isthing": 0, "color": [107, 142, 35], "supercategory": "texture"},
    {"id": 101, "name": "dots", "isthing": 0, "color": [70, 130, 180], "supercategory": "texture"},
    {"id": 102, "name": "checker", "isthing": 0, "color": [150, 100, 100], "supercategory": "texture"},
    {"id": 104, "name": "grain", "isthing": 0, "color": [152, 161, 64], "supercategory": "texture"},
)

# Stuff colour pairs (the two ends of the texture) per texture of the default set.
_TEXTURE_PALETTES = {
    "stripes": ((60, 120, 50), (160, 200, 110)),
    "dots": ((50, 80, 150), (190, 210, 235)),
    "checker": ((120, 80, 50), (215, 185, 140)),
    "grain": ((90, 90, 90), (190, 180, 170)),
}


@dataclass(frozen=True)
class ThingClass:
    category_id: int
    shape: str


@dataclass(frozen=True)
class StuffClass:
    category_id: int
    texture: str
    palette: Tuple[Tuple[int, int, int], Tuple[int, int, int]]


@dataclass(frozen=True)
class LabelSpace:
    """The categories written to the JSON and how each is drawn."""

    categories: Tuple[Dict[str, Any], ...]
    things: Tuple[ThingClass, ...]
    stuff: Tuple[StuffClass, ...]


def build_label_space(name: str = "synthetic") -> LabelSpace:
    """``"synthetic"``: 4 shapes (ids 1, 2, 3, 5) and 4 textures (ids 100, 101, 102, 104). ``"coco"``: COCO's
    133 categories; thing i is drawn as shape i mod 4, stuff i as texture i mod 4 in its COCO colour."""
    if name == "synthetic":
        categories = tuple(dict(c) for c in SYNTHETIC_CATEGORIES)
        things = tuple(ThingClass(c["id"], c["name"]) for c in categories if c["isthing"])
        stuff = tuple(StuffClass(c["id"], c["name"], _TEXTURE_PALETTES[c["name"]]) for c in categories if not c["isthing"])
    elif name == "coco":
        categories = tuple(load_coco_categories())
        thing_cats = [c for c in categories if c["isthing"]]
        stuff_cats = [c for c in categories if not c["isthing"]]
        things = tuple(ThingClass(c["id"], SHAPES[i % len(SHAPES)]) for i, c in enumerate(thing_cats))
        stuff = tuple(
            StuffClass(c["id"], TEXTURES[i % len(TEXTURES)], (tuple(int(v * 0.45) for v in c["color"]), tuple(c["color"])))
            for i, c in enumerate(stuff_cats)
        )
    else:
        raise ValueError(f"categories must be 'synthetic' or 'coco', got {name!r}")
    return LabelSpace(categories, things, stuff)


class Scene(NamedTuple):
    """One rendered image: ``image`` uint8 ``[H, W, 3]``, ``segment_ids`` uint32 ``[H, W]`` (0 = void) and the
    COCO ``segments_info`` list; ``num_occluded`` counts instances partly hidden by a later one."""

    image: np.ndarray
    segment_ids: np.ndarray
    segments_info: List[Dict[str, Any]]
    num_occluded: int


def _linear_weights(n: int, g: int) -> Tuple[np.ndarray, np.ndarray]:
    """Lower grid node and weight of the upper node, for n pixel centres on an axis spanned by g grid nodes."""
    pos = (np.arange(n, dtype=np.float32) + 0.5) / n * (g - 1)
    lo = np.minimum(pos.astype(np.intp), g - 2)
    return lo, (pos - lo).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, count: int, height: int, width: int, grid: int) -> np.ndarray:
    """``[count, H, W]`` smooth random fields: normal values on a grid x grid lattice, bilinearly upsampled.
    Separable gathers rather than matrix products: BLAS threads collapse on a busy machine."""
    grid = max(2, grid)
    coarse = rng.standard_normal((count, grid, grid), dtype=np.float32)
    ly, fy = _linear_weights(height, grid)
    lx, fx = _linear_weights(width, grid)
    rows = coarse[:, ly, :] * (1.0 - fy)[None, :, None] + coarse[:, ly + 1, :] * fy[None, :, None]
    return rows[:, :, lx] * (1.0 - fx) + rows[:, :, lx + 1] * fx


def _rotated(xx: np.ndarray, yy: np.ndarray, angle: float) -> Tuple[np.ndarray, np.ndarray]:
    # Python floats keep float32 arrays float32 (numpy scalars would promote them to float64).
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return xx * c + yy * s, -xx * s + yy * c


def _texture(rng: np.random.Generator, texture: str, xx: np.ndarray, yy: np.ndarray, scale: float) -> np.ndarray:
    """Texture intensity in [0, 1] on the pixel grid; periods scale with the image (``scale`` = side / 256)."""
    u, v = _rotated(xx, yy, rng.uniform(0, np.pi))
    if texture == "stripes":
        period = max(4.0, rng.uniform(7, 13) * scale)
        return 0.5 + 0.5 * np.sin(u * (2 * np.pi / period))
    if texture == "dots":
        pitch = max(5.0, rng.uniform(10, 15) * scale)
        radius = pitch * rng.uniform(0.22, 0.3)
        du = np.mod(u, pitch) - pitch / 2
        dv = np.mod(v, pitch) - pitch / 2
        return (du * du + dv * dv <= radius * radius).astype(np.float32)
    if texture == "checker":
        pitch = max(4.0, rng.uniform(8, 13) * scale)
        return np.mod(np.floor(u / pitch) + np.floor(v / pitch), 2).astype(np.float32)
    if texture == "grain":
        h, w = xx.shape
        cells = max(4, int(min(h, w) / max(2.0, 3.5 * scale)))
        noise = _smooth_noise(rng, 1, h, w, cells)[0]
        return np.clip(0.5 + 0.45 * noise, 0.0, 1.0)
    raise ValueError(f"unknown texture {texture!r}")


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    """Inside test of a shape of circumradius 1 centred at the origin, in rotated unit coordinates (u, v)."""
    if shape == "disc":
        return u * u + (v * v) / (aspect * aspect) <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.72) & (np.abs(v) <= 0.72 * aspect)
    if shape == "triangle":
        # Equilateral triangle inscribed in the unit circle: its sides lie at distance 1/2 from the centre.
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            phi = -np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(phi) + v * np.sin(phi) <= 0.5
        return inside
    if shape == "cross":
        arm = 0.3
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= 0.95)) | ((av <= arm) & (au <= 0.95))
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(rng, shape, cy, cx, radius, height, width):
    """Rasterise one shape: returns the (y0, y1, x0, x1) crop of the image it touches and its bool mask there,
    plus the rotated unit coordinates for shading (None when the shape misses the image)."""
    y0, y1 = max(0, int(np.floor(cy - radius))), min(height, int(np.ceil(cy + radius)) + 1)
    x0, x1 = max(0, int(np.floor(cx - radius))), min(width, int(np.ceil(cx + radius)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    yy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None] / radius
    xx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :] / radius
    u, v = _rotated(np.broadcast_to(xx, (y1 - y0, x1 - x0)), np.broadcast_to(yy, (y1 - y0, x1 - x0)), rng.uniform(0, 2 * np.pi))
    mask = _shape_mask(shape, u, v, rng.uniform(0.8, 1.0))
    return (y0, y1, x0, x1), mask, u, v


def _paint_solid(rng, image, crop, mask, u, v):
    """A random colour with a mild linear shading, so that colour never tells the class."""
    y0, y1, x0, x1 = crop
    colour = rng.uniform(25, 230, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + 0.15 * (u * np.cos(angle) + v * np.sin(angle))
    region = image[y0:y1, x0:x1]
    region[mask] = (shade[..., None] * colour)[mask]


def render_scene(rng: np.random.Generator, height: int, width: int, space: LabelSpace) -> Scene:
    """Draw one image and its panoptic annotation (see the module docstring for what a scene holds)."""
    side = min(height, width)
    scale = side / 256.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    # Segments hold (category_id, iscrowd); owner[y, x] (built below) indexes them, -1 = void.
    segments: List[Tuple[int, int]] = []

    # Stuff: argmax of smooth random fields (a coarse and a finer scale) gives irregular blobs; blobs under 2%
    # of the image are dissolved into their neighbours so that every stuff segment is learnable.
    num_regions = int(rng.integers(2, 5)) if len(space.stuff) >= 2 else 1
    num_regions = min(num_regions, len(space.stuff))
    region_classes = rng.choice(len(space.stuff), size=num_regions, replace=False)
    fields = _smooth_noise(rng, num_regions, height, width, 4) + 0.35 * _smooth_noise(rng, num_regions, height, width, 9)
    while True:
        region = np.argmax(fields, axis=0)
        counts = np.bincount(region.ravel(), minlength=num_regions)
        small = (counts > 0) & (counts < 0.02 * height * width)
        if not small.any() or (counts > 0).sum() == 1:
            break
        fields[small] = -np.inf
    # Each region's texture blends two colours drawn around its class's palette.
    low = np.zeros((num_regions, 3), dtype=np.float32)
    high = np.zeros((num_regions, 3), dtype=np.float32)
    textures = np.zeros((num_regions, height, width), dtype=np.float32)
    segment_of_region = np.full(num_regions, -1, dtype=np.int32)
    for r in np.flatnonzero(counts):
        stuff = space.stuff[int(region_classes[r])]
        low[r], high[r] = (np.asarray(c) + rng.uniform(-30, 30, size=3) for c in stuff.palette)
        textures[r] = _texture(rng, stuff.texture, xx, yy, scale)
        segment_of_region[r] = len(segments)
        segments.append((stuff.category_id, 0))
    t = np.take_along_axis(textures, region[None], axis=0)[0]
    image = low[region] + (high - low)[region] * t[..., None]
    owner = segment_of_region[region]

    # Crowd: a cluster of small shapes of one thing class, annotated as one iscrowd=1 segment.
    crowd_index = -1
    if rng.random() < 0.35:
        thing = space.things[int(rng.integers(len(space.things)))]
        centre = rng.uniform(0.15, 0.85, size=2) * (height, width)
        crowd_index = len(segments)
        for _ in range(int(rng.integers(6, 13))):
            cy, cx = centre + rng.uniform(-0.1, 0.1, size=2) * side
            drawn = _draw_shape(rng, thing.shape, cy, cx, rng.uniform(0.025, 0.04) * side, height, width)
            if drawn is None:
                continue
            crop, mask, u, v = drawn
            _paint_solid(rng, image, crop, mask, u, v)
            owner[crop[0]:crop[1], crop[2]:crop[3]][mask] = crowd_index
        crowd_area = int((owner == crowd_index).sum())  # the small shapes may overlap
        if crowd_area:
            segments.append((thing.category_id, 1))
        else:
            crowd_index = -1

    # Things: 2-6 instances at 20-50% of the side. A candidate is redrawn when it would hide more than 55% of an
    # instance already placed (or 70% of the crowd), so occlusion happens but every instance stays visible.
    full_area: Dict[int, int] = {}
    visible: Dict[int, int] = {}
    if crowd_index >= 0:
        full_area[crowd_index] = visible[crowd_index] = crowd_area
    occluded = set()
    min_instance_area = (0.1 * side) ** 2
    for _ in range(int(rng.integers(2, 7))):
        for _attempt in range(10):
            thing = space.things[int(rng.integers(len(space.things)))]
            radius = rng.uniform(0.1, 0.25) * side
            cy = rng.uniform(0.6 * radius, height - 0.6 * radius)
            cx = rng.uniform(0.6 * radius, width - 0.6 * radius)
            crop, mask, u, v = _draw_shape(rng, thing.shape, cy, cx, radius, height, width)
            area = int(mask.sum())
            if area < min_instance_area:  # mostly outside the image
                continue
            under = owner[crop[0]:crop[1], crop[2]:crop[3]][mask]
            hidden = np.bincount(under[under >= 0], minlength=len(segments))
            if any(visible[i] - hidden[i] < (0.3 if i == crowd_index else 0.45) * full_area[i] for i in visible):
                continue
            for i in visible:
                if hidden[i]:
                    visible[i] -= int(hidden[i])
                    occluded.add(i)
            _paint_solid(rng, image, crop, mask, u, v)
            owner[crop[0]:crop[1], crop[2]:crop[3]][mask] = len(segments)
            full_area[len(segments)] = visible[len(segments)] = area
            segments.append((thing.category_id, 0))
            break

    # Void: a thin unlabelled border, and small unlabelled patches of noise.
    if rng.random() < 0.5:
        border = int(rng.integers(1, 4))
        owner[:border] = owner[-border:] = -1
        owner[:, :border] = owner[:, -border:] = -1
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.4 else 0):
        ph, pw = (rng.uniform(0.04, 0.08, size=2) * side).astype(int) + 1
        py, px = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
        owner[py:py + ph, px:px + pw] = -1
        image[py:py + ph, px:px + pw] = rng.uniform(0, 255, size=(ph, pw, 3))

    image += (rng.random(image.shape, dtype=np.float32) - 0.5) * 16.0  # sensor-like noise, sd ~4.6
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)

    # Segment ids: distinct random values over all three PNG channels (COCO's ids are arbitrary too).
    ids = rng.choice((1 << 24) - 1, size=len(segments), replace=False) + 1
    id_of_owner = np.zeros(len(segments) + 1, dtype=np.uint32)  # last entry: void (owner -1)
    segments_info = []
    areas = np.bincount(owner[owner >= 0].ravel(), minlength=len(segments))
    for k, (category_id, iscrowd) in enumerate(segments):
        if areas[k] == 0:
            continue
        id_of_owner[k] = ids[k]
        mask = owner == k
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        segments_info.append({
            "id": int(ids[k]),
            "category_id": int(category_id),
            "iscrowd": int(iscrowd),
            "area": int(areas[k]),
            # COCO's bbox: [x, y, width, height] of the pixels, in pixel-edge coordinates.
            "bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)],
        })
    segment_ids = id_of_owner[owner]
    num_occluded = sum(1 for i in occluded if i != crowd_index and areas[i] > 0)
    return Scene(image, segment_ids, segments_info, num_occluded)


class SplitPaths(NamedTuple):
    """Where one split lies; in the argument order of ``CocoPanopticDataset(image_dir, json_file, png_dir)``."""

    image_dir: str
    json_file: str
    png_dir: str


def split_paths(root: str, split: str) -> SplitPaths:
    return SplitPaths(
        os.path.join(root, "images", split),
        os.path.join(root, "annotations", f"panoptic_{split}.json"),
        os.path.join(root, "annotations", f"panoptic_{split}"),
    )


# Split codes enter each image's seed, so train and val never share scenes.
_SPLIT_CODES = {"train": 1, "val": 2}


def _render_and_write(job) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    seed, split, index, image_id, size, size_jitter, space, paths = job
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    height, width = size, size
    if size_jitter > 0:
        height, width = (int(round(size * rng.uniform(1.0 - size_jitter, 1.0))) for _ in range(2))
    scene = render_scene(rng, height, width, space)
    stem = f"{image_id:012d}"
    Image.fromarray(scene.image).save(os.path.join(paths.image_dir, stem + ".jpg"), quality=95)
    # Fast zlib level: the PNGs are a few KB either way, and writing them would otherwise dominate.
    Image.fromarray(id2rgb(scene.segment_ids)).save(os.path.join(paths.png_dir, stem + ".png"), compress_level=1)
    image_info = {"id": image_id, "file_name": stem + ".jpg", "width": width, "height": height}
    annotation = {"image_id": image_id, "file_name": stem + ".png", "segments_info": scene.segments_info}
    return image_info, annotation


def generate_synthetic_dataset(
    out_dir: str,
    num_train: int,
    num_val: int,
    size: int = 256,
    seed: int = 0,
    categories: str = "synthetic",
    size_jitter: float = 0.0,
    workers: Optional[int] = None,
) -> Dict[str, SplitPaths]:
    """Write the train and val splits under ``out_dir`` and return their paths by split name.

    ``size``: image side (``size_jitter`` > 0 draws each side from [size * (1 - jitter), size]); ``workers``:
    processes (default: all cores; small sets are drawn in this process). Identical for identical arguments,
    whatever ``workers`` is.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    if not 0.0 <= size_jitter < 0.75:
        raise ValueError(f"size_jitter must lie in [0, 0.75), got {size_jitter}")
    space = build_label_space(categories)
    result = {}
    jobs = []
    next_id = 1
    for split, count in (("train", num_train), ("val", num_val)):
        paths = split_paths(out_dir, split)
        os.makedirs(paths.image_dir, exist_ok=True)
        os.makedirs(paths.png_dir, exist_ok=True)
        result[split] = paths
        jobs.append([(seed, split, i, next_id + i, size, size_jitter, space, paths) for i in range(count)])
        next_id += count
    total = num_train + num_val
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    if workers > 1 and total >= 64:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            outputs = [pool.map(_render_and_write, split_jobs, chunksize=16) for split_jobs in jobs]
    else:
        outputs = [[_render_and_write(job) for job in split_jobs] for split_jobs in jobs]
    for (split, paths), split_outputs in zip(result.items(), outputs):
        data = {
            "info": {"description": f"eyecool synthetic panoptic data ({categories} categories), split {split}",
                     "version": "1.0", "seed": seed},
            "licenses": [],
            "images": [image for image, _ in split_outputs],
            "annotations": [annotation for _, annotation in split_outputs],
            "categories": [dict(c) for c in space.categories],
        }
        with open(paths.json_file, "w") as f:
            json.dump(data, f)
    return result


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write the synthetic panoptic data set (COCO panoptic format)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--size-jitter", type=float, default=0.0,
                        help="draw each side from [size * (1 - jitter), size] (varied image sizes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", choices=("synthetic", "coco"), default="synthetic",
                        help="the synthetic set's 8 categories, or COCO's 133")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    start = time.perf_counter()
    paths = generate_synthetic_dataset(
        args.out, args.num_train, args.num_val, size=args.size, seed=args.seed, categories=args.categories,
        size_jitter=args.size_jitter, workers=args.workers,
    )
    elapsed = time.perf_counter() - start
    for split, p in paths.items():
        print(f"{split}: images {p.image_dir}, json {p.json_file}, png {p.png_dir}")
    print(f"wrote {args.num_train + args.num_val} images in {elapsed:.1f} s")
    return 0
