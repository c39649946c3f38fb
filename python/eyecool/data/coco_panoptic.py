"""The COCO panoptic data set reader and the category label space (the format itself is
``eyecool.panoptic_format``).

The network's label space (docs/design.md section 5) is contiguous: the S stuff classes first, then the K thing
classes, void = 255; the detector's classes are the K things, 0..K-1. Data sets (COCO, the synthetic set) use
their own, non-contiguous category ids. ``DatasetMeta`` holds the categories and converts between the two, so
that targets are built in contiguous ids and predictions are written back with the dataset's ids.

The val split is read without targets (``with_targets=False``): the evaluator reads each gt PNG itself, once.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from eyecool.panoptic_format import (VOID_ID, PanopticFormatError, check_segments, load_json, load_panoptic_json,
                                     read_id_map)

IGNORE_LABEL = 255
ON_ERROR_POLICIES = ("raise", "skip")


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
        data = load_json(json_file)
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
        with_targets: False reads the images only (no PNG is opened, the items have no sem_seg, boxes, classes,
            masks or crowd_mask): evaluation, where the evaluator reads each gt PNG itself.

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
                 on_error: str = "raise", with_targets: bool = True):
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
        self.image_dir = image_dir
        self.json_file = json_file
        self.png_dir = png_dir
        self.transforms = transforms
        self.on_error = on_error
        self.with_targets = with_targets
        self.skipped = 0
        data, problems = load_panoptic_json(json_file, by_image=True)
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
        png_path = os.path.join(self.png_dir, annotation["file_name"])
        for path in (image_path, png_path) if self.with_targets else (image_path,):
            if not os.path.isfile(path):
                raise PanopticFormatError(f"{path}: missing file (image_id {image_info['id']})")
        try:
            with Image.open(image_path) as img:
                image = np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:  # PIL: unidentified, truncated, broken chunks
            raise PanopticFormatError(f"{image_path}: cannot read the image (corrupt or truncated?): "
                                      f"{error}") from error
        target: Dict[str, Any] = {}
        if self.with_targets:
            segment_ids = read_id_map(png_path)
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
    problems = check_segments(annotation.get("segments_info", []), ids, counts, meta.contiguous_category_ids,
                              png_name)
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
