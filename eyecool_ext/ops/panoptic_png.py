"""Decoding COCO panoptic PNGs straight into segment-id maps, the I/O half of panoptic quality.

``decode_panoptic_png(data)`` parses the PNG chunks, inflates the image data with the fastest inflater at hand
(libdeflate, else zlib-ng, through ``imagecodecs`` when installed: several times faster than the standard
library's zlib on panoptic PNGs), and unfilters the scanlines into ids in one C++ pass
(``torch.ops.eyecool.panoptic_png_ids``). Both steps release the GIL, so a thread pool decodes several PNGs at
once. It covers what panoptic PNGs are (8-bit RGB or RGBA, not interlaced) and raises ``UnsupportedPNG`` for
anything else, so that callers can fall back to PIL. Without the compiled kernel it decodes with PIL itself (the
reference unfilter is an oracle for small images, far too slow for whole ones).

``panoptic_png_pair_counts(gt, pred)`` is panoptic quality's whole per-image inner loop: both PNGs inflated,
unfiltered and their (gt, pred) segment pairs counted row by row, without either id map ever being written;
``panoptic_png_pq_statistics`` goes on to match the segments, and ``panoptic_png_file_pq_statistics`` does it all
from the two files' paths (reading and inflating too), pq_compute's one kernel call per image.

Inflated data goes into a buffer kept per thread and reused: a COCO-sized image inflates to about 1 MB, and
filling fresh pages costs the kernel more page faults than the inflation itself costs zlib-ng.
"""
from __future__ import annotations

import glob
import io
import os
import struct
import threading
import zlib
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from eyecool_ext import _extension, reference
from eyecool_ext.ops.pq_pair_counts import pq_pair_counts

try:  # libdeflate and zlib-ng through imagecodecs: optional, only faster
    import imagecodecs as _imagecodecs
except ImportError:  # pragma: no cover - depends on the environment
    _imagecodecs = None
# libdeflate's one-shot raw inflate is the fastest on panoptic PNGs (about 1.5x zlib-ng); zlib-ng next.
_deflate_decode = getattr(_imagecodecs, "deflate_decode", None) if getattr(getattr(_imagecodecs, "DEFLATE", None),
                                                                         "available", False) else None
_zlibng_decode = getattr(_imagecodecs, "zlibng_decode", None)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {2: 3, 6: 4}  # PNG colour type -> bytes per pixel at bit depth 8
_MAX_DEFLATE_RATIO = 1032  # the largest expansion a deflate stream can encode (258-byte matches in ~2 bits)
_scratch = threading.local()  # per-thread inflate buffers, by slot name


class UnsupportedPNG(ValueError):
    """A PNG this decoder does not handle (not 8-bit RGB/RGBA, interlaced, or malformed)."""


def _scratch_buffer(slot: str, size: int) -> memoryview:
    """A writable view of exactly ``size`` bytes of this thread's buffer ``slot``, grown when too small."""
    buffer = getattr(_scratch, slot, None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        setattr(_scratch, slot, buffer)
    return memoryview(buffer)[:size]


def _zlib_stream_body(stream: bytes) -> memoryview:
    """The raw deflate data of a zlib stream (RFC 1950): after the 2-byte header, before the 4-byte Adler-32."""
    if len(stream) < 6:
        raise UnsupportedPNG(f"image data of {len(stream)} bytes is no zlib stream (truncated PNG?)")
    cmf, flg = stream[0], stream[1]
    # Deflate (method 8), a header that checks (a multiple of 31), no preset dictionary (PNG allows none).
    if cmf & 0x0F != 8 or (cmf * 256 + flg) % 31 != 0 or flg & 0x20:
        raise UnsupportedPNG(f"image data does not start with a zlib deflate header (bytes {cmf:#04x} {flg:#04x})")
    return memoryview(stream)[2:-4]


def _inflate(compressed: bytes, size: int, slot: Optional[str] = None):
    """The zlib stream ``compressed`` inflated into a writable buffer of exactly ``size`` bytes: this thread's
    reusable buffer ``slot`` (valid until the thread inflates into that slot again), or a new one."""
    # Deflate expands at most ~1032:1, so a header that promises more than that is forged or truncated: refuse it
    # before allocating the buffer it asks for (a 2^31-pixel-wide IHDR would otherwise allocate gigabytes).
    if size > _MAX_DEFLATE_RATIO * len(compressed) + 1024:
        raise UnsupportedPNG(f"the header promises {size} bytes of image data but only {len(compressed)} compressed "
                             f"bytes follow (truncated or forged PNG)")
    try:
        if _deflate_decode is not None or _zlibng_decode is not None:
            target = _scratch_buffer(slot, size) if slot is not None else bytearray(size)
        if _deflate_decode is not None:
            # The deflate stream between the zlib header and its Adler-32 trailer: the checksum is not verified
            # again, as the chunk CRCs already cover these bytes (parse_panoptic_png checks them).
            out = _deflate_decode(_zlib_stream_body(compressed), out=target, raw=True)
        elif _zlibng_decode is not None:
            out = _zlibng_decode(compressed, out=target)
        else:
            out = bytearray(zlib.decompress(compressed))
    except UnsupportedPNG:
        raise
    except Exception as exc:  # zlib.error, imagecodecs' Zlibng/DeflateError: a corrupt or oversized stream
        raise UnsupportedPNG(f"image data does not inflate to {size} bytes: {exc}") from exc
    if not isinstance(out, (bytearray, memoryview)) or len(out) != size:
        raise UnsupportedPNG(f"image data inflates to {len(out)} bytes, expected {size} (truncated PNG?)")
    return out


def panoptic_png_ids(scanlines: Tensor, height: int, width: int, channels: int) -> Tensor:
    """Unfiltered segment ids of an inflated PNG stream.

    Args:
        scanlines: ``uint8 Tensor[height * (1 + width * channels)]`` on the CPU: per row, the PNG filter-type
            byte then the row's filtered bytes (the inflated IDAT data).
        height, width: the image size. channels: 3 (RGB) or 4 (RGBA; alpha is ignored).

    Returns:
        ``int32 Tensor[height, width]`` of ``R + 256 G + 256^2 B``.
    """
    if scanlines.dtype != torch.uint8 or scanlines.dim() != 1:
        raise ValueError(f"scanlines must be a 1-d uint8 tensor, got {scanlines.dtype} of shape "
                         f"{tuple(scanlines.shape)}")
    if scanlines.device.type != "cpu":
        raise ValueError(f"scanlines must be on the CPU, got {scanlines.device}")
    if channels not in (3, 4):
        raise ValueError(f"channels must be 3 (RGB) or 4 (RGBA), got {channels}")
    needed = height * (1 + width * channels)
    if scanlines.numel() < needed:
        raise ValueError(f"a {width} x {height} image with {channels} channels needs {needed} bytes of scanlines, "
                         f"got {scanlines.numel()} (truncated PNG?)")
    if not _extension.use_compiled("panoptic_png_ids", scanlines):
        return reference.panoptic_png_ids(scanlines, height, width, channels)
    return torch.ops.eyecool.panoptic_png_ids(scanlines, height, width, channels)


def _decode_with_pil(data: bytes) -> Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    return torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2])


class PanopticPNG(NamedTuple):
    """A parsed panoptic PNG: its size, bytes per pixel (3 RGB, 4 RGBA), compressed image data and the file's
    bytes."""

    height: int
    width: int
    channels: int
    compressed: bytes
    data: bytes

    @property
    def scanline_bytes(self) -> int:
        """Size of the inflated image data: per row, the filter-type byte and the row's bytes."""
        return self.height * (1 + self.width * self.channels)


def parse_panoptic_png(data: bytes) -> PanopticPNG:
    """The header and the joined IDAT chunks of a PNG file's bytes.

    Raises ``UnsupportedPNG`` for anything but an 8-bit, non-interlaced RGB or RGBA PNG.
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise UnsupportedPNG("not a PNG file")
    pos, size = len(_PNG_SIGNATURE), len(data)
    header = None
    idat = []
    while pos + 8 <= size:
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        # The CRC guards against silently decoding flipped bytes into wrong segment ids (PIL checks it too).
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc) != 4 or zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise UnsupportedPNG(f"chunk {kind!r} at byte {pos} is truncated or fails its CRC (corrupt PNG)")
        if kind == b"IHDR":
            if len(body) != 13:
                raise UnsupportedPNG(f"IHDR chunk of {len(body)} bytes, expected 13 (truncated PNG?)")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise UnsupportedPNG("no IHDR or IDAT chunk")
    width, height, bit_depth, colour_type, _, _, interlace = header
    if bit_depth != 8 or colour_type not in _CHANNELS or interlace != 0:
        raise UnsupportedPNG(f"bit depth {bit_depth}, colour type {colour_type}, interlace {interlace}: only 8-bit "
                             f"non-interlaced RGB or RGBA is decoded here")
    return PanopticPNG(height, width, _CHANNELS[colour_type], b"".join(idat) if len(idat) > 1 else idat[0], data)


def _scanlines(png: PanopticPNG, slot: str) -> Tensor:
    return torch.frombuffer(_inflate(png.compressed, png.scanline_bytes, slot), dtype=torch.uint8)


def decode_panoptic_png(data: bytes) -> Tensor:
    """The bytes of a panoptic PNG -> ``int32 Tensor[H, W]`` segment ids (``R + 256 G + 256^2 B``).

    Raises ``UnsupportedPNG`` for PNGs other than 8-bit, non-interlaced RGB or RGBA.
    """
    png = parse_panoptic_png(data)
    if not _extension.use_compiled("panoptic_png_ids"):
        # The reference unfilter loops over pixels in Python: PIL is the faster fallback for whole images.
        return _decode_with_pil(data)
    if png.width == 0 or png.height == 0:
        return torch.zeros((png.height, png.width), dtype=torch.int32)
    return panoptic_png_ids(_scanlines(png, "decode"), png.height, png.width, png.channels)


def panoptic_png_pair_counts(gt: PanopticPNG, pred: PanopticPNG) -> Tuple[Tensor, Tensor, Tensor]:
    """The distinct ``(gt_id, pred_id)`` segment pairs of two parsed panoptic PNGs of one size and their pixel
    counts: ``pq_pair_counts`` of their id maps, computed without decoding either map into memory.

    Args:
        gt, pred: from :func:`parse_panoptic_png`, with the same width and height.

    Returns:
        ``(gt_id, pred_id, count)``, int64 ``Tensor[P]`` each, sorted by ``(gt_id, pred_id)``.

    Raises:
        ValueError: the two PNGs differ in size. UnsupportedPNG: image data that does not inflate to its size.
    """
    if (gt.height, gt.width) != (pred.height, pred.width):
        raise ValueError(f"the prediction PNG is {pred.width} x {pred.height} (width x height) but the gt PNG is "
                         f"{gt.width} x {gt.height}")
    if not _extension.use_compiled("panoptic_png_pair_counts"):
        # The same answer through the two id maps (decoded with PIL when no kernel is compiled).
        return pq_pair_counts(decode_panoptic_png(gt.data), decode_panoptic_png(pred.data))
    return torch.ops.eyecool.panoptic_png_pair_counts(_scanlines(gt, "gt"), _scanlines(pred, "pred"), gt.height,
                                                       gt.width, gt.channels, pred.channels)


def panoptic_png_pq_statistics(gt: PanopticPNG, pred: PanopticPNG, gt_segments: Tensor, pred_segments: Tensor,
                               crowd_of_category: Tensor, num_categories: int):
    """One image's panoptic-quality statistics straight from its two parsed PNGs: the pairs of
    :func:`panoptic_png_pair_counts`, matched by panopticapi's rules in C++ (the numpy reference is
    ``eyecool.evaluation.panoptic_quality.match_segments``). Compiled kernel only.

    Args:
        gt, pred: from :func:`parse_panoptic_png`, with the same width and height.
        gt_segments: ``int64 Tensor[4, G]``: segment ids (ascending), category indices, iscrowd (0/1), areas.
        pred_segments: ``int64 Tensor[2, S]``: segment ids (ascending), category indices.
        crowd_of_category: ``int64 Tensor[C]``: per category, the gt crowd segment that counts for it, or -1.
        num_categories: C.

    Returns:
        ``(problem, category, iou_sum, tp, fp, fn)``: ``problem`` an int, nonzero when a PNG and its segment
        table disagree (1/2: a gt id only in the PNG / only in the table, 3/4: likewise for the prediction; the
        other outputs are then empty); otherwise int64 / float64 ``Tensor[k]`` over the k categories the image
        touches, ascending.
    """
    if (gt.height, gt.width) != (pred.height, pred.width):
        raise ValueError(f"the prediction PNG is {pred.width} x {pred.height} (width x height) but the gt PNG is "
                         f"{gt.width} x {gt.height}")
    problem, *stats = torch.ops.eyecool.panoptic_png_pq_statistics(
        _scanlines(gt, "gt"), _scanlines(pred, "pred"), gt.height, gt.width, gt.channels, pred.channels, gt_segments,
        pred_segments, crowd_of_category, num_categories)
    return (int(problem), *stats)


_libdeflate_loaded: Optional[bool] = None


def _libdeflate_candidates():
    """Where libdeflate may be: the system's, then the copy the imagecodecs wheel bundles."""
    paths = ["libdeflate.so.0", "libdeflate.so", "libdeflate.0.dylib", "libdeflate.dylib"]
    if _imagecodecs is not None:
        package = os.path.dirname(os.path.abspath(_imagecodecs.__file__))
        for folder in (os.path.join(os.path.dirname(package), "imagecodecs.libs"), package):
            paths += sorted(glob.glob(os.path.join(folder, "libdeflate*.so*")))
            paths += sorted(glob.glob(os.path.join(folder, "libdeflate*.dylib")))
    return paths


def file_pq_statistics_available() -> bool:
    """Whether :func:`panoptic_png_file_pq_statistics` can run: the compiled kernel, and libdeflate found and
    loaded at run time (the extension does not link it)."""
    global _libdeflate_loaded
    if _libdeflate_loaded is None:
        _libdeflate_loaded = (_extension.use_compiled("panoptic_png_file_pq_statistics")
                              and torch.ops.eyecool._load_libdeflate(_libdeflate_candidates()) >= 0)
    return _libdeflate_loaded


def panoptic_png_file_pq_statistics(gt_path: str, pred_path: str, gt_segments: Tensor, pred_segments: Tensor,
                                    crowd_of_category: Tensor, num_categories: int):
    """:func:`panoptic_png_pq_statistics` from the two PNG files' paths, in one GIL-free C++ call: reading, the
    chunk CRCs and the inflation (libdeflate) too. Needs :func:`file_pq_statistics_available`.

    Returns:
        as :func:`panoptic_png_pq_statistics`, and ``problem`` 5 for files this path does not handle (unreadable,
        not an 8-bit RGB/RGBA PNG, corrupt, of two sizes, or empty): the Python reader (:func:`parse_panoptic_png`,
        PIL) then handles or reports them.
    """
    problem, *stats = torch.ops.eyecool.panoptic_png_file_pq_statistics(
        os.fspath(gt_path), os.fspath(pred_path), gt_segments, pred_segments, crowd_of_category, num_categories)
    return (int(problem), *stats)


if _extension.has_op("panoptic_png_file_pq_statistics"):

    @torch.library.register_fake("eyecool::panoptic_png_file_pq_statistics")
    def _panoptic_png_file_pq_statistics_fake(gt_path, pred_path, gt_segments, pred_segments, crowd_of_category,
                                              num_categories):
        touched = torch.library.get_ctx().new_dynamic_size()
        category, tp, fp, fn = (gt_segments.new_empty((touched,)) for _ in range(4))
        return gt_segments.new_empty((1,)), category, gt_segments.new_empty((touched,), dtype=torch.float64), tp, fp, fn


if _extension.has_op("panoptic_png_pq_statistics"):

    @torch.library.register_fake("eyecool::panoptic_png_pq_statistics")
    def _panoptic_png_pq_statistics_fake(gt_scanlines, pred_scanlines, height, width, gt_channels, pred_channels,
                                         gt_segments, pred_segments, crowd_of_category, num_categories):
        touched = torch.library.get_ctx().new_dynamic_size()
        category, tp, fp, fn = (gt_segments.new_empty((touched,)) for _ in range(4))
        return gt_segments.new_empty((1,)), category, gt_segments.new_empty((touched,), dtype=torch.float64), tp, fp, fn


if _extension.has_op("panoptic_png_ids"):

    @torch.library.register_fake("eyecool::panoptic_png_ids")
    def _panoptic_png_ids_fake(scanlines, height, width, channels):
        torch._check(scanlines.dim() == 1, lambda: "scanlines must be 1-d")
        return scanlines.new_empty((height, width), dtype=torch.int32)


if _extension.has_op("panoptic_png_pair_counts"):

    @torch.library.register_fake("eyecool::panoptic_png_pair_counts")
    def _panoptic_png_pair_counts_fake(gt_scanlines, pred_scanlines, height, width, gt_channels, pred_channels):
        torch._check(gt_scanlines.dim() == 1 and pred_scanlines.dim() == 1, lambda: "scanlines must be 1-d")
        pairs = torch.library.get_ctx().new_dynamic_size()
        return tuple(gt_scanlines.new_empty((pairs,), dtype=torch.int64) for _ in range(3))
