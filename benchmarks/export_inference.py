"""CPU inference per image: the eager eyecool network against the same network exported to ONNX and run in
onnxruntime (``eyecool.export``), in one run.

    python benchmarks/export_inference.py [--cases demo r50] [--images 5] [--threads N] [--json FILE]

Cases: ``demo`` (``eyecool/configs/demo.yaml``: ResNet-18 + DAM + RFF + deformable semantic branch, 128x128
images) and ``r50`` (``eyecool/configs/eyecool_r50_dam.yaml``, COCO's 133 classes, an 800x1216 image).
Random weights (no checkpoint is downloaded); the box head's score threshold is set to 0 so that every image fills its
``detections_per_image`` (50 / 100) and the mask head, NMS and merge do their full work, as with a trained
model, instead of finding nothing. Per image, both sides produce the panoptic prediction: the eager model
``model(image)``, and onnxruntime's network followed by the Python merge (:func:`eyecool.export.postprocess`);
the Python merge's share is timed on its own. The two sides alternate image by image (``timing.measure_paired``) so
that a shared machine's load weighs on both alike. Ratio = eager time / onnxruntime time (above 1:
onnxruntime is faster). The export time is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import measure, measure_paired  # noqa: E402

CASES = {
    "demo": ("demo", (128, 128),
             ["model.num_stuff=4", "model.num_things=4"]),
    "r50": ("eyecool_r50_dam", (800, 1216),
            ["model.num_stuff=53", "model.num_things=80", "model.backbone.weights=null"]),
}


def cpu_description() -> str:
    """lscpu's model name and whether the CPU has AVX-512 (the kernels' fast path)."""
    name, avx512 = platform.processor() or platform.machine(), False
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
        avx512 = "avx512f" in text
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{name}, {os.cpu_count()} cores, AVX-512 {'yes' if avx512 else 'no'}"


def _image(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.randn(3, h // 16, w // 16, generator=g)
    return torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="nearest")[0] + 0.2 * torch.randn(
        3, h, w, generator=g)


def benchmark(case: str, images: int, threads: int, tmp: str):
    from eyecool.config import load_config
    from eyecool.export import OnnxPanopticPredictor, postprocess, to_onnx
    from eyecool.modeling import build_model

    config, size, overrides = CASES[case]
    cfg = load_config(config, overrides + ["model.roi_heads.score_threshold_test=0.0"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen BN without ImageNet weights: fine for timing
        model = build_model(cfg).eval()
    path = os.path.join(tmp, f"{case}.onnx")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_onnx(model, path, size)
    export_s = time.perf_counter() - t0
    predictor = OnnxPanopticPredictor(path, threads=threads)
    image = _image(size)
    batch = image[None]

    def eager():
        with torch.no_grad():
            return model(batch, [size])[0]

    def onnx():
        return postprocess(predictor.run(image), size, predictor.meta)

    with torch.no_grad():
        detections = int(eager()["instances"]["boxes"].shape[0])
    repeat = max(1, images)
    eager_t, onnx_t = measure_paired(eager, onnx, warmup=1, repeat=repeat, max_seconds=600.0)
    # The merge's share of the onnxruntime side, timed on its own on one set of outputs (the network alone,
    # timed in a separate block, would meet another load on a shared machine than the paired runs did).
    outputs = predictor.run(image)
    merge_t = measure(lambda: postprocess(outputs, size, predictor.meta), warmup=1, repeat=repeat, max_seconds=120.0)
    return {"case": case, "config": config, "size": f"{size[0]}x{size[1]}",
            "detections": detections, "eager_ms": round(eager_t["median_ms"], 1),
            "onnx_ms": round(onnx_t["median_ms"], 1), "merge_ms": round(merge_t["median_ms"], 1),
            "ratio": round(eager_t["median_ms"] / onnx_t["median_ms"], 2), "runs": eager_t["runs"],
            "export_s": round(export_s, 1)}


def markdown_table(rows) -> str:
    lines = ["| case | image | detections | eager eyecool s/image | onnxruntime + merge s/image | "
             "of which the Python merge | eager / onnxruntime | export s |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['case']} ({r['config']}) | {r['size']} | {r['detections']} | {r['eager_ms'] / 1e3:.3f} | "
                     f"{r['onnx_ms'] / 1e3:.3f} | {r['merge_ms'] / 1e3:.3f} | {r['ratio']:.2f}x | "
                     f"{r['export_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["demo", "r50"])
    parser.add_argument("--images", type=int, default=5, help="timed images per side (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of torch and onnxruntime")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    machine = (f"{cpu_description()}; {args.threads} threads; torch {torch.__version__}, onnxruntime "
               f"{onnxruntime.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            print(f"exporting and timing {case} ...", file=sys.stderr, flush=True)
            rows.append(benchmark(case, args.images, args.threads, tmp))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"Machine: {machine}\n")
    print(markdown_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
