"""What the panoptic PNG reader tests share: a PNG encoder of their own (every filter type chosen per row, the
image data split into several IDAT chunks), written independently of the reader so that it can check it."""
from __future__ import annotations

import struct
import zlib
from typing import Sequence

import numpy as np
import torch


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_scanlines(pixels: np.ndarray, filters: Sequence[int]) -> torch.Tensor:
    """PNG encoder side: ``[H, W, C]`` uint8 pixels and one filter type per row -> filtered scanlines."""
    height, width, channels = pixels.shape
    x = pixels.reshape(height, width * channels).astype(np.int64)
    out = []
    for y in range(height):
        row = x[y]
        prior = x[y - 1] if y > 0 else np.zeros_like(row)
        left = np.concatenate([np.zeros(channels, np.int64), row[:-channels]])
        upper_left = np.concatenate([np.zeros(channels, np.int64), prior[:-channels]])
        predicted = {0: 0, 1: left, 2: prior, 3: (left + prior) // 2, 4: paeth(left, prior, upper_left)}[filters[y]]
        out.append(np.concatenate([[filters[y]], (row - predicted) % 256]))
    return torch.from_numpy(np.concatenate(out).astype(np.uint8)) if out else torch.zeros(0, dtype=torch.uint8)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_from_scanlines(scanlines, height: int, width: int, channels: int, idat_chunks: int = 1,
                       level: int = 6) -> bytes:
    """A whole 8-bit RGB (3) or RGBA (4) PNG file around ``scanlines`` (bytes or a uint8 tensor), its zlib
    stream split into ``idat_chunks`` IDAT chunks."""
    data = bytes(scanlines.numpy().tobytes() if isinstance(scanlines, torch.Tensor) else scanlines)
    stream = zlib.compress(data, level)
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if channels == 3 else 6, 0, 0, 0)
    step = max(1, -(-len(stream) // idat_chunks))
    idats = b"".join(chunk(b"IDAT", stream[i:i + step]) for i in range(0, len(stream), step))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idats + chunk(b"IEND", b"")


def pixel_ids(pixels: np.ndarray) -> np.ndarray:
    p = pixels.astype(np.int64)
    return p[..., 0] + 256 * p[..., 1] + 65536 * p[..., 2]


def id_png(ids: np.ndarray, mode: str = "RGB", compress_level: int = 6) -> bytes:
    """A PIL-written PNG of ``[H, W]`` ids, in ``mode`` ("RGB", "RGBA", "P", ...)."""
    import io

    from PIL import Image

    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
