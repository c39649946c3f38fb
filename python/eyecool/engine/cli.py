"""``eyecool train | eval | predict | demo``: thin wrappers over :mod:`eyecool.engine.api` (and, for ``demo``,
:func:`eyecool.engine.demo.run_demo`). Configuration = ``--config FILE|NAME`` (a YAML
file, or the name of one shipped in ``eyecool/configs``: ``demo``, ``eyecool_r50_dam``, ...) plus ``key=value``
overrides::

    eyecool train --config eyecool_r50_dam --out out/r50 solver.ims_per_batch=8 [--resume]
    torchrun --nproc_per_node=8 -m eyecool train --config eyecool_r50_dam device=cuda   # to output.dir
    eyecool eval --config eyecool_r50_dam --weights out/r50/model_final.pth --out out/r50_eval
    eyecool predict --config demo --weights out/demo/model_final.pth a.jpg b.jpg --out vis/
    eyecool demo --out out/demo
    eyecool export --weights out/demo/model_final.pth --out out/demo/model.onnx
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Sequence


def _load(config: str, overrides: Sequence[str]):
    from eyecool.config import load_config

    return load_config(config, list(overrides))


def _add_config_arguments(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("--config", required=config_required,
                        help="YAML configuration: a file, or the name of a shipped one (demo, eyecool_r50_dam, "
                             "eyecool_r152, eyecool_r152_rff, upsnet_r50)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="configuration overrides, e.g. solver.max_iter=100 model.rff.mode=prob")


def _split_overrides(values: Sequence[str]) -> (List[str], List[str]):
    """``predict`` takes image paths and overrides in one positional list: overrides contain ``=``."""
    overrides = [v for v in values if "=" in v and not os.path.exists(v)]
    images = [v for v in values if v not in overrides]
    return images, overrides


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a model (one process, or every process under torchrun)",
                                  description="Train on the configuration's train split; checkpoints, "
                                              "metrics.json, config.yaml and the final evaluation go to --out "
                                              "(default: output.dir).")
    _add_config_arguments(train)
    train.add_argument("--out", default=None, help="output folder (default: the configuration's output.dir)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last_checkpoint")
    train.add_argument("--ims-per-batch", type=int, default=None,
                       help="total batch size; the learning rate is scaled linearly from the configuration's")
    train.set_defaults(func=_train)

    evaluate = subparsers.add_parser("eval", help="PQ of a checkpoint on the val split",
                                     description="Inference over the val split, PQ, predictions in COCO "
                                                 "panoptic format and metrics_eval.json under --out.")
    _add_config_arguments(evaluate)
    evaluate.add_argument("--weights", required=True, help="checkpoint (.pth)")
    evaluate.add_argument("--out", default=None, help="output folder for predictions/ and metrics_eval.json")
    evaluate.set_defaults(func=_eval)

    predict = subparsers.add_parser("predict", help="panoptic segmentation of image files",
                                    description="Per image: panoptic PNG, segments_info JSON and a visualisation.")
    predict.add_argument("--config", required=True, help="YAML configuration: a file or a shipped name")
    predict.add_argument("--weights", required=True, help="checkpoint (.pth)")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE|key=value", help="image files, then overrides")
    predict.set_defaults(func=_predict)

    demo = subparsers.add_parser("demo", help="synthetic data -> train -> evaluate -> pictures (CPU, minutes)",
                                 description="Generate the synthetic data set, train the demo configuration, evaluate "
                                             "it and write metrics, the model, visualisations and loss.png.")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--config", default=None, help="configuration (default: the shipped demo)")
    demo.add_argument("--num-train", type=int, default=None, help="synthetic training images")
    demo.add_argument("--num-val", type=int, default=None, help="synthetic validation images")
    demo.add_argument("--num-vis", type=int, default=None, help="validation images to draw under OUT/vis")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    demo.set_defaults(func=_demo)

    export = subparsers.add_parser(
        "export", help="a checkpoint -> an ONNX file for onnxruntime (or a torch.export program)",
        description="Export the trained network's inference graph (eyecool.export): ONNX (DeformConv, RoiAlign, "
                    "NonMaxSuppression; the panoptic merge is Python post-processing, "
                    "eyecool.export.OnnxPanopticPredictor) or a torch.export program (.pt2).")
    export.add_argument("--weights", required=True, help="checkpoint (.pth), e.g. out/demo/model_final.pth")
    export.add_argument("--config", default=None,
                        help="YAML configuration (default: the config.yaml that training wrote beside --weights)")
    export.add_argument("--out", required=True, help="the file to write (.onnx; .pt2 for torch-export and aoti)")
    export.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="largest (resized) input image; default data.max_size x data.max_size")
    export.add_argument("--format", choices=("onnx", "torch-export", "aoti"), default="onnx",
                        help="onnx (onnxruntime), torch-export (.pt2 program) or aoti (AOTInductor .pt2 package)")
    export.add_argument("--no-verify", action="store_true",
                        help="skip running the ONNX file in onnxruntime against the eager network")
    export.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    export.set_defaults(func=_export)


def _train(args) -> int:
    from eyecool.engine.api import train
    from eyecool.engine.schedule import linear_scaled_lr

    cfg = _load(args.config, args.overrides)
    if args.ims_per_batch is not None:
        lr = linear_scaled_lr(cfg.solver.lr, cfg.solver.ims_per_batch, args.ims_per_batch)
        cfg = _load(args.config, list(args.overrides) + [f"solver.ims_per_batch={args.ims_per_batch}",
                                                         f"solver.lr={lr}"])
    train(cfg, args.out if args.out is not None else cfg.output.dir, resume=args.resume)
    _end_process_group()
    return 0


def _export(args) -> int:
    from eyecool.export import export_checkpoint

    config = args.config or os.path.join(os.path.dirname(os.path.abspath(args.weights)), "config.yaml")
    if not os.path.isfile(config):
        raise SystemExit(f"eyecool export: no configuration: {config} does not exist (pass --config)")
    result = export_checkpoint(_load(config, args.overrides), args.weights, args.out, args.size, fmt=args.format,
                               verify=args.format == "onnx" and not args.no_verify)
    print(json.dumps(result))
    return 0


def _end_process_group() -> None:
    """After a completed run under torchrun: all ranks meet at a barrier, then the group is destroyed, rather
    than each process tearing its connections down at exit while a peer may still be in its last collective
    (the gloo abort ``cleanup_distributed`` describes). A failed run skips it and exits with its error."""
    from eyecool.engine.distributed import cleanup_distributed

    cleanup_distributed()


def _eval(args) -> int:
    from eyecool.engine.api import evaluate

    results = evaluate(_load(args.config, args.overrides), args.weights, out_dir=args.out)
    _end_process_group()
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))
    return 0


def _predict(args) -> int:
    from eyecool.engine.api import predict
    from eyecool.panoptic_format import write_panoptic_png
    from eyecool.visualize import draw_panoptic, save_image, side_by_side

    images, overrides = _split_overrides(args.inputs)
    missing = [path for path in images if not os.path.isfile(path)]
    if missing:
        print(f"eyecool predict: no such image: {', '.join(missing)}", file=sys.stderr)
        return 2
    cfg = _load(args.config, overrides)
    os.makedirs(args.out, exist_ok=True)
    for path, result in zip(images, predict(cfg, args.weights, images)):
        stem = os.path.splitext(os.path.basename(path))[0]
        write_panoptic_png(os.path.join(args.out, stem + "_panoptic.png"), result["panoptic_seg"])
        with open(os.path.join(args.out, stem + "_segments.json"), "w", encoding="utf-8") as f:
            json.dump({"file_name": stem + "_panoptic.png", "segments_info": result["segments_info"]}, f, indent=1)
        overlay = draw_panoptic(result["image"], result["panoptic_seg"], result["segments_info"],
                                result["categories"])
        save_image(os.path.join(args.out, stem + "_vis.png"),
                   side_by_side([result["image"], overlay], ["input", "panoptic prediction"]))
        print(f"{path}: {len(result['segments_info'])} segments -> {os.path.join(args.out, stem)}_*.png/json")
    return 0


def _demo(args) -> int:
    from eyecool.engine.demo import run_demo

    kwargs = {k: v for k, v in (("num_train", args.num_train), ("num_val", args.num_val),
                                ("num_vis", args.num_vis)) if v is not None}
    results = run_demo(args.out, config=args.config, overrides=args.overrides, **kwargs)
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))
    return 0
