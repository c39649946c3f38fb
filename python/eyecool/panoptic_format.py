"""The COCO panoptic format, in one place: the data reader (``eyecool.data``), the evaluation
(``eyecool.evaluation``), the engine's prediction writer and the demo import it instead of restating it. It
imports nothing of eyecool (it is the ground floor); the compiled PNG reader of ``eyecool_ext`` is used when it
is there.

The format (docs/design.md section 7): ``panoptic_<split>.json`` lists ``images``, ``annotations``
(``image_id``, ``file_name`` of the PNG, ``segments_info``: ``id``, ``category_id``, ``iscrowd``, ``area``,
``bbox``) and ``categories`` (``id``, ``name``, ``isthing``); a PNG per image stores the segment id
``R + 256 G + 256^2 B`` of every pixel, 0 (:data:`VOID_ID`) for void. The segment rule
(:func:`segment_mismatches`): the non-void ids of a PNG and the ids its ``segments_info`` lists are the same set.

Inconsistent data is a :class:`PanopticFormatError` (a ``ValueError``) whose message names the file or image and
the segment; :class:`PanopticFormatWarning` is its lenient twin, for problems that the evaluation scores as
panopticapi does.
"""
from __future__ import annotations

import gc
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

VOID_ID = 0
# COCO's 133 panoptic categories (panopticapi's panoptic_coco_categories.json), shipped as package data.
COCO_CATEGORIES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                    "coco_panoptic_categories.json")


class PanopticFormatError(ValueError):
    """Data that breaks the COCO panoptic format: a PNG and its ``segments_info`` disagree, an unknown category,
    a missing key, a file that cannot be read, two sizes. The message names the file or image and the segment."""


class PanopticFormatWarning(UserWarning):
    """Inconsistent annotations that ``eyecool.evaluation.pq_compute`` scores as panopticapi does
    (``strict=False``): the message names the image and the segment; ``strict=True`` raises
    :class:`PanopticFormatError` instead."""


# ---------------------------------------------------------------------------------------------------------------
# Ids and colours


def rgb2id(color: np.ndarray) -> np.ndarray:
    """Segment ids of a panoptic PNG's pixels: ``[H, W, 3]`` uint8 -> ``[H, W]`` uint32 (R + 256 G + 256^2 B)."""
    color = np.asarray(color)
    if color.ndim != 3 or color.shape[2] != 3:
        raise ValueError(f"rgb2id: expected an [H, W, 3] array, got shape {tuple(color.shape)}")
    color = color.astype(np.uint32)
    return color[..., 0] + (color[..., 1] << 8) + (color[..., 2] << 16)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb2id`: ``[H, W]`` integer ids (< 2^24) -> ``[H, W, 3]`` uint8."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise ValueError(f"id2rgb: segment ids must lie in [0, 2^24), got range [{ids.min()}, {ids.max()}]")
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def load_coco_categories() -> List[Dict[str, Any]]:
    """COCO's 133 panoptic categories: 80 things with ids in 1..90 and 53 stuff with ids in 92..200, each with
    ``id``, ``name``, ``isthing``, ``color``, ``supercategory``."""
    with open(COCO_CATEGORIES_FILE) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# PNGs


def read_id_map(path: str, image_id: Any = None) -> np.ndarray:
    """A panoptic PNG -> ``int32 [H, W]`` segment ids (``R + 256 G + 256^2 B``).

    8-bit RGB/RGBA PNGs (all panoptic PNGs) are read by the compiled reader (``eyecool_ext.ops.read_panoptic_png``:
    one GIL-free C++ call); any other kind, and everything when the extension is not compiled, by PIL.

    Raises:
        FileNotFoundError: no file at ``path``. PanopticFormatError: a file that is no readable image (corrupt
            or truncated); both messages name the file (and ``image_id`` when given).
    """
    from eyecool_ext import ops

    ids = ops.read_panoptic_png(path)
    if ids is not None:
        return ids.numpy()
    from PIL import Image

    where = f"image {image_id}: panoptic PNG {path}" if image_id is not None else str(path)
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL: unidentified, truncated, broken chunks
        raise PanopticFormatError(f"{where}: cannot read the panoptic PNG (corrupt or truncated?): {error}") from error
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def write_panoptic_png(path: str, panoptic_seg: np.ndarray) -> None:
    """Writes ``[H, W]`` integer segment ids (< 2^24) as a panoptic PNG (RGB)."""
    from PIL import Image

    Image.fromarray(id2rgb(panoptic_seg)).save(path)


def prediction_annotation(image_id: Any, file_name: str, panoptic_seg: np.ndarray,
                          segments_info: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The COCO panoptic annotation of one prediction: ``{"image_id", "file_name", "segments_info"}`` with each
    segment's ``id``, ``category_id``, ``iscrowd`` 0, ``area`` and ``bbox`` ``[x, y, w, h]`` measured on the
    ``[H, W]`` id map (and ``score`` when given). Segments without pixels are left out."""
    panoptic_seg = np.asarray(panoptic_seg)
    segments = []
    for segment in segments_info:
        ys, xs = np.nonzero(panoptic_seg == segment["id"])
        if len(xs) == 0:
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        entry = {"id": int(segment["id"]), "category_id": int(segment["category_id"]), "iscrowd": 0,
                 "area": int(len(xs)), "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]}
        if "score" in segment:
            entry["score"] = float(segment["score"])
        segments.append(entry)
    return {"image_id": image_id, "file_name": file_name, "segments_info": segments}


# ---------------------------------------------------------------------------------------------------------------
# The segment rules


def segment_mismatches(png_ids: np.ndarray, listed_ids: np.ndarray, where: str, what: str = "",
                       excused_ids: Iterable[int] = ()) -> List[str]:
    """Where the non-void ids of a PNG and its ``segments_info`` are not the same set: one message for the ids
    in the PNG only, one for the listed ids not in the PNG (none when they agree).

    Args:
        png_ids: ids seen in the PNG (any shape, repeats allowed).
        listed_ids: the ids its ``segments_info`` lists.
        where: names the file or image in the messages; ``what``: the side (``"gt "``, ``"prediction "``, or
            ``""``).
        excused_ids: ids of the PNG reported already (e.g. listed with an unknown category), not repeated here.
    """
    png_ids = np.unique(np.asarray(png_ids, dtype=np.int64))
    listed_ids = np.unique(np.asarray(listed_ids, dtype=np.int64))
    messages = []
    unlisted = np.setdiff1d(png_ids[png_ids != VOID_ID], listed_ids, assume_unique=True)
    excused = np.asarray(list(excused_ids), dtype=np.int64)
    if len(excused):
        unlisted = np.setdiff1d(unlisted, excused, assume_unique=True)
    if len(unlisted):
        messages.append(f"{where}: {what}segment {int(unlisted[0])} is in the PNG but not in its segments_info "
                        f"(segments in the PNG only: {unlisted.tolist()})")
    absent = np.setdiff1d(listed_ids, png_ids, assume_unique=True)
    if len(absent):
        messages.append(f"{where}: {what}segment {int(absent[0])} is in segments_info but not in the PNG "
                        f"(segments in the JSON only: {absent.tolist()})")
    return messages


def check_segments(segments_info: Sequence[Mapping[str, Any]], png_ids: np.ndarray, png_counts: np.ndarray,
                   category_ids: Iterable[int], where: str) -> List[str]:
    """Every problem of one annotation against its PNG (empty when it is sound): a segment id listed twice or
    the void id 0, an unknown ``category_id``, :func:`segment_mismatches`, and an ``area`` that differs from the
    PNG's pixel count.

    Args:
        segments_info: the annotation's segments.
        png_ids, png_counts: the PNG's distinct ids and their pixel counts (``np.unique(..., return_counts=True)``).
        category_ids: the categories the JSON lists.
        where: names the file in the messages.
    """
    known = {int(c) for c in category_ids}
    problems = []
    listed: Dict[int, Mapping[str, Any]] = {}
    for segment in segments_info:
        segment_id = int(segment["id"])
        if segment_id in listed:
            problems.append(f"{where}: segments_info lists segment {segment_id} twice")
        if segment_id == VOID_ID:
            problems.append(f"{where}: segments_info lists segment id 0, which means void")
        listed[segment_id] = segment
        if int(segment["category_id"]) not in known:
            problems.append(f"{where}: segment {segment_id} has unknown category_id {segment['category_id']}")
    png_ids = np.asarray(png_ids, dtype=np.int64)
    problems += segment_mismatches(png_ids, np.array(list(listed), dtype=np.int64), where)
    pixels = dict(zip(png_ids.tolist(), np.asarray(png_counts).tolist()))
    for segment_id, segment in listed.items():
        area = segment.get("area")
        if segment_id in pixels and area is not None and int(area) != pixels[segment_id]:
            problems.append(f"{where}: segment {segment_id} has area {int(area)} in the JSON but "
                            f"{pixels[segment_id]} pixels in the PNG")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# JSON


def load_json(path: str):
    """json.load with the cyclic garbage collector paused: a COCO JSON is hundreds of thousands of new containers,
    each allocation burst triggers a full collection that traverses all of them, and none of them is garbage."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    finally:
        if was_enabled:
            gc.enable()


def load_panoptic_json(json_file: str, by_image: bool = False) -> Tuple[Dict[str, Any], List]:
    """The JSON and the problems found in it alone (no PNG opened): missing keys, images listed twice,
    annotations without an image entry and images without an annotation. Per-segment problems are
    :func:`check_segments`'s.

    The entries with missing keys are dropped from the returned data, so the rest can be read. With
    ``by_image`` each problem is ``(image_id, message)``, ``image_id`` None for a problem of the whole file.

    Raises:
        PanopticFormatError: the file cannot be read or is no JSON object.
    """
    try:
        data = load_json(json_file)
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
    return data, problems if by_image else [message for _, message in problems]


__all__ = ["VOID_ID", "COCO_CATEGORIES_FILE", "PanopticFormatError", "PanopticFormatWarning", "rgb2id", "id2rgb",
           "load_coco_categories", "read_id_map", "write_panoptic_png", "prediction_annotation",
           "segment_mismatches", "check_segments", "load_json", "load_panoptic_json"]
