"""Deployment: the trained network's inference graph as ONNX (for onnxruntime) or as a ``torch.export`` program.

What is exported (:class:`InferenceNetwork`): one image, zero-padded to a fixed size chosen at export, and its
unpadded size (a runtime input, so one file serves every image that fits) -> everything the network computes:

=================  ==================================  ==================================================
output             shape                               meaning
=================  ==================================  ==================================================
``sem_logits``     ``[1, S + K, Hp / 4, Wp / 4]``      semantic logits, stuff first, 1/4 scale
``boxes``          ``[D, 4]`` float32                  detections (x1, y1, x2, y2) in input pixels
``scores``         ``[D]`` float32                     their scores
``classes``        ``[D]`` int64                       thing index 0..K-1
``mask_logits``    ``[D, 28, 28]`` float32             the class's mask logits (before sigmoid)
=================  ==================================  ==================================================

with ``D <= detections_per_image`` (data-dependent). The ops map onto ONNX as ``eyecool_ext.onnx`` describes:
deformable convolutions -> ``DeformConv``, the FPN poolers -> ``RoiAlign`` with the level assignment in ONNX
ops, RFF -> its composition, and both NMS (RPN, box head) -> ``NonMaxSuppression``.

The panoptic merge is **not** in the graph: :func:`postprocess` runs it in Python on the exported outputs, with
the same code as the eager model (``eyecool.modeling.panoptic_inference``: the fused
``upsnet_panoptic_merge`` kernel, or its PyTorch reference where the extension is missing). Why: its steps are
sequential and data-dependent (greedy removal of masks covered by higher-scored masks of the same class, stuff
regions below an area limit become void, segment ids and ``segments_info`` are a variable-length table), and
the merge over UPSNet's stack written in ONNX would materialise ``[S + D + 1, H, W]`` logits (hundreds of MB at
800x1216 with 100 detections) where the kernel keeps one pass per pixel. The settings it needs (category ids,
thresholds, input normalisation, the export size) travel in the ONNX file's metadata (key ``eyecool``), so
:class:`OnnxPanopticPredictor` needs only the ``.onnx`` file.

Both NMS use a fixed per-class offset (``max(Hp, Wp) + 1``, boxes are clipped to the image) instead of
torchvision's ``batched_nms`` data-dependent one; that also removes its ``if boxes.numel() == 0`` branch, the
data-dependent guard on which ``torch.export`` failed.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from eyecool.modeling.boxes import clip_boxes, decode_boxes
from eyecool.modeling.operators import pool_rois
from eyecool.modeling.panoptic_inference import panoptic_inference
from eyecool.modeling.rpn import _RPN_BOX_WEIGHTS, _flatten_level

OUTPUT_NAMES = ("sem_logits", "boxes", "scores", "classes", "mask_logits")
INPUT_NAMES = ("image", "image_size")
METADATA_KEY = "eyecool"


def _offset_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, offset: float) -> Tensor:
    """NMS within each group (torchvision's coordinate trick with a fixed offset): boxes ``[N, 4]`` inside
    ``[0, offset)``, scores ``[N]``, groups ``[N]`` int64 -> kept indices ``[M]`` by decreasing score."""
    shifted = boxes + (groups.to(boxes.dtype) * offset)[:, None]
    return torchvision.ops.nms(shifted, scores, iou_threshold)


class InferenceNetwork(nn.Module):
    """A trained :class:`eyecool.modeling.PanopticModel` at inference, for one padded image, as an exportable
    module: ``forward(image [1, 3, Hp, Wp], image_size [2] int64 (H, W)) -> (sem_logits, boxes, scores, classes,
    mask_logits)`` (see the module doc). It computes what ``PanopticModel`` computes before the panoptic merge,
    step for step, on the model's own modules and parameters.

    Args:
        model: the trained network (its weights are shared, not copied).
        padded_size: ``(Hp, Wp)``, multiples of the model's size divisibility; images up to this size fit.
        pad_detections: run the mask head on a fixed ``detections_per_image`` ROIs (the detections, then empty
            boxes whose rows are dropped) instead of the data-dependent count, so that no convolution has a
            data-dependent batch size: AOTInductor (torch 2.14, CPU) miscompiles a convolution whose batch is an
            unbacked size (reproduced with a ``Conv2d`` over ``x[torch.nonzero(keep)]``: wrong values). Costs the
            mask head's work on the padding rows; the outputs are the same.
    """

    def __init__(self, model: nn.Module, padded_size: Tuple[int, int], pad_detections: bool = False):
        super().__init__()
        div = model.size_divisibility
        hp, wp = (int(v) for v in padded_size)
        if hp <= 0 or wp <= 0 or hp % div or wp % div:
            raise ValueError(f"padded_size must be positive multiples of {div}, got {padded_size}")
        self.model = model
        self.padded_size = (hp, wp)
        self.nms_offset = float(max(hp, wp) + 1)
        self.pad_detections = pad_detections

    def forward(self, image: Tensor, image_size: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        height = image_size[0].to(torch.float32)
        width = image_size[1].to(torch.float32)
        _, sem_logits, _, instance_features, mask_features = m.branch_features(image)
        proposals = self._proposals(instance_features, sem_logits, height, width)
        boxes, scores, classes, mask_logits = self._detections(instance_features[:4], mask_features, proposals,
                                                               height, width)
        return sem_logits, boxes, scores, classes, mask_logits

    def _proposals(self, features: List[Tensor], sem_logits: Tensor, height: Tensor, width: Tensor) -> Tensor:
        """``RPN._proposals`` for one image: per level top-k, decode, clip, drop empty boxes, NMS, keep the best."""
        rpn = self.model.rpn
        objectness, deltas = rpn.head(features)
        scores = (rpn.fg_fusion(sem_logits, objectness, rpn.num_stuff, rpn.fusion_mode)
                  if rpn.fg_fusion is not None else objectness)
        anchors = rpn.anchor_generator([tuple(f.shape[-2:]) for f in features], features[0].device)
        pre_nms_topk, post_nms_topk = rpn.pre_nms_topk[1], rpn.post_nms_topk[1]
        level_boxes, level_scores, level_ids = [], [], []
        for level, (a, s, d) in enumerate(zip(anchors, scores, deltas)):
            s = _flatten_level(s, 1).squeeze(-1)[0]  # [N_l]
            d = _flatten_level(d, 4)[0]  # [N_l, 4]
            k = min(pre_nms_topk, s.shape[0])
            top_scores, top_index = s.float().topk(k)
            level_boxes.append(decode_boxes(d[top_index], a[top_index], _RPN_BOX_WEIGHTS))
            level_scores.append(top_scores)
            level_ids.append(torch.full((k,), level, dtype=torch.long, device=s.device))
        boxes = clip_boxes(torch.cat(level_boxes), height, width)
        scores_all = torch.cat(level_scores)
        ids = torch.cat(level_ids)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & torch.isfinite(scores_all)
        keep = torch.nonzero(keep).squeeze(1)
        b, s, lvl = boxes[keep], scores_all[keep], ids[keep]
        kept = _offset_nms(b, s, lvl, rpn.nms_threshold, self.nms_offset)[:post_nms_topk]
        return b[kept]

    def _detections(self, box_features: List[Tensor], mask_features: List[Tensor], proposals: Tensor,
                    height: Tensor, width: Tensor):
        """``ROIHeads.forward_test`` for one image."""
        heads = self.model.roi_heads
        k = heads.num_classes
        rois = torch.cat([torch.zeros_like(proposals[:, :1]), proposals], dim=1)
        class_logits, box_deltas = heads.box_head(pool_rois(heads.backend, box_features, rois, heads.box_pooler_size,
                                                            heads.scales))
        probs = torch.softmax(class_logits.float(), dim=1)[:, :k]
        boxes = decode_boxes(box_deltas.float().view(-1, k, 4), rois[:, None, 1:].expand(-1, k, 4),
                             heads.box_reg_weights)
        boxes = clip_boxes(boxes, height, width)
        scores = probs.reshape(-1)
        boxes = boxes.reshape(-1, 4)
        classes = torch.arange(k, device=probs.device).repeat(proposals.shape[0])
        keep = (scores > heads.score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        keep = torch.nonzero(keep).squeeze(1)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        kept = _offset_nms(boxes, scores, classes, heads.nms_threshold, self.nms_offset)[: heads.detections_per_image]
        boxes, scores, classes = boxes[kept], scores[kept], classes[kept]
        det_rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
        if not self.pad_detections:
            return boxes, scores, classes, heads.mask_logits(mask_features, det_rois, classes).float()
        num, limit = boxes.shape[0], heads.detections_per_image
        torch._check(num <= limit)
        padded_rois = torch.cat([det_rois, det_rois.new_zeros((limit - num, 5))])
        padded_classes = torch.cat([classes, classes.new_zeros((limit - num,))])
        mask_logits = heads.mask_logits(mask_features, padded_rois, padded_classes)[:num].float()
        return boxes, scores, classes, mask_logits


# ------------------------------------------------------------------------------------------ post-processing


def deploy_metadata(model: nn.Module, padded_size: Tuple[int, int], min_size: Optional[int] = None,
                    max_size: Optional[int] = None) -> Dict[str, Any]:
    """What :func:`postprocess` and :class:`OnnxPanopticPredictor` need besides the network's outputs."""
    from eyecool.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    head = model.panoptic_head
    return {"version": 1, "padded_size": list(padded_size), "num_stuff": int(model.num_stuff),
            "stuff_category_ids": [int(c) for c in head.stuff_category_ids],
            "thing_category_ids": [int(c) for c in head.thing_category_ids],
            "score_threshold": head.score_threshold, "nms_threshold": head.nms_threshold,
            "max_instances": head.max_instances, "overlap_threshold": head.overlap_threshold,
            "stuff_area_limit": head.stuff_area_limit, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "min_size": min_size, "max_size": max_size}


def postprocess(outputs: Sequence[Any], image_size: Tuple[int, int], meta: Dict[str, Any],
                orig_size: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, List[dict]]:
    """The panoptic merge on the exported network's outputs: what ``PanopticModel`` does after its heads.

    Args:
        outputs: ``(sem_logits, boxes, scores, classes, mask_logits)`` as numpy arrays or tensors (the ONNX
            session's outputs, in :data:`OUTPUT_NAMES` order).
        image_size: ``(H, W)`` of the image inside the padded input.
        meta: :func:`deploy_metadata` (stored in the ONNX file).
        orig_size: ``(H0, W0)`` to produce the prediction at (the image before resizing); default ``image_size``.

    Returns:
        ``(panoptic_seg [H0, W0] int64 numpy, segments_info)`` as ``PanopticModel`` returns them.
    """
    sem_logits, boxes, scores, classes, mask_logits = (torch.as_tensor(np.asarray(o)) for o in outputs)
    h, w = (int(v) for v in image_size)
    h0, w0 = (int(v) for v in (orig_size if orig_size is not None else image_size))
    padded = tuple(int(v) for v in meta["padded_size"])
    sem_full = F.interpolate(sem_logits.float(), size=padded, mode="bilinear", align_corners=False)
    sem_i = sem_full[0, :, :h, :w]
    scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h])
    panoptic_seg, segments_info = panoptic_inference(
        sem_i, boxes.float() * scale, scores.float(), classes.long(), mask_logits.float(), meta["num_stuff"],
        meta["stuff_category_ids"], meta["thing_category_ids"], output_size=(h0, w0),
        score_threshold=meta["score_threshold"], nms_threshold=meta["nms_threshold"],
        max_instances=meta["max_instances"], overlap_threshold=meta["overlap_threshold"],
        stuff_area_limit=meta["stuff_area_limit"])
    return panoptic_seg.numpy(), segments_info


def pad_image(image: Tensor, padded_size: Tuple[int, int]) -> Tensor:
    """Normalised ``[3, H, W]`` -> ``[1, 3, Hp, Wp]`` zero-padded on the bottom and right."""
    h, w = image.shape[-2:]
    hp, wp = padded_size
    if h > hp or w > wp:
        raise ValueError(f"the image ({h}x{w}) is larger than the exported input size ({hp}x{wp}); export with a "
                         f"larger --size")
    return F.pad(image, (0, wp - w, 0, hp - h))[None]


# ---------------------------------------------------------------------------------------------------- ONNX


def to_onnx(model: nn.Module, path: str, image_size: Tuple[int, int], *, opset_version: int = 19,
            metadata: Optional[Dict[str, Any]] = None) -> str:
    """Export a trained ``PanopticModel``'s inference graph (:class:`InferenceNetwork`) to ONNX at ``path``.

    Uses torch's dynamo exporter (``torch.export`` of the network, then onnxscript, with the eyecool ops'
    translations from ``eyecool_ext.onnx``). The TorchScript exporter handles the eyecool ops too
    (``eyecool_ext.onnx.export(..., dynamo=False)``) but not this network: it traces the output sizes of the
    balanced pyramid's adaptive poolings as tensors and refuses them (made constants, it then lacks the input
    sizes those poolings need).

    Args:
        model: the trained network (put in eval mode; float32).
        path: the ``.onnx`` file to write.
        image_size: ``(H, W)``, the largest (resized) image the file will take; rounded up to the model's size
            divisibility to give the fixed padded input size.
        opset_version: >= 19 (DeformConv).
        metadata: extra settings for :func:`deploy_metadata` (``min_size``, ``max_size`` of the resize).

    Returns:
        ``path``. Inputs ``image [1, 3, Hp, Wp]`` float32 (normalised, zero-padded) and ``image_size [2]`` int64;
        outputs :data:`OUTPUT_NAMES`; the post-processing settings in the metadata under ``eyecool``.
    """
    import onnx

    import eyecool_ext.onnx as eyecool_onnx

    padded = padded_input_size(model, image_size)
    model = model.eval().float()
    net = InferenceNetwork(model, padded).eval()
    example = (torch.zeros(1, 3, *padded), torch.tensor(padded, dtype=torch.int64))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eyecool_onnx.export(net, example, path, dynamo=True, opset_version=opset_version,
                            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), verbose=False)
    proto = onnx.load(path)
    meta = deploy_metadata(model, padded, **(metadata or {}))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(proto, path)
    return path


def padded_input_size(model: nn.Module, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """``(H, W)`` rounded up to the model's size divisibility: the exported input size."""
    div = model.size_divisibility
    if len(image_size) != 2 or min(int(v) for v in image_size) <= 0:
        raise ValueError(f"image_size must be a positive (H, W), got {image_size}")
    return tuple(int(math.ceil(int(v) / div) * div) for v in image_size)


def verify_onnx(model: nn.Module, path: str, image: Optional[Tensor] = None) -> Dict[str, float]:
    """Run the ``.onnx`` file in onnxruntime and :class:`InferenceNetwork` eagerly on one normalised image
    ``[3, h, w]`` (default: random), and report how far apart they are.

    Returns ``{"max_abs_diff_sem_logits", "detections_eager", "detections_onnx", "max_abs_diff_boxes"}``
    (the box difference only when both found the same number of detections, else inf).
    """
    predictor = OnnxPanopticPredictor(path)
    if image is None:
        image = torch.randn(3, *predictor.padded_size, generator=torch.Generator().manual_seed(0))
    net = InferenceNetwork(model.eval(), predictor.padded_size).eval()
    with torch.no_grad():
        eager = net(pad_image(image.float(), predictor.padded_size), torch.tensor(image.shape[-2:]))
    onnx_out = predictor.run(image)
    report = {"max_abs_diff_sem_logits": float(np.abs(onnx_out[0] - eager[0].numpy()).max()),
              "detections_eager": int(eager[1].shape[0]), "detections_onnx": int(onnx_out[1].shape[0])}
    same = report["detections_eager"] == report["detections_onnx"]
    report["max_abs_diff_boxes"] = (float(np.abs(onnx_out[1] - eager[1].numpy()).max()) if same and onnx_out[1].size
                                    else (0.0 if same else float("inf")))
    return report


class OnnxPanopticPredictor:
    """Panoptic segmentation with an exported ``.onnx`` file in onnxruntime (CPU by default), plus the Python
    post-processing (:func:`postprocess`).

    ``predictor(image)`` with a uint8 RGB ``[H, W, 3]`` array (or a path) -> ``(panoptic_seg [H, W] int64,
    segments_info)``; ``run(normalised [3, h, w] tensor)`` -> the raw outputs for an already-preprocessed image.
    """

    def __init__(self, path: str, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=list(providers))
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise ValueError(f"{path} has no '{METADATA_KEY}' metadata: export it with eyecool.export.to_onnx")
        self.meta = json.loads(props[METADATA_KEY])
        self.padded_size = tuple(self.meta["padded_size"])

    def run(self, image: Tensor) -> List[np.ndarray]:
        """Normalised ``[3, h, w]`` float32 -> the network's outputs (:data:`OUTPUT_NAMES`) as numpy arrays."""
        padded = pad_image(image.float(), self.padded_size).numpy()
        size = np.array(image.shape[-2:], dtype=np.int64)
        return self.session.run(list(OUTPUT_NAMES), {"image": padded, "image_size": size})

    def __call__(self, image: Any) -> Tuple[np.ndarray, List[dict]]:
        from eyecool.data.transforms import Normalize, ResizeShortestEdge
        from eyecool.engine.api import _as_uint8_image

        array = _as_uint8_image(image)
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        if self.meta.get("min_size") and self.meta.get("max_size"):
            tensor, _ = ResizeShortestEdge((self.meta["min_size"],), self.meta["max_size"])(tensor, {})
        tensor, _ = Normalize(self.meta["mean"], self.meta["std"])(tensor, {})
        outputs = self.run(tensor)
        return postprocess(outputs, tuple(tensor.shape[-2:]), self.meta, orig_size=array.shape[:2])


def export_checkpoint(cfg, weights: str, path: str, image_size: Optional[Tuple[int, int]] = None,
                      fmt: str = "onnx", verify: bool = False) -> Dict[str, Any]:
    """``model_final.pth`` (+ its configuration) -> ``path``: an ``.onnx`` file (``fmt="onnx"``), a
    ``torch.export`` program saved with ``torch.export.save`` (``fmt="torch-export"``, a ``.pt2``), or an
    AOTInductor package (``fmt="aoti"``, a ``.pt2``, :func:`compile_aoti`).

    ``image_size`` defaults to a square of the configuration's ``data.max_size`` (every image the evaluation
    transforms produce fits). ``verify``: run the ONNX file in onnxruntime against the eager network on a
    random image (:func:`verify_onnx`). Returns ``{"path", "padded_size"[, "verify"]}``.
    """
    from eyecool.engine.api import _load_for_inference
    from eyecool.engine.distributed import DistributedContext

    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    model, _ = _load_for_inference(cfg, weights, ctx)
    size = tuple(image_size) if image_size is not None else (cfg.data.max_size, cfg.data.max_size)
    result: Dict[str, Any] = {"path": path, "padded_size": list(padded_input_size(model, size))}
    if fmt == "torch-export":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.export.save(export_program(model, size), path)
        return result
    if fmt == "aoti":
        compile_aoti(model, size, path)
        return result
    if fmt != "onnx":
        raise ValueError(f"fmt must be 'onnx', 'torch-export' or 'aoti', got {fmt!r}")
    to_onnx(model, path, size, metadata={"min_size": cfg.data.min_size, "max_size": cfg.data.max_size})
    if verify:
        result["verify"] = verify_onnx(model, path)
    return result


# ---------------------------------------------------------------------------------------------- torch.export


def export_program(model: nn.Module, image_size: Tuple[int, int],
                   pad_detections: bool = False) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of :class:`InferenceNetwork` at the padded ``image_size`` (strict=False).

    The program takes ``(image [1, 3, Hp, Wp], image_size [2] int64)`` and returns :data:`OUTPUT_NAMES`; the
    number of detections is an unbacked size (``torch.nonzero`` / NMS), bounded by ``detections_per_image``.
    ``pad_detections``: see :class:`InferenceNetwork` (needed for AOTInductor, :func:`compile_aoti`).
    """
    padded = padded_input_size(model, image_size)
    net = InferenceNetwork(model.eval().float(), padded, pad_detections=pad_detections).eval()
    example = (torch.zeros(1, 3, *padded), torch.tensor(padded, dtype=torch.int64))
    with torch.no_grad():
        return torch.export.export(net, example, strict=False)


def compile_aoti(model: nn.Module, image_size: Tuple[int, int], package_path: str) -> str:
    """AOTInductor: :func:`export_program` (with ``pad_detections``) compiled into a ``.pt2`` package that
    ``torch._inductor.aoti_load_package(path)(image, image_size)`` runs without Python model code (the eyecool
    ops still come from the extension: ``import eyecool_ext`` first). Compiling takes about a minute for the
    tiny test network on 2 cores. Returns the package's path."""
    program = export_program(model, image_size, pad_detections=True)
    os.makedirs(os.path.dirname(os.path.abspath(package_path)), exist_ok=True)
    with torch.no_grad():
        return torch._inductor.aoti_compile_and_package(program, package_path=package_path)
