"""The demo: the whole pipeline on the synthetic data set, on a CPU, in minutes (``eyecool demo``, ``make demo``).

1. write the synthetic data set (COCO panoptic format) to ``DIR/data``;
2. train the shipped ``demo`` configuration (``eyecool/configs/demo.yaml``) on it (``eyecool.train``:
   ``DIR/model_final.pth``, ``DIR/metrics.json``, ...);
3. evaluate on the val split (``DIR/metrics_eval.json``, predictions in ``DIR/predictions/``);
4. draw input / ground truth / prediction for a few val images (``DIR/vis/``) and the loss curves
   (``DIR/loss.png``).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image

from .events import LOGGER_NAME, setup_logging

logger = logging.getLogger(LOGGER_NAME + ".demo")

DEFAULT_CONFIG = "demo"  # shipped in eyecool/configs (package data: found from a checkout or an installed wheel)
# Synthetic set of the demo: the generator's scenes at 128 pixels (the demo model's input size).
DEMO_NUM_TRAIN = 400
DEMO_NUM_VAL = 50
DEMO_IMAGE_SIZE = 128
DEMO_NUM_VIS = 8


def draw_validation_examples(data_root: str, prediction_dir: str, vis_dir: str, num_images: int,
                             val_json: str, val_png_dir: str, val_image_dir: str) -> int:
    """For the first ``num_images`` predictions: a sheet input | ground truth | prediction in ``vis_dir``.
    Returns the number of sheets written."""
    from eyecool.panoptic_format import load_json, read_id_map
    from eyecool.visualize import draw_panoptic, save_image, side_by_side

    predictions = load_json(os.path.join(prediction_dir, "predictions.json"))
    gt = load_json(val_json)
    gt_by_image = {a["image_id"]: a for a in gt["annotations"]}
    images = {i["id"]: i for i in gt["images"]}
    categories = gt["categories"]
    written = 0
    for prediction in predictions["annotations"][:num_images]:
        image_info = images[prediction["image_id"]]
        gt_ann = gt_by_image[prediction["image_id"]]
        with Image.open(os.path.join(val_image_dir, image_info["file_name"])) as img:
            image = np.asarray(img.convert("RGB"))
        gt_picture = draw_panoptic(image, read_id_map(os.path.join(val_png_dir, gt_ann["file_name"])),
                                   gt_ann["segments_info"], categories)
        pred_picture = draw_panoptic(image, read_id_map(os.path.join(prediction_dir, prediction["file_name"])),
                                     prediction["segments_info"], categories)
        plain = np.asarray(Image.fromarray(image).resize(gt_picture.shape[1::-1], Image.BILINEAR))
        sheet = side_by_side([plain, gt_picture, pred_picture], ["input", "ground truth", "prediction"])
        save_image(os.path.join(vis_dir, os.path.splitext(image_info["file_name"])[0] + ".png"), sheet)
        written += 1
    return written


def run_demo(out_dir: str, config: Optional[str] = None, overrides: Sequence[str] = (),
             num_train: int = DEMO_NUM_TRAIN, num_val: int = DEMO_NUM_VAL, num_vis: int = DEMO_NUM_VIS,
             image_size: int = DEMO_IMAGE_SIZE) -> Dict[str, float]:
    """Run the demo into ``out_dir``; returns the PQ summary of the val split."""
    from eyecool.config import config_file, load_config
    from eyecool.data import generate_synthetic_dataset
    from eyecool.engine.api import PREDICTIONS_DIR, split_files, train
    from eyecool.visualize import plot_loss_curves

    start = time.perf_counter()
    setup_logging(out_dir)
    config = config or DEFAULT_CONFIG
    config_file(config)  # FileNotFoundError naming the shipped configurations, before any data is written
    data_root = os.path.join(out_dir, "data")
    generate_synthetic_dataset(data_root, num_train, num_val, size=image_size, seed=0)
    logger.info(f"synthetic data set ({num_train} train, {num_val} val images of {image_size} px) in "
                f"{data_root}: {time.perf_counter() - start:.1f} s")
    cfg = load_config(config, [f"data.root={data_root}"] + list(overrides))
    results = train(cfg, out_dir)
    image_dir, json_file, png_dir = split_files(cfg, "val")
    count = draw_validation_examples(data_root, os.path.join(out_dir, PREDICTIONS_DIR), os.path.join(out_dir, "vis"),
                                     num_vis, json_file, png_dir, image_dir)
    plot_loss_curves(os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "loss.png"))
    logger.info(f"demo finished in {time.perf_counter() - start:.0f} s: PQ {results['PQ']:.1f} "
                f"(things {results['PQ_th']:.1f}, stuff {results['PQ_st']:.1f}); {count} pictures in "
                f"{os.path.join(out_dir, 'vis')}, loss curves in {os.path.join(out_dir, 'loss.png')}")
    return results
