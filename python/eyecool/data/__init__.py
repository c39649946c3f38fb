"""Data: the COCO panoptic reader (``CocoPanopticDataset``), its transforms and batching, the data set checker
(``eyecool validate-data``) and the synthetic data set in COCO's format (``eyecool synth``)."""
# The format's names that the data API has always exported (eyecool.panoptic_format is their home).
from eyecool.panoptic_format import VOID_ID, PanopticFormatError, id2rgb, load_coco_categories, rgb2id

from .coco_panoptic import IGNORE_LABEL, CocoPanopticDataset, DatasetMeta, build_targets
from .collate import (
    SIZE_DIVISIBILITY,
    PanopticBatch,
    build_dataloader,
    collate_panoptic,
    pad_stack,
    padded_size,
    stack_semantic_targets,
)
from .synthetic import SYNTHETIC_CATEGORIES, SplitPaths, generate_synthetic_dataset, render_scene, split_paths
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_transforms,
    denormalize,
)
from .validate import validate_dataset

__all__ = [
    "IGNORE_LABEL", "VOID_ID", "CocoPanopticDataset", "DatasetMeta", "PanopticFormatError", "build_targets",
    "id2rgb", "load_coco_categories", "rgb2id", "SIZE_DIVISIBILITY", "PanopticBatch", "build_dataloader",
    "collate_panoptic", "pad_stack", "padded_size", "stack_semantic_targets", "SYNTHETIC_CATEGORIES",
    "SplitPaths", "generate_synthetic_dataset", "render_scene", "split_paths", "IMAGENET_MEAN", "IMAGENET_STD",
    "Compose", "Normalize", "RandomHorizontalFlip", "ResizeShortestEdge", "build_transforms", "denormalize",
    "validate_dataset",
]
