"""The configuration of a run: typed defaults (dataclasses), YAML files and ``key=value`` overrides.

The defaults are the Eyecool COCO model (ResNet-50, UPSNet hyperparameters, DAM on, RFF in ``prob`` mode) and
UPSNet's COCO schedule. A YAML file holds only the keys it changes (same nesting as :class:`Config`), and
overrides use dotted keys whose values are parsed as YAML::

    cfg = load_config("demo", overrides=["model.backbone.depth=34", "solver.lr=0.01"])  # a shipped config
    cfg = load_config("runs/my.yaml")          # or any YAML file
    save_config(cfg, "out/config.yaml")       # the full resolved configuration

The shipped configurations are package data (``eyecool/configs/*.yaml``: ``demo``, ``eyecool_r50_dam``,
``eyecool_r152``, ``eyecool_r152_rff``, ``upsnet_r50``), found with ``importlib.resources`` so that a name works
from a source checkout and from an installed wheel alike.

Sections: ``model`` (the network: read only by :func:`eyecool.modeling.build_model`), ``data`` (where the COCO
panoptic files are, input sizes, loader workers), ``solver`` (optimiser and schedule), ``eval`` and ``output``.
Unknown keys and values of the wrong type are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml


# ----------------------------------------------------------------------------------------------- model


@dataclass
class BackboneConfig:
    """ResNet from torchvision's definitions, returning C2..C5 (strides 4..32)."""

    depth: int = 50  # 18, 34, 50, 101 or 152
    weights: Optional[str] = None  # local torchvision-format state dict (e.g. resnet50-0676ba61.pth); never downloaded
    norm: str = "frozen_bn"  # frozen_bn (pretrained), bn or gn (from scratch)
    freeze_at: int = 2  # 0: train everything; 1: freeze the stem; 2: stem + res2 (pretrained COCO default)


@dataclass
class FPNConfig:
    channels: int = 256  # lateral / output width of P2..P6 (also the width of the heads that read them)


@dataclass
class DAMConfig:
    """Dense attention module: balanced pyramid with a non-local block + the semantic-to-mask path."""

    enabled: bool = True
    refine_level: int = 2  # index into P2..P5 of the level the pyramid is balanced at (2 = P4)


@dataclass
class RFFConfig:
    """RPN-FCN fusion: gate RPN objectness by the semantic branch's foreground probability (no parameters)."""

    # off (plain RPN), logit (the paper: logit * fg) or prob (sigmoid(logit) * fg). prob by default, from the
    # ablation (`eyecool ablate`, README "Ablation": 3 seeds, 200 iterations of the demo network): with logit gating
    # the RPN objectness loss stays ~10x higher on every seed (0.27-0.32 vs 0.02-0.03 with prob or without RFF;
    # background anchors drift to probability 0.5, docs/design.md's flaw) and PQ is the lowest of the four rows (36.8 vs
    # 38.0, stuff 67.1 vs 71.1); prob trains the RPN as well as no RFF. The shipped eyecool_r152_rff pins logit
    # to reproduce the report.
    mode: str = "prob"
    detach_fg: bool = True  # fg carries no gradient back into the semantic branch


@dataclass
class SemanticHeadConfig:
    """UPSNet's deformable subnet, shared over P2..P5; its four outputs concatenated form ``sem_feat``."""

    hidden_channels: int = 256  # first deformable conv: fpn -> hidden
    out_channels: int = 128  # second and third: hidden -> out -> out; sem_feat has 4 * out_channels
    deformable: bool = True  # False: plain 3x3 convs (for ablations and fast small runs)


@dataclass
class RPNConfig:
    anchor_sizes: List[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])  # one per P2..P6
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    conv_channels: Optional[int] = None  # width of the shared 3x3 conv; None = fpn.channels
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    batch_size_per_image: int = 256  # sampled anchors per image
    positive_fraction: float = 0.5
    pre_nms_topk_train: int = 2000  # per level
    pre_nms_topk_test: int = 1000  # per level
    post_nms_topk_train: int = 1000  # per image
    post_nms_topk_test: int = 1000  # per image
    nms_threshold: float = 0.7


@dataclass
class ROIHeadsConfig:
    """Box head (2 FC) and mask head (4 conv + deconv), pooling from the (balanced) pyramid P2..P5."""

    batch_size_per_image: int = 512  # sampled ROIs per image
    positive_fraction: float = 0.25
    positive_iou: float = 0.5
    box_pooler_size: int = 7
    box_fc_dim: int = 1024
    box_num_fc: int = 2
    box_reg_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    mask_pooler_size: int = 14  # the mask head outputs 2x this (28)
    mask_conv_dim: int = 256
    mask_num_conv: int = 4
    score_threshold_test: float = 0.05
    nms_threshold_test: float = 0.5
    detections_per_image: int = 100


@dataclass
class PanopticConfig:
    """UPSNet's parameter-free panoptic head: training target and the inference merge's thresholds."""

    keep_fraction: float = 0.7  # training: fraction of non-crowd gt instances kept; the rest become "unknown"
    score_threshold: float = 0.6
    nms_threshold: float = 0.5
    max_instances: int = 100
    overlap_threshold: float = 0.3
    stuff_area_limit: int = 4096  # stuff regions smaller than this (output pixels) become void


@dataclass
class LossWeightsConfig:
    """Each loss is multiplied by its weight in the model's loss dict (UPSNet COCO values)."""

    rpn_cls: float = 1.0
    rpn_loc: float = 1.0
    cls: float = 1.0
    box_reg: float = 1.0
    mask: float = 1.0
    sem: float = 0.2
    panoptic: float = 0.1


@dataclass
class ModelConfig:
    num_stuff: Optional[int] = None  # S; None: taken from the data set's categories
    num_things: Optional[int] = None  # K; None: taken from the data set's categories
    ops: str = "eyecool"  # eyecool (our kernels) or torchvision (torchvision ops + unfused PyTorch; for benchmarks)
    size_divisibility: int = 32
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    dam: DAMConfig = field(default_factory=DAMConfig)
    rff: RFFConfig = field(default_factory=RFFConfig)
    semantic_head: SemanticHeadConfig = field(default_factory=SemanticHeadConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    panoptic: PanopticConfig = field(default_factory=PanopticConfig)
    loss_weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)


# ------------------------------------------------------------------------------------------ data, solver


@dataclass
class DataConfig:
    """A COCO panoptic data set on disk (the synthetic one uses the same layout)."""

    root: str = "datasets/coco"  # the paths below are relative to it unless absolute
    train_json: str = "annotations/panoptic_train2017.json"
    train_png_dir: str = "annotations/panoptic_train2017"
    train_image_dir: str = "train2017"
    val_json: str = "annotations/panoptic_val2017.json"
    val_png_dir: str = "annotations/panoptic_val2017"
    val_image_dir: str = "val2017"
    min_size: int = 800  # shorter side after resizing
    max_size: int = 1333  # longer side at most
    flip: bool = True  # random horizontal flip in training
    num_workers: int = 4
    on_error: str = "raise"  # a broken image or JSON entry: "raise" stops the run, "skip" leaves it out with a warning


@dataclass
class SolverConfig:
    """SGD with a linear warm-up and step decay (UPSNet COCO, 16 images per batch)."""

    lr: float = 0.02  # for ims_per_batch images; scale linearly with the batch size
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_iter: int = 90000
    steps: List[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1  # lr factor at each step
    warmup_iters: int = 1500
    warmup_factor: float = 0.001  # lr multiplier at iteration 0 of the warm-up
    ims_per_batch: int = 16  # total over all processes
    amp: bool = False  # autocast (bfloat16 on CPU, float16 on CUDA)
    clip_grad: float = 0.0  # max gradient norm; 0 disables clipping
    nonfinite_loss: str = "stop"  # a NaN/inf loss: "stop" (error naming the loss and iteration) or "skip" the step


@dataclass
class EvalConfig:
    period: int = 0  # evaluate every this many iterations during training; 0: only at the end
    max_images: Optional[int] = None  # evaluate on the first N validation images only


@dataclass
class OutputConfig:
    dir: str = "output"  # where `eyecool train` writes when no --out is given
    checkpoint_period: int = 5000
    log_period: int = 20
    tensorboard: bool = False  # also write the logged scalars as TensorBoard events to DIR/tensorboard


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    device: str = "cpu"  # cpu or cuda

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Raise ValueError for values outside their documented range; returns self."""
        m = self.model
        _check_choice("model.backbone.depth", m.backbone.depth, (18, 34, 50, 101, 152))
        _check_choice("model.backbone.norm", m.backbone.norm, ("frozen_bn", "bn", "gn"))
        _check_choice("model.backbone.freeze_at", m.backbone.freeze_at, (0, 1, 2, 3, 4, 5))
        _check_choice("model.rff.mode", m.rff.mode, ("off", "logit", "prob"))
        _check_choice("model.ops", m.ops, ("eyecool", "torchvision"))
        _check_choice("solver.nonfinite_loss", self.solver.nonfinite_loss, ("stop", "skip"))
        _check_choice("model.dam.refine_level", m.dam.refine_level, (0, 1, 2, 3))
        if len(m.rpn.anchor_sizes) != 5:
            raise ValueError(f"model.rpn.anchor_sizes: expected 5 sizes (P2..P6), got {m.rpn.anchor_sizes}")
        if len(m.roi_heads.box_reg_weights) != 4:
            raise ValueError(f"model.roi_heads.box_reg_weights: expected 4 values, got {m.roi_heads.box_reg_weights}")
        for name in ("num_stuff", "num_things"):
            value = getattr(m, name)
            if value is not None and value < (0 if name == "num_stuff" else 1):
                raise ValueError(f"model.{name}: expected a positive count, got {value}")
        if not 0.0 <= m.panoptic.keep_fraction <= 1.0:
            raise ValueError(f"model.panoptic.keep_fraction: expected a value in [0, 1], got {m.panoptic.keep_fraction}")
        return self


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{key}: expected one of {list(choices)}, got {value!r}")


# ----------------------------------------------------------------------------------------- (de)serialise


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so ``model.rff.mode: off`` stays the string "off"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load_yaml(text):
    return yaml.load(text, Loader=_Loader)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against (and converted to) the field type ``annotation``; ValueError names ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return _merge(annotation(), value, key)
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0] if args else Any) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _field_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _merge(obj, updates: Dict[str, Any], prefix: str = ""):
    """A copy of dataclass ``obj`` with the (nested) ``updates`` applied."""
    types = _field_types(type(obj))
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in types:
            raise ValueError(f"unknown configuration key {key!r}; known keys here: {sorted(types)}")
        if dataclasses.is_dataclass(types[name]) and isinstance(value, dict):
            changes[name] = _merge(getattr(obj, name), value, key)
        else:
            changes[name] = _coerce(key, value, types[name])
    return dataclasses.replace(obj, **changes)


def _override_to_nested(override: str) -> Dict[str, Any]:
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key.sub=value")
    key, text = override.split("=", 1)
    value = _load_yaml(text) if text.strip() else None
    nested: Dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """The defaults, then the YAML file ``path`` (if any: a file, or the name of a shipped configuration, see
    :func:`config_file`), then each ``key.sub=value`` override in order."""
    cfg = Config()
    if path is not None:
        source = config_file(path)
        with source.open("r", encoding="utf-8") as f:
            data = _load_yaml(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping at the top level")
        cfg = _merge(cfg, data)
    for override in overrides:
        cfg = _merge(cfg, _override_to_nested(override))
    return cfg.validate()


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the full configuration as YAML (loadable with :func:`load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def _shipped_configs() -> "importlib.resources.abc.Traversable":
    return importlib.resources.files("eyecool") / "configs"


def shipped_config_names() -> List[str]:
    """The names of the configurations shipped in ``eyecool/configs``, sorted."""
    return sorted(entry.name[:-len(".yaml")] for entry in _shipped_configs().iterdir()
                  if entry.name.endswith(".yaml"))


def packaged_config(name: str) -> "importlib.resources.abc.Traversable":
    """The shipped configuration ``name`` (``"demo"``, ``"eyecool_r50_dam"``; ``.yaml`` optional): a file of the
    installed package (``.open()``, ``.read_text()``). ValueError naming the known ones for another name."""
    stem = name[:-len(".yaml")] if name.endswith(".yaml") else name
    entry = _shipped_configs() / f"{stem}.yaml"
    if "/" in stem or not entry.is_file():
        raise ValueError(f"no packaged config {name!r}; known: {shipped_config_names()}")
    return entry


def config_file(name_or_path: Union[str, Path]) -> Union[Path, "importlib.resources.abc.Traversable"]:
    """The configuration file ``name_or_path`` names: an existing file as it is; otherwise a shipped
    configuration, named bare (``demo``, ``demo.yaml``) or as it lay in the source tree before it became package
    data (``configs/demo.yaml``). FileNotFoundError naming the shipped ones when it is neither."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")):
        try:
            return packaged_config(path.name)
        except ValueError:
            pass
    raise FileNotFoundError(f"configuration {str(name_or_path)!r}: no such file, nor one of the shipped "
                            f"configurations {shipped_config_names()}")
