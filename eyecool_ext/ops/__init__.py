"""The typed Python API of every eyecool op (``eyecool_ext.ops.<op>``), one module per op family."""
from eyecool_ext.ops.deform_conv2d import DeformConv2d, deform_conv2d
from eyecool_ext.ops.fg_fusion import fg_fusion
from eyecool_ext.ops.panoptic_merge import (heuristic_panoptic_merge, upsnet_panoptic_merge,
                                            upsnet_panoptic_merge_batch)
from eyecool_ext.ops.panoptic_png import (file_pq_statistics_available, panoptic_png_file_pq_statistics,
                                          png_inflater, read_panoptic_png)
from eyecool_ext.ops.pq_pair_counts import batched_pq_pair_counts, pq_pair_counts
from eyecool_ext.ops.roi_align import MultiLevelRoIAlign, RoIAlign, multilevel_roi_align, roi_align
from eyecool_ext.ops import _registrations  # noqa: F401,E402  (autocast kernels, ONNX symbolics)

__all__ = ["roi_align", "multilevel_roi_align", "RoIAlign", "MultiLevelRoIAlign", "deform_conv2d", "DeformConv2d",
           "fg_fusion", "upsnet_panoptic_merge", "upsnet_panoptic_merge_batch", "heuristic_panoptic_merge",
           "pq_pair_counts", "batched_pq_pair_counts", "read_panoptic_png", "panoptic_png_file_pq_statistics",
           "file_pq_statistics_available", "png_inflater"]
