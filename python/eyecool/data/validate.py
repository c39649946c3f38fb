"""Check a COCO panoptic data set and report every problem it has, each naming the file and the segment,
instead of failing on the first: ``eyecool validate-data --json F --png-dir D --image-dir D``.

Checked: the JSON's structure (annotations without images and the reverse), missing image and PNG files,
image and PNG of different sizes (or sizes that differ from the JSON's width/height), and per segment the rules
that the reader also enforces (``eyecool.panoptic_format.check_segments``): in the PNG but not the JSON or the reverse,
duplicated ids, unknown categories, ``area`` different from the PNG's pixel count.
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
from PIL import Image

from eyecool.panoptic_format import PanopticFormatError, check_segments, load_panoptic_json, read_id_map

from .coco_panoptic import DatasetMeta


def validate_dataset(json_file: str, png_dir: str, image_dir: Optional[str] = None) -> List[str]:
    """Every problem of the data set, one message each (empty when it is sound). ``image_dir=None`` skips the
    image files."""
    try:
        data, problems = load_panoptic_json(json_file)
    except PanopticFormatError as error:  # names the file already
        return [str(error)]
    try:
        meta = DatasetMeta.from_categories(data["categories"])
    except (KeyError, ValueError) as error:
        return problems + [f"{json_file}: bad 'categories': {error}"]
    images = {img["id"]: img for img in data["images"]}
    for annotation in data["annotations"]:
        png_path = os.path.join(png_dir, annotation["file_name"])
        image_info = images.get(annotation["image_id"])
        image_size = None
        if image_dir is not None and image_info is not None:
            image_path = os.path.join(image_dir, image_info["file_name"])
            if not os.path.isfile(image_path):
                problems.append(f"{image_path}: missing file (image_id {annotation['image_id']})")
            else:
                try:
                    with Image.open(image_path) as img:  # reads the header only
                        image_size = img.size
                except (OSError, SyntaxError, ValueError) as error:
                    problems.append(f"{image_path}: cannot read the image: {error}")
        if not os.path.isfile(png_path):
            problems.append(f"{png_path}: missing file (image_id {annotation['image_id']})")
            continue
        try:
            segment_ids = read_id_map(png_path)
        except PanopticFormatError as error:
            problems.append(str(error))
            continue
        png_size = (segment_ids.shape[1], segment_ids.shape[0])
        if image_size is not None and image_size != png_size:
            problems.append(
                f"{png_path}: PNG is {png_size[0]}x{png_size[1]} (WxH) but its image {image_info['file_name']} is "
                f"{image_size[0]}x{image_size[1]}"
            )
        if image_info is not None and "width" in image_info and "height" in image_info:
            json_size = (int(image_info["width"]), int(image_info["height"]))
            if json_size != png_size:
                problems.append(
                    f"{png_path}: PNG is {png_size[0]}x{png_size[1]} (WxH) but the JSON gives "
                    f"{json_size[0]}x{json_size[1]} for image {image_info['file_name']}"
                )
        ids, counts = np.unique(segment_ids, return_counts=True)
        problems.extend(check_segments(annotation["segments_info"], ids, counts, meta.contiguous_category_ids,
                                       png_path))
    return problems


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate-data",
        help="check a COCO panoptic data set and report every problem",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--json", required=True, help="panoptic_<split>.json")
    parser.add_argument("--png-dir", required=True, help="folder of the panoptic PNGs")
    parser.add_argument("--image-dir", default=None, help="folder of the images (omit to skip image checks)")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    problems = validate_dataset(args.json, args.png_dir, args.image_dir)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found in {args.json}")
        return 1
    print(f"{args.json}: OK")
    return 0

