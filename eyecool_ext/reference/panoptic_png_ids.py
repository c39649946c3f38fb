"""The pixel half of the C++ panoptic PNG reader (``csrc/cpu/png_unfilter.h``, behind
``eyecool_ext.ops.read_panoptic_png``) in plain numpy/PyTorch: PNG scanline unfiltering, row by row, then
R + 256 G + 256^2 B.

Slow for the Average and Paeth filters (a Python loop over the pixels of such rows): the tests' oracle for small
images, not a decoder to use (without the compiled reader, ``eyecool.panoptic_format.read_id_map`` uses PIL).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def panoptic_png_ids(scanlines: Tensor, height: int, width: int, channels: int) -> Tensor:
    """``uint8 [height * (1 + width * channels)]`` scanlines -> ``int32 [height, width]`` segment ids."""
    if channels not in (3, 4):
        raise ValueError(f"panoptic_png_ids: channels must be 3 (RGB) or 4 (RGBA), got {channels}")
    stride = 1 + width * channels
    data = scanlines.cpu().numpy()[: height * stride].reshape(height, stride).astype(np.int64)
    prior = np.zeros((width, channels), dtype=np.int64)
    rgb = np.zeros((height, width, channels), dtype=np.int64)
    for y in range(height):
        filter_type = int(data[y, 0])
        row = data[y, 1:].reshape(width, channels).copy()
        if filter_type == 1:
            row = np.cumsum(row, axis=0) % 256
        elif filter_type == 2:
            row = (row + prior) % 256
        elif filter_type in (3, 4):
            left = np.zeros(channels, dtype=np.int64)
            upper_left = np.zeros(channels, dtype=np.int64)
            for x in range(width):
                if filter_type == 3:
                    row[x] = (row[x] + (left + prior[x]) // 2) % 256
                else:
                    row[x] = (row[x] + _paeth(left, prior[x], upper_left)) % 256
                left, upper_left = row[x], prior[x]
        elif filter_type != 0:
            raise ValueError(f"panoptic_png_ids: row {y} has unknown filter type {filter_type}")
        rgb[y] = row
        prior = row
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    return torch.from_numpy(ids.astype(np.int32))
