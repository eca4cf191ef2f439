"""Finding and decoding images robustly: every failure is reported, none stops the run."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vlp_cli import VlpError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# Decoding is bounded: larger images are decoded at reduced size (JPEG draft mode) or refused.
MAX_PIXELS = 20_000 * 20_000


def list_images(root: Path) -> list[tuple[str, Path]]:
    """(key, path) for every image under root, recursively; key = posix path relative to root."""
    root = Path(root)
    if not root.is_dir():
        raise VlpError(f"image folder {root} does not exist or is not a folder")
    found = [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*"))
             if p.suffix.lower() in EXTENSIONS and p.is_file()]
    return found


def load_rgb(path: Path, max_side: int | None = None) -> tuple[np.ndarray, int, int]:
    """Decode an image as uint8 RGB [H, W, 3], upright (EXIF), alpha composited on white.

    Returns the array and the upright image's original (width, height): boxes are always in
    the original pixel frame even when the array was decoded at reduced size.
    """
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im) if im.format in ("JPEG", "WEBP", "PNG", "TIFF") \
                else im
            width, height = im.size
            if max_side is not None and max(width, height) > 2 * max_side and im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))  # decode at 1/2..1/8 scale: bounded memory
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                hi = max(float(arr.max()), 1.0)
                arr = (arr * (255.0 / (65535.0 if hi > 255 else 255.0))).clip(0, 255)
                im = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
            elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(canvas, rgba).convert("RGB")
            else:
                im = im.convert("RGB")
            im.load()
            return np.asarray(im, dtype=np.uint8).copy(), width, height


@dataclass
class Decoded:
    key: str
    image: torch.Tensor | None  # [3, h, w] float in [0, 1], resized for the network
    width: int  # original (upright) size
    height: int
    error: str | None = None


class ImageFolder(Dataset):
    """Decodes and resizes in DataLoader workers; a bad file becomes a Decoded with `error`."""

    def __init__(self, items: list[tuple[str, Path]], min_size: int, max_size: int):
        self.items = items
        self.min_size = min_size
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Decoded:
        from PIL import Image

        from vlp_cli.extractors.backbone import resize_shape

        key, path = self.items[i]
        try:
            arr, width, height = load_rgb(path, max_side=self.max_size)
            w, h = resize_shape(arr.shape[1], arr.shape[0], self.min_size, self.max_size)
            im = Image.fromarray(arr).resize((w, h), Image.BILINEAR)
            t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
            return Decoded(key, t.float().div_(255.0), width, height)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is reported, not raised
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return Decoded(key, None, 0, 0, f"{type(exc).__name__}: {msg}")


def collate_decoded(items: list[Decoded]) -> list[Decoded]:
    return items


@dataclass
class GivenBoxes:
    """Boxes handed in with --boxes FILE.jsonl, by image key."""

    boxes: dict[str, tuple[np.ndarray, list[str], np.ndarray]]
    labels: list[str]  # sorted vocabulary
    sha256: str


def read_boxes_jsonl(path: Path) -> GivenBoxes:
    """Parse `{"image": key, "boxes": [[x1,y1,x2,y2], ...], "labels": [...], "scores"?: [...]}`.

    Any malformed line is an error naming the file, the line and the field.
    """
    import hashlib

    path = Path(path)
    if not path.is_file():
        raise VlpError(f"boxes file {path} not found")
    raw = path.read_bytes()
    out: dict[str, tuple[np.ndarray, list[str], np.ndarray]] = {}
    vocab: set[str] = set()
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise VlpError(f"{where}: not valid JSON ({exc.msg})")
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise VlpError(f"{where}: needs an 'image' field with the image key (a string)")
        boxes, labels = rec.get("boxes"), rec.get("labels")
        if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
            raise VlpError(f"{where}: 'boxes' and 'labels' must be lists of the same length")
        try:
            arr = np.asarray(boxes, dtype=np.float32).reshape(len(boxes), 4)
        except (ValueError, TypeError):
            raise VlpError(f"{where}: each box must be [x1, y1, x2, y2] numbers")
        if len(arr) and (not np.isfinite(arr).all() or (arr[:, 2] < arr[:, 0]).any()
                         or (arr[:, 3] < arr[:, 1]).any()):
            raise VlpError(f"{where}: boxes need finite x1 <= x2 and y1 <= y2 (pixels)")
        if not all(isinstance(x, str) and x for x in labels):
            raise VlpError(f"{where}: 'labels' must be non-empty strings")
        scores = rec.get("scores", [1.0] * len(labels))
        if not isinstance(scores, list) or len(scores) != len(labels):
            raise VlpError(f"{where}: 'scores' must be a list as long as 'labels'")
        out[rec["image"]] = (arr, list(labels), np.asarray(scores, dtype=np.float32))
        vocab.update(labels)
    if not out:
        raise VlpError(f"boxes file {path} holds no records")
    return GivenBoxes(out, sorted(vocab), hashlib.sha256(raw).hexdigest()[:16])
