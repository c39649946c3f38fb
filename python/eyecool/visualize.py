"""Pictures of panoptic results: the segments drawn over the image in the COCO palette with class labels
(detectron2's ``draw_panoptic_seg`` look), and the training loss curve.

Stuff is drawn first in its category's colour, then each instance in a jittered shade of its category's colour
(so that touching instances of one class stay apart), each segment filled at ``alpha`` (0.7) with a darker
outline and a label (``name`` for stuff, ``name 97%`` for things with a score). Small images are enlarged so
the labels stay legible. Only PIL is needed; the loss plot uses matplotlib.
"""
from __future__ import annotations

import colorsys
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = Tuple[int, int, int]


def jitter_color(color: Sequence[int], seed: int, amount: float = 0.3) -> Color:
    """``color`` moved by a random vector of length ``amount`` (in 0..1 RGB units), reproducible per ``seed``."""
    rng = np.random.default_rng(seed)
    vector = rng.uniform(-1.0, 1.0, 3)
    vector = vector / max(1e-6, np.linalg.norm(vector)) * amount
    jittered = np.clip(np.asarray(color, dtype=np.float64) / 255.0 + vector, 0.0, 1.0)
    return tuple(int(round(c * 255)) for c in jittered)


def _darker(color: Color, factor: float = 0.6) -> Color:
    h, l, s = colorsys.rgb_to_hls(*(c / 255.0 for c in color))
    return tuple(int(round(c * 255)) for c in colorsys.hls_to_rgb(h, l * factor, s))


def _label_anchor(mask: np.ndarray) -> Tuple[int, int]:
    """Where a segment's label goes: the mask pixel nearest to its centroid (the centroid itself may lie outside
    a ring- or L-shaped segment)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    nearest = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[nearest]), int(ys[nearest])


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def draw_panoptic(image: np.ndarray, panoptic_seg: np.ndarray, segments_info: Sequence[Mapping[str, Any]],
                  categories: Sequence[Mapping[str, Any]], alpha: float = 0.7, min_side: int = 512,
                  show_labels: bool = True) -> np.ndarray:
    """The segments of ``panoptic_seg`` drawn over ``image``.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        panoptic_seg: integer ``[H, W]`` segment ids (0 = void, left as the image).
        segments_info: dicts with ``id``, ``category_id`` and optionally ``score``.
        categories: COCO category dicts (``id``, ``name``, ``isthing``, ``color``).
        min_side: the picture is enlarged (nearest for the segments) until its shorter side is at least this.
    Returns:
        uint8 ``[H', W', 3]`` RGB.
    """
    image = np.asarray(image)
    panoptic_seg = np.asarray(panoptic_seg)
    if image.shape[:2] != panoptic_seg.shape:
        raise ValueError(f"image is {image.shape[:2]} but panoptic_seg is {panoptic_seg.shape}")
    scale = max(1, int(np.ceil(min_side / min(panoptic_seg.shape))))
    if scale > 1:
        height, width = panoptic_seg.shape
        image = np.asarray(Image.fromarray(image).resize((width * scale, height * scale), Image.BILINEAR))
        panoptic_seg = panoptic_seg.repeat(scale, axis=0).repeat(scale, axis=1)
    by_id = {int(c["id"]): c for c in categories}
    # Stuff first, then instances (by descending score, so the best-scored labels are drawn last, on top).
    ordered = sorted(segments_info, key=lambda s: (bool(by_id[int(s["category_id"])].get("isthing")),
                                                   float(s.get("score", 1.0))))
    canvas = image.astype(np.float32)
    outlines: List[Tuple[np.ndarray, Color]] = []
    labels: List[Tuple[Tuple[int, int], str, Color]] = []
    for segment in ordered:
        category = by_id[int(segment["category_id"])]
        mask = panoptic_seg == int(segment["id"])
        if not mask.any():
            continue
        color = tuple(int(c) for c in category.get("color", (200, 200, 200)))
        if category.get("isthing"):
            color = jitter_color(color, seed=int(segment["id"]))
        canvas[mask] = (1.0 - alpha) * canvas[mask] + alpha * np.asarray(color, dtype=np.float32)
        # Boundary pixels: in the mask with a 4-neighbour outside it.
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]
        inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        outlines.append((mask & ~inner, _darker(color)))
        text = str(category.get("name", segment["category_id"]))
        if category.get("isthing") and "score" in segment:
            text += f" {100 * float(segment['score']):.0f}%"
        labels.append((_label_anchor(mask), text, color))
    for boundary, color in outlines:
        canvas[boundary] = color
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if show_labels:
        draw = ImageDraw.Draw(picture)
        font = _font(max(11, min(picture.size) // 40))
        for (x, y), text, color in labels:
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            w, h = right - left, bottom - top
            x0 = int(np.clip(x - w / 2, 0, max(0, picture.width - w - 4)))
            y0 = int(np.clip(y - h / 2, 0, max(0, picture.height - h - 4)))
            # Light text on a dark box of the segment's hue: readable over any texture.
            draw.rectangle((x0, y0, x0 + w + 4, y0 + h + 4), fill=_darker(color, 0.35))
            draw.text((x0 + 2 - left, y0 + 2 - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(picture)


def side_by_side(panels: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None, gap: int = 8) -> np.ndarray:
    """Panels of one height (resized to the first one's) left to right, with an optional title above each."""
    height = panels[0].shape[0]
    resized = []
    for panel in panels:
        if panel.shape[0] != height:
            width = int(round(panel.shape[1] * height / panel.shape[0]))
            panel = np.asarray(Image.fromarray(panel).resize((width, height), Image.BILINEAR))
        resized.append(panel)
    title_height = 0 if not titles else max(16, height // 20) + 8
    total_width = sum(p.shape[1] for p in resized) + gap * (len(resized) - 1)
    sheet = Image.new("RGB", (total_width, height + title_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(max(12, height // 24))
    x = 0
    for i, panel in enumerate(resized):
        sheet.paste(Image.fromarray(panel), (x, title_height))
        if titles:
            draw.text((x + 4, 4), titles[i], fill=(0, 0, 0), font=font)
        x += panel.shape[1] + gap
    return np.asarray(sheet)


def save_image(path: str, picture: np.ndarray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(picture).save(path)


def plot_loss_curves(metrics_json: str, out_png: str) -> None:
    """Each loss of ``metrics.json`` (JSON lines of the training log) against the iteration, on a log scale,
    with the total loss in bold; evaluation rows (PQ) go on a second axis when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_json, "r", encoding="utf-8") as f:
        rows: List[Dict[str, float]] = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if "total_loss" in r]
    eval_rows = [r for r in rows if "PQ" in r]
    if not train_rows:
        raise ValueError(f"{metrics_json} holds no training losses")
    names = [k for k in train_rows[0] if k.startswith("loss")]
    iterations = [r["iteration"] + 1 for r in train_rows]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for name in names:
        ax.plot(iterations, [r.get(name, np.nan) for r in train_rows], linewidth=1.2, label=name)
    ax.plot(iterations, [r["total_loss"] for r in train_rows], color="black", linewidth=2.4, label="total_loss")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median over the log period)")
    ax.grid(True, which="both", alpha=0.3)
    if eval_rows:
        pq_axis = ax.twinx()
        pq_axis.plot([r["iteration"] + 1 for r in eval_rows], [r["PQ"] for r in eval_rows], "o--",
                     color="tab:red", label="val PQ")
        pq_axis.set_ylabel("val PQ", color="tab:red")
        pq_axis.set_ylim(0, 100)
        pq_axis.legend(loc="upper center", frameon=False)
    ax.legend(loc="upper right", fontsize=8, ncol=2, frameon=False)
    ax.set_title("training losses")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
