"""The COCO panoptic format: segment id <-> RGB conversion, the category label space, and the data set reader.

The network's label space (DESIGN.md section 5) is contiguous: the S stuff classes first, then the K thing
classes, void = 255; the detector's classes are the K things, 0..K-1. Data sets (COCO, the synthetic set) use
their own, non-contiguous category ids. ``DatasetMeta`` holds the categories and converts between the two, so
that targets are built in contiguous ids and predictions are written back with the dataset's ids.

Format (DESIGN.md section 7): ``panoptic_<split>.json`` lists ``images``, ``annotations`` (``image_id``,
``file_name`` of the PNG, ``segments_info``) and ``categories``; a PNG per image stores segment id
R + 256 G + 256^2 B per pixel, 0 = void.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

VOID_ID = 0
IGNORE_LABEL = 255
ON_ERROR_POLICIES = ("raise", "skip")

_COCO_CATEGORIES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "coco_panoptic_categories.json")


def rgb2id(color: np.ndarray) -> np.ndarray:
    """Segment ids of a panoptic PNG: ``[H, W, 3]`` uint8 -> ``[H, W]`` uint32 (R + 256 G + 256^2 B)."""
    color = np.asarray(color)
    if color.ndim != 3 or color.shape[2] != 3:
        raise ValueError(f"rgb2id: expected an [H, W, 3] array, got shape {tuple(color.shape)}")
    color = color.astype(np.uint32)
    return color[..., 0] + (color[..., 1] << 8) + (color[..., 2] << 16)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb2id``: ``[H, W]`` integer ids (< 2^24) -> ``[H, W, 3]`` uint8."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise ValueError(f"id2rgb: segment ids must lie in [0, 2^24), got range [{ids.min()}, {ids.max()}]")
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def load_coco_categories() -> List[Dict[str, Any]]:
    """COCO's 133 panoptic categories (panopticapi's panoptic_coco_categories.json): 80 things with ids in
    1..90 and 53 stuff with ids in 92..200, each with ``id``, ``name``, ``isthing``, ``color``, ``supercategory``."""
    with open(_COCO_CATEGORIES_FILE) as f:
        return json.load(f)


@dataclass(frozen=True)
class DatasetMeta:
    """A data set's categories and the map between their ids and the network's contiguous ids.

    Contiguous semantic ids: stuff categories 0..S-1, then things S..S+K-1 (each group in increasing category
    id). Thing index k (the detector's class) is contiguous id S + k. Build it with ``from_categories`` from a
    COCO ``categories`` list; ``to_categories`` gives that list back (e.g. to store it in a checkpoint).
    """

    categories: Tuple[Dict[str, Any], ...]
    stuff_ids: Tuple[int, ...] = field(init=False)
    thing_ids: Tuple[int, ...] = field(init=False)
    _to_contiguous: Dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        ids = [int(c["id"]) for c in self.categories]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"DatasetMeta: category ids must be unique, duplicated: {duplicates}")
        for c in self.categories:
            if not 0 < int(c["id"]) < 1 << 24 or int(c.get("isthing", -1)) not in (0, 1):
                raise ValueError(f"DatasetMeta: category needs an id in [1, 2^24) and isthing 0 or 1, got {c}")
        stuff = tuple(sorted(int(c["id"]) for c in self.categories if int(c["isthing"]) == 0))
        things = tuple(sorted(int(c["id"]) for c in self.categories if int(c["isthing"]) == 1))
        object.__setattr__(self, "stuff_ids", stuff)
        object.__setattr__(self, "thing_ids", things)
        object.__setattr__(self, "_to_contiguous", {cid: i for i, cid in enumerate(stuff + things)})

    @classmethod
    def from_categories(cls, categories: Sequence[Dict[str, Any]]) -> "DatasetMeta":
        return cls(tuple(dict(c) for c in categories))

    @classmethod
    def from_json_file(cls, json_file: str) -> "DatasetMeta":
        """The categories of a ``panoptic_<split>.json`` (or of a bare categories list such as
        coco_panoptic_categories.json)."""
        with open(json_file) as f:
            data = json.load(f)
        return cls.from_categories(data["categories"] if isinstance(data, dict) else data)

    def to_categories(self) -> List[Dict[str, Any]]:
        return [dict(c) for c in self.categories]

    @property
    def num_stuff(self) -> int:
        return len(self.stuff_ids)

    @property
    def num_things(self) -> int:
        return len(self.thing_ids)

    @property
    def num_classes(self) -> int:
        """Semantic channels S + K."""
        return len(self.stuff_ids) + len(self.thing_ids)

    @property
    def contiguous_category_ids(self) -> Tuple[int, ...]:
        """Dataset category id of every contiguous semantic id, in order (stuff first)."""
        return self.stuff_ids + self.thing_ids

    def _by_id(self) -> Dict[int, Dict[str, Any]]:
        return {int(c["id"]): c for c in self.categories}

    @property
    def class_names(self) -> List[str]:
        """Names in contiguous order."""
        by_id = self._by_id()
        return [str(by_id[i].get("name", i)) for i in self.contiguous_category_ids]

    @property
    def class_colors(self) -> List[Tuple[int, int, int]]:
        """RGB colours in contiguous order (grey where the JSON gives none)."""
        by_id = self._by_id()
        return [tuple(int(v) for v in by_id[i].get("color", (128, 128, 128))) for i in self.contiguous_category_ids]

    def has_category(self, category_id: int) -> bool:
        return int(category_id) in self._to_contiguous

    def is_thing(self, category_id: int) -> bool:
        return self.category_id_to_contiguous(category_id) >= self.num_stuff

    def category_id_to_contiguous(self, category_id: int) -> int:
        """Dataset category id -> contiguous semantic id; KeyError naming the id when it is unknown."""
        try:
            return self._to_contiguous[int(category_id)]
        except KeyError:
            raise KeyError(f"unknown category_id {int(category_id)}; known ids: {sorted(self._to_contiguous)}") from None

    def contiguous_to_category_id(self, contiguous_id: Union[int, np.ndarray, torch.Tensor]):
        """Contiguous semantic id(s) -> dataset category id(s). Takes an int (returns an int) or an integer array
        or tensor of any shape (returns the same type and shape); ids outside [0, S+K) raise ValueError."""
        table = self.contiguous_category_ids
        if isinstance(contiguous_id, (int, np.integer)):
            if not 0 <= int(contiguous_id) < len(table):
                raise ValueError(f"contiguous id must lie in [0, {len(table)}), got {int(contiguous_id)}")
            return table[int(contiguous_id)]
        if isinstance(contiguous_id, torch.Tensor):
            if contiguous_id.numel() and (contiguous_id.min() < 0 or contiguous_id.max() >= len(table)):
                raise ValueError(f"contiguous ids must lie in [0, {len(table)})")
            lut = torch.tensor(table, dtype=torch.int64, device=contiguous_id.device)
            return lut[contiguous_id.long()]
        array = np.asarray(contiguous_id)
        if array.size and (array.min() < 0 or array.max() >= len(table)):
            raise ValueError(f"contiguous ids must lie in [0, {len(table)})")
        return np.asarray(table, dtype=np.int64)[array]

    def thing_index_to_category_id(self, thing_index: int) -> int:
        """Detector class k (0..K-1) -> dataset category id."""
        if not 0 <= int(thing_index) < self.num_things:
            raise ValueError(f"thing index must lie in [0, {self.num_things}), got {int(thing_index)}")
        return self.thing_ids[int(thing_index)]


class PanopticFormatError(ValueError):
    """A data set that breaks the COCO panoptic format; the message names the file and the segment."""


def panoptic_png_path(png_dir: str, annotation: Dict[str, Any]) -> str:
    return os.path.join(png_dir, annotation["file_name"])


def load_panoptic_png(path: str) -> np.ndarray:
    """Segment id map ``[H, W]`` uint32 of a panoptic PNG."""
    with Image.open(path) as png:
        return rgb2id(np.asarray(png.convert("RGB")))


def check_segments(
    annotation: Dict[str, Any],
    ids: np.ndarray,
    counts: np.ndarray,
    meta: DatasetMeta,
    png_name: str,
) -> List[str]:
    """Problems of one annotation against its PNG, given the PNG's unique segment ids and pixel counts.

    The one place that states the per-segment rules, shared by ``validate_dataset`` (which reports them all)
    and the reader (which raises them): every non-void id in the PNG has an entry in ``segments_info`` and
    every entry has pixels, ids are not repeated, categories are known, and ``area`` equals the pixel count.
    """
    problems = []
    seen = set()
    segments = {}
    for segment in annotation.get("segments_info", []):
        segment_id = int(segment["id"])
        if segment_id in seen:
            problems.append(f"{png_name}: segment {segment_id} is listed twice in the JSON")
        seen.add(segment_id)
        segments[segment_id] = segment
        if not meta.has_category(segment["category_id"]):
            problems.append(f"{png_name}: segment {segment_id} has unknown category_id {segment['category_id']}")
    png_counts = {int(i): int(c) for i, c in zip(ids, counts) if int(i) != VOID_ID}
    for segment_id in sorted(set(png_counts) - set(segments)):
        problems.append(
            f"{png_name}: segment {segment_id} is in the PNG ({png_counts[segment_id]} pixels) but not in the JSON"
        )
    for segment_id in sorted(set(segments) - set(png_counts)):
        problems.append(f"{png_name}: segment {segment_id} is in the JSON but not in the PNG")
    for segment_id in sorted(set(segments) & set(png_counts)):
        area = segments[segment_id].get("area")
        if area is not None and int(area) != png_counts[segment_id]:
            problems.append(
                f"{png_name}: segment {segment_id} has area {int(area)} in the JSON but {png_counts[segment_id]} "
                "pixels in the PNG"
            )
    return problems


def load_panoptic_json(json_file: str) -> Tuple[Dict[str, Any], List[str]]:
    """The JSON and the problems found in it alone (no files opened): missing keys, images listed twice,
    annotations without an image entry and images without an annotation. Category problems are per segment
    (``check_segments``)."""
    data, problems = _load_json_with_problems(json_file)
    return data, [message for _, message in problems]


def _load_json_with_problems(json_file: str) -> Tuple[Dict[str, Any], List[Tuple[Any, str]]]:
    """``load_panoptic_json`` with each problem tagged by the image id it concerns (None: the whole file). The
    entries with missing keys are dropped from ``data``, so the rest can be read."""
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise PanopticFormatError(f"{json_file}: cannot read the JSON: {error}") from error
    if not isinstance(data, dict):
        raise PanopticFormatError(f"{json_file}: expected a JSON object with 'images', 'annotations' and "
                                  f"'categories', got {type(data).__name__}")
    problems: List[Tuple[Any, str]] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problems.append((None, f"{json_file}: no '{key}' list"))
            data[key] = []
    images = []
    for i, img in enumerate(data["images"]):
        missing = [k for k in ("id", "file_name") if not isinstance(img, dict) or k not in img]
        if missing:
            problems.append((None, f"{json_file}: images[{i}] has no {', '.join(repr(k) for k in missing)}"))
        else:
            images.append(img)
    annotations = []
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in ("image_id", "file_name", "segments_info") if not isinstance(ann, dict) or k not in ann]
        if missing:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            problems.append((image_id, f"{json_file}: annotations[{i}] (image_id {image_id}) has no "
                                       f"{', '.join(repr(k) for k in missing)}"))
            continue
        bad = [j for j, seg in enumerate(ann["segments_info"])
               if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg]
        if bad:
            problems.append((ann["image_id"], f"{json_file}: annotation {ann['file_name']}: segments_info[{bad[0]}] "
                                              f"has no 'id' or no 'category_id'"))
        annotations.append(ann)
    data["images"], data["annotations"] = images, annotations
    seen_images: Dict[Any, str] = {}
    for img in images:
        if img["id"] in seen_images:
            problems.append((img["id"], f"{json_file}: image id {img['id']} is listed twice in 'images' "
                                        f"({seen_images[img['id']]} and {img['file_name']})"))
        seen_images.setdefault(img["id"], img["file_name"])
    annotated: Dict[Any, str] = {}
    for ann in annotations:
        if ann["image_id"] not in seen_images:
            problems.append((ann["image_id"], f"{json_file}: annotation {ann['file_name']} names image_id "
                                              f"{ann['image_id']}, which is not in 'images'"))
        if ann["image_id"] in annotated:
            problems.append((ann["image_id"], f"{json_file}: image_id {ann['image_id']} has two annotations "
                                              f"({annotated[ann['image_id']]} and {ann['file_name']})"))
        annotated.setdefault(ann["image_id"], ann["file_name"])
    for img in images:
        if img["id"] not in annotated:
            problems.append((img["id"], f"{json_file}: image {img['file_name']} (id {img['id']}) has no annotation"))
    return data, problems


Transform = Callable[[torch.Tensor, Dict[str, Any]], Tuple[torch.Tensor, Dict[str, Any]]]


class CocoPanopticDataset(torch.utils.data.Dataset):
    """COCO panoptic images and their training targets; reads COCO and the synthetic set alike.

    Args:
        image_dir: folder of the images (``images[i].file_name``).
        json_file: ``panoptic_<split>.json``.
        png_dir: folder of the panoptic PNGs (``annotations[i].file_name``).
        transforms: callable ``(image, target) -> (image, target)`` applied to the uint8 ``[3, H, W]`` image and
            the target dict at the original size (see ``eyecool.data.transforms``); None = no transform (the
            image is then returned as float 0..1 without normalisation).

    Item ``i`` is a dict:
        image: float32 ``[3, H, W]`` (as the transforms leave it; normalised by ``build_transforms``)
        sem_seg: int64 ``[H, W]`` contiguous semantic ids (stuff first, then things), void 255; crowd pixels keep
            their thing class
        boxes: float32 ``[M, 4]`` (x1, y1, x2, y2) of the non-crowd thing segments, pixel-edge coordinates
        classes: int64 ``[M]`` thing index 0..K-1
        masks: uint8 ``[M, H, W]`` (0/1)
        crowd_mask: bool ``[H, W]``, the union of crowd segments
        image_id, file_name (image), orig_size ``(H0, W0)``, size ``(H, W)`` after the transforms

    A broken image (segment in the PNG but not the JSON or the reverse, unknown category, area mismatch,
    missing, corrupt or truncated file, image and PNG of different sizes) and a broken JSON entry (missing keys,
    an image listed twice, an annotation without its image) are ``PanopticFormatError``s naming the file and the
    segment; ``eyecool validate-data`` reports every such problem of a data set at once.

    on_error: ``"raise"`` (default) stops at the first broken image or JSON entry; ``"skip"`` leaves it out with
        a warning naming the file: broken JSON entries when the data set is opened (``skipped_images`` lists
        them), broken files when an item is read (the next image is returned instead, and ``skipped`` counts
        them in the process that read them). Problems of the whole file (no 'images' list, bad categories)
        always raise.
    """

    def __init__(self, image_dir: str, json_file: str, png_dir: str, transforms: Optional[Transform] = None,
                 on_error: str = "raise"):
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
        self.image_dir = image_dir
        self.json_file = json_file
        self.png_dir = png_dir
        self.transforms = transforms
        self.on_error = on_error
        self.skipped = 0
        data, problems = _load_json_with_problems(json_file)
        fatal = [message for image_id, message in problems if image_id is None]
        if problems and (on_error == "raise" or fatal):
            raise PanopticFormatError("\n".join(message for _, message in problems))
        try:
            self.meta = DatasetMeta.from_categories(data["categories"])
        except (KeyError, TypeError, ValueError) as error:
            raise PanopticFormatError(f"{json_file}: bad 'categories': {error}") from error
        broken = {image_id for image_id, _ in problems}
        for _, message in problems:
            warnings.warn(f"skipping: {message}", RuntimeWarning, stacklevel=2)
        annotations = {ann["image_id"]: ann for ann in data["annotations"]}
        self.images = [img for img in data["images"] if img["id"] not in broken]
        self.skipped_images = sorted({str(i) for i in broken})
        self.annotations = [annotations[img["id"]] for img in self.images]
        if not self.images:
            raise PanopticFormatError(f"{json_file}: no usable image" + (f" ({len(broken)} skipped)" if broken else ""))

    # The label space, on the data set for convenience (``meta`` holds it without the data).
    @property
    def num_stuff(self) -> int:
        return self.meta.num_stuff

    @property
    def num_things(self) -> int:
        return self.meta.num_things

    @property
    def stuff_ids(self) -> Tuple[int, ...]:
        return self.meta.stuff_ids

    @property
    def thing_ids(self) -> Tuple[int, ...]:
        return self.meta.thing_ids

    def category_id_to_contiguous(self, category_id: int) -> int:
        return self.meta.category_id_to_contiguous(category_id)

    def contiguous_to_category_id(self, contiguous_id):
        return self.meta.contiguous_to_category_id(contiguous_id)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if self.on_error == "raise":
            return self._read(index)
        # Skip: the next readable image instead (a map-style data set must return something for every index).
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            try:
                return self._read(position)
            except PanopticFormatError as error:
                self.skipped += 1
                warnings.warn(f"skipping image {position}: {error}", RuntimeWarning, stacklevel=2)
        raise PanopticFormatError(f"{self.json_file}: none of the {len(self)} images can be read")

    def _read(self, index: int) -> Dict[str, Any]:
        image_info, annotation = self.images[index], self.annotations[index]
        image_path = os.path.join(self.image_dir, image_info["file_name"])
        png_path = panoptic_png_path(self.png_dir, annotation)
        for path in (image_path, png_path):
            if not os.path.isfile(path):
                raise PanopticFormatError(f"{path}: missing file (image_id {image_info['id']})")
        try:
            with Image.open(image_path) as img:
                image = np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:  # PIL: unidentified, truncated, broken chunks
            raise PanopticFormatError(f"{image_path}: cannot read the image (corrupt or truncated?): "
                                      f"{error}") from error
        try:
            segment_ids = load_panoptic_png(png_path)
        except (OSError, SyntaxError, ValueError) as error:
            raise PanopticFormatError(f"{png_path}: cannot read the panoptic PNG (corrupt or truncated?): "
                                      f"{error}") from error
        if image.shape[:2] != segment_ids.shape:
            raise PanopticFormatError(
                f"{image_path}: image is {image.shape[1]}x{image.shape[0]} (WxH) but its PNG {png_path} is "
                f"{segment_ids.shape[1]}x{segment_ids.shape[0]}"
            )
        target = build_targets(segment_ids, annotation, self.meta, png_name=png_path)
        target.update(
            image_id=image_info["id"],
            file_name=image_info["file_name"],
            orig_size=tuple(image.shape[:2]),
        )
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        target["image"] = image
        target["size"] = tuple(image.shape[-2:])
        return target


def build_targets(
    segment_ids: np.ndarray, annotation: Dict[str, Any], meta: DatasetMeta, png_name: str = "<png>"
) -> Dict[str, torch.Tensor]:
    """Training targets of one image from its segment id map ``[H, W]`` and its annotation (see
    ``CocoPanopticDataset`` for the keys). Raises ``PanopticFormatError`` listing every problem found."""
    height, width = segment_ids.shape
    ids, inverse, counts = np.unique(segment_ids, return_inverse=True, return_counts=True)
    problems = check_segments(annotation, ids, counts, meta, png_name)
    if problems:
        raise PanopticFormatError("\n".join(problems))
    inverse = inverse.reshape(height, width)
    segments = {int(s["id"]): s for s in annotation.get("segments_info", [])}

    # Per unique id: its contiguous semantic class (void 255), so the semantic map is one table lookup.
    semantic_of_unique = np.full(len(ids), IGNORE_LABEL, dtype=np.int64)
    crowd_unique, instance_unique, instance_classes = [], [], []
    for u, segment_id in enumerate(ids.tolist()):
        if segment_id == VOID_ID:
            continue
        segment = segments[segment_id]
        contiguous = meta.category_id_to_contiguous(segment["category_id"])
        semantic_of_unique[u] = contiguous
        if contiguous >= meta.num_stuff:
            if int(segment.get("iscrowd", 0)):
                crowd_unique.append(u)
            else:
                instance_unique.append(u)
                instance_classes.append(contiguous - meta.num_stuff)

    sem_seg = semantic_of_unique[inverse]
    masks = np.zeros((len(instance_unique), height, width), dtype=np.uint8)
    boxes = np.zeros((len(instance_unique), 4), dtype=np.float32)
    for k, u in enumerate(instance_unique):
        mask = inverse == u
        masks[k] = mask
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        # Pixel-edge box: pixel (x, y) covers [x, x + 1) x [y, y + 1), as COCO's bbox [x, y, w, h] does.
        boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    crowd_mask = np.isin(inverse, np.asarray(crowd_unique, dtype=inverse.dtype))
    return {
        "sem_seg": torch.from_numpy(sem_seg),
        "boxes": torch.from_numpy(boxes),
        "classes": torch.tensor(instance_classes, dtype=torch.int64),
        "masks": torch.from_numpy(masks),
        "crowd_mask": torch.from_numpy(crowd_mask),
    }
