"""Plain PyTorch implementations of every eyecool op, with the same signatures as ``eyecool_ext.ops``.

They are the oracle the kernels are tested against, the fallback when the compiled extension is missing, and
the ops of the network's ``model.ops=torchvision`` backend where torchvision has none (RFF, the UPSNet merge).
They favour clarity over speed and memory. A leaf: they import only ``eyecool_ext._utils`` (the argument checks
they share with the op wrappers) and ``eyecool_ext._autocast``; the network's default path reaches them only
through the op wrappers' fallback.
"""
from eyecool_ext.reference.deform_conv2d import deform_conv2d
from eyecool_ext.reference.fg_fusion import fg_fusion
from eyecool_ext.reference.panoptic_merge import (heuristic_panoptic_merge, paste_mask_logits,
                                                  upsnet_logit_stack, upsnet_panoptic_merge,
                                                  upsnet_panoptic_merge_batch)
from eyecool_ext.reference.panoptic_png_ids import panoptic_png_ids
from eyecool_ext.reference.pq_pair_counts import batched_pq_pair_counts, pq_pair_counts
from eyecool_ext.reference.roi_align import fpn_level_index, multilevel_roi_align, roi_align

__all__ = ["roi_align", "multilevel_roi_align", "fpn_level_index", "deform_conv2d", "fg_fusion",
           "upsnet_panoptic_merge", "upsnet_panoptic_merge_batch", "upsnet_logit_stack", "paste_mask_logits",
           "heuristic_panoptic_merge", "pq_pair_counts", "batched_pq_pair_counts", "panoptic_png_ids"]
