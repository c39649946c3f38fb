"""The Python API of eyecool, built from a configuration (``eyecool.config.load_config``): the one place that
reads the ``data``, ``solver``, ``eval`` and ``output`` sections and wires the data set, the network
(``eyecool.modeling.build_model``), the PQ evaluator and the training loop together. The commands of
``eyecool.engine.cli`` are thin wrappers over these functions.

    import eyecool
    cfg = eyecool.load_config("demo", ["solver.max_iter=500"])
    eyecool.train(cfg, "out/demo")                       # under torchrun too
    metrics = eyecool.evaluate(cfg, "out/demo/model_final.pth", out_dir="out/demo_eval")
    results = eyecool.predict(cfg, "out/demo/model_final.pth", ["a.jpg", "b.jpg"])
"""
from __future__ import annotations

import json
import logging
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from eyecool.evaluation.panoptic_quality import PQ_KEYS  # the summary's keys, re-exported for the engine's callers
from eyecool.panoptic_format import prediction_annotation, write_panoptic_png

from . import distributed as du
from .checkpoint import load_checkpoint, load_state_dict_checked
from .distributed import DistributedContext, init_distributed
from .events import LOGGER_NAME, ProgressBar, setup_logging
from .sampling import ShardSampler, build_training_stream
from .schedule import WarmupMultiStepLR, build_optimizer
from .trainer import Trainer

logger = logging.getLogger(LOGGER_NAME + ".engine")

EVAL_METRICS_FILE = "metrics_eval.json"
PREDICTIONS_DIR = "predictions"
ImageLike = Union[str, np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------------------- data


def split_files(cfg, split: str) -> Tuple[str, str, str]:
    """``(image_dir, json_file, png_dir)`` of ``split`` ("train" or "val"), relative paths under ``data.root``."""
    d = cfg.data
    names = {"train": (d.train_image_dir, d.train_json, d.train_png_dir),
             "val": (d.val_image_dir, d.val_json, d.val_png_dir)}[split]
    return tuple(p if os.path.isabs(p) else os.path.join(d.root, p) for p in names)


def build_dataset(cfg, split: str, is_train: Optional[bool] = None):
    """The ``split`` data set with the configuration's transforms (``eyecool.data.build_transforms``: resize to
    ``data.min_size`` / ``data.max_size``, a random flip in training when ``data.flip``, normalisation). The val
    split is read without training targets: the evaluator reads each gt PNG itself, once."""
    from eyecool.data import CocoPanopticDataset, build_transforms

    is_train = split == "train" if is_train is None else is_train
    image_dir, json_file, png_dir = split_files(cfg, split)
    transforms = build_transforms(is_train, cfg.data.min_size, cfg.data.max_size, 0.5 if cfg.data.flip else 0.0)
    return CocoPanopticDataset(image_dir, json_file, png_dir, transforms=transforms, on_error=cfg.data.on_error,
                               with_targets=split == "train")


def _build_model(cfg, categories: Sequence[Dict[str, Any]], device: torch.device):
    from eyecool.data import DatasetMeta
    from eyecool.modeling import build_model

    meta = DatasetMeta.from_categories(categories)
    return build_model(cfg, stuff_category_ids=meta.stuff_ids, thing_category_ids=meta.thing_ids).to(device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _per_process_batch(cfg, ctx: DistributedContext) -> int:
    total = cfg.solver.ims_per_batch
    if total % ctx.world_size:
        raise ValueError(f"solver.ims_per_batch={total} is the total over all processes and must be divisible by "
                         f"their number ({ctx.world_size})")
    return total // ctx.world_size


# ---------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def inference_on_dataset(model: torch.nn.Module, dataset, ctx: DistributedContext, *, batch_size: int = 1,
                         num_workers: int = 0, max_images: Optional[int] = None,
                         prediction_dir: Optional[str] = None) -> Dict[str, float]:
    """Run ``model`` (eval mode) over ``dataset``'s images, this rank's share of them, and return the PQ summary
    (keys :data:`PQ_KEYS`, x100) gathered over all ranks.

    ``prediction_dir``: also write the predictions in COCO panoptic format there (one PNG per image, written by
    the rank that predicted it, and ``predictions.json``, written by rank 0).
    """
    from eyecool.data import collate_panoptic
    from eyecool.evaluation import PanopticEvaluator, summary

    # The data set's parsed annotations: the gt JSON is not parsed again.
    gt_json = {"annotations": dataset.annotations, "categories": dataset.meta.to_categories()}
    evaluator = PanopticEvaluator(gt_json, dataset.png_dir, allow_missing_images=max_images is not None,
                                  verbose=ctx.is_main)
    sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size, limit=max_images)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_panoptic)
    if prediction_dir is not None:
        os.makedirs(prediction_dir, exist_ok=True)
    was_training = model.training
    model.eval()
    annotations = []
    progress = ProgressBar(len(loader), label="eval", enabled=None if ctx.is_main else False)
    for images, image_sizes, targets in loader:
        outputs = model(images.to(ctx.device), image_sizes, orig_sizes=[t["orig_size"] for t in targets])
        for target, output in zip(targets, outputs):
            panoptic_seg = output["panoptic_seg"]
            evaluator.update(target["image_id"], panoptic_seg, output["segments_info"])
            if prediction_dir is not None:
                ids = panoptic_seg.cpu().numpy()
                file_name = os.path.splitext(target["file_name"])[0] + ".png"
                write_panoptic_png(os.path.join(prediction_dir, file_name), ids)
                annotations.append(prediction_annotation(target["image_id"], file_name, ids,
                                                         output["segments_info"]))
        progress.update()
    progress.close()
    model.train(was_training)
    # Collective: every rank contributes its images' statistics (and its annotations below).
    results = evaluator.summarize()
    if prediction_dir is not None:
        gathered = [a for rank_annotations in du.all_gather_object(annotations) for a in rank_annotations]
        if ctx.is_main:
            order = {image["id"]: i for i, image in enumerate(dataset.images)}
            gathered.sort(key=lambda a: order[a["image_id"]])
            with open(os.path.join(prediction_dir, "predictions.json"), "w", encoding="utf-8") as f:
                json.dump({"annotations": gathered, "categories": dataset.meta.to_categories()}, f)
    return summary(results)


def _write_eval_metrics(results: Dict[str, float], out_dir: str) -> str:
    path = os.path.join(out_dir, EVAL_METRICS_FILE)
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: results[k] for k in PQ_KEYS}, f, indent=1)
    return path


# ------------------------------------------------------------------------------------------------ the API


def train(cfg, out_dir: str, resume: bool = False) -> Dict[str, float]:
    """Train the network of ``cfg`` on the train split, writing checkpoints, ``metrics.json``, ``config.yaml``
    and ``log.txt`` to ``out_dir``; evaluate periodically (``eval.period``) and at the end on the val split.

    The final evaluation also writes the predictions (``out_dir/predictions/``) and ``metrics_eval.json``.
    Returns the final PQ summary (on rank 0; other ranks get the same dict). Under ``torchrun`` every process
    calls it; ``solver.ims_per_batch`` is the total batch over all processes.
    """
    from eyecool.config import save_config

    ctx = init_distributed(cfg.device)
    setup_logging(out_dir, ctx.rank)
    # The data sets are opened (and their JSON checked) first: a run that fails on bad data overwrites nothing.
    train_set = build_dataset(cfg, "train")
    val_set = build_dataset(cfg, "val")
    if ctx.is_main:
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
        logger.info(f"configuration saved to {os.path.join(out_dir, 'config.yaml')}")
    categories = train_set.meta.to_categories()
    # The model is initialised from the run's seed on every rank (DDP then broadcasts rank 0's weights anyway);
    # the training draws (sampling of anchors, ROIs, kept instances) use seed + rank so the ranks differ.
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, categories, ctx.device)
    _seed_everything(cfg.seed + ctx.rank)
    batch = _per_process_batch(cfg, ctx)
    s = cfg.solver
    optimizer = build_optimizer(model, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = WarmupMultiStepLR(optimizer, milestones=s.steps, gamma=s.gamma, warmup_iters=s.warmup_iters,
                                  warmup_factor=s.warmup_factor)

    def stream_factory(start_batch: int):
        from eyecool.data import collate_panoptic

        return build_training_stream(train_set, batch, collate_panoptic, rank=ctx.rank, world_size=ctx.world_size,
                                     seed=cfg.seed, num_workers=cfg.data.num_workers, start_batch=start_batch,
                                     pin_memory=ctx.device.type == "cuda")

    def evaluate_fn(unwrapped_model, final: bool) -> Dict[str, float]:
        return inference_on_dataset(unwrapped_model, val_set, ctx, batch_size=batch,
                                    num_workers=cfg.data.num_workers, max_images=cfg.eval.max_images,
                                    prediction_dir=os.path.join(out_dir, PREDICTIONS_DIR) if final else None)

    trainer = Trainer(
        model, optimizer, scheduler, stream_factory, max_iter=s.max_iter, ctx=ctx, out_dir=out_dir, amp=s.amp,
        clip_grad=s.clip_grad, nonfinite=s.nonfinite_loss,
        checkpoint_period=cfg.output.checkpoint_period, eval_period=cfg.eval.period,
        log_period=cfg.output.log_period, tensorboard=cfg.output.tensorboard, evaluate_fn=evaluate_fn,
        config=cfg.to_dict(),
        extra_state={"categories": categories},
        # A head may get no gradient in a step (e.g. the mask head when a batch has no positive ROI): DDP must
        # not wait for those gradients.
        find_unused_parameters=True)
    if resume:
        trainer.resume()
    results = trainer.train()
    if ctx.is_main and results:
        _write_eval_metrics(results, out_dir)
    return results


def _load_for_inference(cfg, weights: str, ctx: DistributedContext, categories=None):
    state = load_checkpoint(weights, map_location="cpu")
    if categories is None:
        categories = state.get("categories")
    if categories is None:
        from eyecool.data import DatasetMeta

        categories = DatasetMeta.from_json_file(split_files(cfg, "val")[1]).to_categories()
    model = _build_model(cfg, categories, ctx.device)
    load_state_dict_checked(model, state["model"], weights)  # CheckpointError for another configuration
    model.eval()
    return model, categories


def evaluate(cfg, weights: str, out_dir: Optional[str] = None) -> Dict[str, float]:
    """PQ of the checkpoint ``weights`` on the val split (``eval.max_images`` limits it): the summary dict with
    the keys :data:`PQ_KEYS` (x100). With ``out_dir``: predictions in COCO panoptic format under
    ``out_dir/predictions/`` and the summary in ``out_dir/metrics_eval.json``. Runs under torchrun too (each
    process evaluates its share; rank 0 gets the total)."""
    ctx = init_distributed(cfg.device)
    setup_logging(out_dir, ctx.rank)
    val_set = build_dataset(cfg, "val")
    model, _ = _load_for_inference(cfg, weights, ctx, categories=val_set.meta.to_categories())
    results = inference_on_dataset(
        model, val_set, ctx, batch_size=max(1, cfg.solver.ims_per_batch // ctx.world_size),
        num_workers=cfg.data.num_workers, max_images=cfg.eval.max_images,
        prediction_dir=os.path.join(out_dir, PREDICTIONS_DIR) if out_dir else None)
    if out_dir and ctx.is_main:
        _write_eval_metrics(results, out_dir)
    return results


def _as_uint8_image(image: ImageLike) -> np.ndarray:
    if isinstance(image, str):
        with Image.open(image) as img:
            return np.asarray(img.convert("RGB"))
    if torch.is_tensor(image):
        image = image.cpu().numpy()
        if image.ndim == 3 and image.shape[0] == 3:
            image = image.transpose(1, 2, 0)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return image


@torch.no_grad()
def predict(cfg, weights: str, images: Sequence[ImageLike], batch_size: int = 1) -> List[Dict[str, Any]]:
    """Panoptic segmentation of ``images`` (file paths, uint8 ``[H, W, 3]`` arrays, or ``[3, H, W]`` tensors).

    Returns one dict per image: ``panoptic_seg`` int64 ``[H, W]`` numpy (0 = void) at the image's own size,
    ``segments_info`` (``id``, ``category_id``, ``isthing``, ``area``, ``bbox``, ``score`` for things),
    ``image`` (the uint8 RGB input) and ``categories`` (the label space, for drawing).
    """
    ctx = DistributedContext(0, 1, 0, torch.device(cfg.device))
    model, categories = _load_for_inference(cfg, weights, ctx)
    from eyecool.data import build_transforms, collate_panoptic

    transforms = build_transforms(False, cfg.data.min_size, cfg.data.max_size)

    arrays = [_as_uint8_image(image) for image in images]
    results = []
    for start in range(0, len(arrays), batch_size):
        chunk = arrays[start:start + batch_size]
        items = []
        for array in chunk:
            tensor, _ = transforms(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), {})
            items.append({"image": tensor})
        batch_images, sizes, _ = collate_panoptic(items)
        outputs = model(batch_images.to(ctx.device), sizes, orig_sizes=[a.shape[:2] for a in chunk])
        for array, output in zip(chunk, outputs):
            ids = output["panoptic_seg"].cpu().numpy()
            annotation = prediction_annotation(None, "", ids, output["segments_info"])
            isthing = {c["id"]: c["isthing"] for c in categories}
            for segment in annotation["segments_info"]:
                segment["isthing"] = int(isthing[segment["category_id"]])
            results.append({"panoptic_seg": ids, "segments_info": annotation["segments_info"], "image": array,
                            "categories": categories})
    return results
