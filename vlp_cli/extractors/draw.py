"""Boxes and tags drawn on the image, for a person to check an extraction by eye."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlp_cli.config import DataCfg
from vlp_cli.stores.features import Regions, select_count

_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


def draw_regions(decoded: Any, regions: Regions, labels: list[str], path: Path,
                 data: DataCfg, caption: str | None = None) -> Path:
    """Draw the boxes a recipe's read-time policy keeps (`data.conf_th`, min/max boxes).

    Args:
        decoded: the decoded image (`Decoded` with `rgb`, the uint8 array, maybe reduced).
        regions: its regions (boxes in original pixels).
        labels: the store's tag vocabulary.
        path: output file; the suffix becomes .jpg.
        data: the read-time selection policy.
        caption: text written in a band under the image (a generated caption, an answer).
    """
    from PIL import Image, ImageDraw

    rgb = np.asarray(decoded.rgb)
    im = Image.fromarray(rgb)
    sx, sy = rgb.shape[1] / regions.width, rgb.shape[0] / regions.height
    n = select_count(regions.confidences, data.conf_th, data.min_boxes, data.max_boxes)
    pen = ImageDraw.Draw(im)
    width = max(1, round(max(im.size) / 300))
    for i in range(n):
        x1, y1, x2, y2 = (regions.boxes[i] * [sx, sy, sx, sy]).tolist()
        c = int(regions.class_ids[i])
        color = _COLORS[c % len(_COLORS)] if c >= 0 else (200, 200, 200)
        pen.rectangle([x1, y1, x2, y2], outline=color, width=width)
        name = labels[c] if 0 <= c < len(labels) else ""
        text = f"{name} {regions.confidences[i]:.2f}".strip()
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        pen.rectangle([x1, y1, x1 + (right - left) + 4, y1 + (bottom - top) + 4], fill=color)
        pen.text((x1 + 2, y1 + 1), text, fill=(0, 0, 0))
    if caption:
        im = _with_caption(im, caption)
    out = Path(path).with_suffix(".jpg")
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, quality=90)
    return out


def _with_caption(im: Any, text: str) -> Any:
    """The image above a white band holding `text`, wrapped to the image's width."""
    import textwrap

    from PIL import Image, ImageDraw

    pen = ImageDraw.Draw(im)
    char_w = max(pen.textbbox((0, 0), "x")[2], 1)
    line_h = pen.textbbox((0, 0), "Xg")[3] + 4
    lines = textwrap.wrap(text, max(im.size[0] // char_w - 1, 8)) or [""]
    out = Image.new("RGB", (im.size[0], im.size[1] + line_h * len(lines) + 6), (255, 255, 255))
    out.paste(im, (0, 0))
    pen = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        pen.text((3, im.size[1] + 3 + i * line_h), line, fill=(0, 0, 0))
    return out
