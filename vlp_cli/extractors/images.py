"""Finding and decoding images robustly: every failure is reported, none stops the run.

Decoding policy, in one place:

* Only JPEG (camera MPO included), PNG, WebP, BMP and GIF content is decoded, whatever the
  file's extension says: a `.png` that is really a JPEG decodes, while a file that is really an
  EPS, PSD or TIFF is refused, which keeps Pillow's rarer (and riskier) decoders out of the
  way of scraped data.
* Every image comes back as uint8 RGB, upright (EXIF orientation applied), alpha composited
  on white, 16-bit samples mapped 0..65535 -> 0..255 (v / 257, rounded).
* Memory is bounded: an image over `MAX_PIXELS` is refused before any pixel is decoded, and
  when the caller says the network only needs `max_side` pixels, JPEGs are decoded at 1/2,
  1/4 or 1/8 scale by libjpeg (draft mode), and every image is then box-reduced by an
  integer factor before the RGB conversion (formats other than JPEG cannot be decoded at
  reduced size, so they are in memory at full size once). The reported width and height are
  always those of the original upright image: boxes live in that frame.
"""

from __future__ import annotations

import logging
import math
import os
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlp_cli import VlpError

if TYPE_CHECKING:
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# Decoding is bounded: larger images are decoded at reduced size (JPEG draft mode) or refused.
MAX_PIXELS = 20_000 * 20_000
# Pillow format ids that are decoded; GIF because scraped ".jpg"/".png" files often are GIFs.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # "JPEG" covers camera MPO files too
# Longest error message kept in a Decoded: the failure report is one short line per image.
MAX_ERROR_CHARS = 300
# EXIF Orientation (tag 0x0112) -> the Pillow transpose that makes the image upright.
# Values 5..8 swap width and height.
_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM",
                              5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
# Modes Pillow's Image.reduce handles natively with the right meaning (averaging palette
# indices, 1-bit or I;16 samples would be wrong or unsupported).
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "CMYK", "I", "F"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageDecodeError(VlpError):
    """An image file that cannot be decoded: empty, not an image, truncated, or too large."""


def _key_part(name: str) -> str:
    """A file-name component as key text: valid UTF-8, NFC-normalised.

    Linux hands undecodable name bytes to Python as lone surrogates (surrogateescape); they
    cannot be stored as UTF-8, so they become visible backslash escapes (`caf\\xe9.jpg`).
    macOS hands out NFD names ("e" + combining accent) where Linux and Windows usually hold
    NFC: normalising makes the same folder give the same keys everywhere.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return unicodedata.normalize("NFC", name)


def list_images(root: Path) -> list[tuple[str, Path]]:
    """Every image file under root, recursively, as (key, path), sorted by key.

    The key is the path relative to root, '/'-separated on every platform, each component
    NFC-normalised (see `_key_part`); the path is the real one, to open the file with.

    Policy:
        * Only names whose extension (any case) is in `EXTENSIONS` are listed.
        * Hidden entries, files or folders whose name starts with '.', are skipped with
          everything below them: `.ipynb_checkpoints`, `.git`, `.DS_Store`, and macOS's
          `._name.jpg` resource-fork files (which are not images) never become keys.
        * Symlinks are followed, to files and to folders alike, and listed under the link's
          own path (a link and its target are two keys). A folder link that loops back to one
          of its own ancestors is skipped with a warning. A dangling file link is listed, so
          that decoding reports it as a failure instead of the image silently vanishing.
        * Sockets, FIFOs and devices are skipped (opening a FIFO would block forever);
          unreadable folders are skipped with a warning.
        * Two names that differ only by Unicode normalisation (possible on Linux) would share
          a key: the first in code-point order of the real path is kept, the other skipped
          with a warning.

    Raises:
        VlpError: root does not exist or is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise VlpError(f"image folder {root} does not exist or is not a folder")
    found: list[tuple[str, str, Path]] = []  # (key, raw relative path, path)
    root_stat = root.stat()
    # Each stack entry: a folder, its key and raw-name prefixes, and its ancestors' identities
    # (device, inode) for loop detection. A stack, not recursion: deep trees are fine.
    stack: list[tuple[Path, str, str, frozenset[tuple[int, int]]]] = [
        (root, "", "", frozenset({(root_stat.st_dev, root_stat.st_ino)}))]
    while stack:
        folder, key_prefix, raw_prefix, ancestors = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            logger.warning("skipped unreadable folder %s: %s", folder, exc)
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            key, raw = key_prefix + _key_part(name), raw_prefix + name
            path = folder / name
            try:
                if entry.is_dir():  # follows symlinks
                    st = entry.stat()
                    ident = (st.st_dev, st.st_ino)
                    if ident in ancestors:
                        logger.warning("skipped %s: a folder link back to one of its own "
                                       "parents", path)
                        continue
                    stack.append((path, key + "/", raw + "/", ancestors | {ident}))
                elif os.path.splitext(name)[1].lower() in EXTENSIONS and (
                        entry.is_file() or (entry.is_symlink() and not path.exists())):
                    found.append((key, raw, path))
            except OSError as exc:
                logger.warning("skipped %s: %s", path, exc)
    found.sort()
    out: list[tuple[str, Path]] = []
    for key, _raw, path in found:
        if out and out[-1][0] == key:
            logger.warning("skipped %s: its name differs from %s only by Unicode "
                           "normalisation, so both would have the key %r", path, out[-1][1], key)
            continue
        out.append((key, path))
    return out


def _draft_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The smallest size, same aspect, whose longer side is still at least max_side.

    JPEG draft mode decodes at the largest 1/1..1/8 scale that keeps both sides at least this
    size, so the network never gets an image upsampled from a too-small decode.
    """
    scale = max_side / max(width, height)
    return max(math.ceil(width * scale), 1), max(math.ceil(height * scale), 1)


def _orientation(im: PILImage.Image) -> int:
    """The EXIF orientation, 1..8; 1 (as stored) when absent, invalid or unreadable."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception as exc:  # noqa: BLE001 - corrupt EXIF must not fail a decodable image
        logger.debug("ignored unreadable EXIF in %s: %s", getattr(im, "filename", "?"), exc)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _has_alpha(im: PILImage.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _reducible(im: PILImage.Image) -> PILImage.Image:
    """The image in a mode whose pixels can be averaged: palette, 1-bit, 16-bit, tRNS out."""
    if im.mode in _SIXTEEN_BIT:
        return im.convert("I")  # 32-bit ints keep all 16 bits; scaled later in _to_rgb
    if im.mode == "1":
        return im.convert("L")  # averaging 1-bit pixels gives grey: anti-aliased, not jagged
    if im.mode in _REDUCIBLE and "transparency" not in im.info:
        return im
    return im.convert("RGBA" if _has_alpha(im) else "RGB")


def _to_rgb(im: PILImage.Image) -> PILImage.Image:
    """uint8 RGB: 16-bit scaled by 1/257, alpha composited on white, other modes converted."""
    from PIL import Image

    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        # PNG stores 16-bit samples scaled to the full 0..65535 range whatever the source's
        # bit depth, so a fixed v / 257 (rounded: (v + 128) // 257) is the faithful mapping;
        # a data-dependent stretch would brighten dark images. "I" is treated as 16-bit data.
        arr = np.asarray(im, dtype=np.int32).clip(0, 65535)  # I;16 -> 4 B/px
        return Image.fromarray(((arr + 128) // 257).astype(np.uint8)).convert("RGB")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(path: Path, max_side: int | None = None) -> tuple[PILImage.Image, int, int]:
    """Decode an image as an upright RGB Pillow image; see `load_rgb` for the contract."""
    from PIL import Image

    path = Path(path)
    with warnings.catch_warnings(record=True) as caught, open(path, "rb") as f:
        # Opening the file here (not by name) leaves its closing to us: the decoded image
        # stays usable afterwards without a defensive copy.
        warnings.simplefilter("always")
        # Pillow's own bomb check runs inside Image.open against this global: align it with
        # MAX_PIXELS so that ours (below, with a clear message) is the one that decides.
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        if os.fstat(f.fileno()).st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        try:
            im = Image.open(f, formats=FORMATS)
        except Image.UnidentifiedImageError:
            f.seek(0)
            raise ImageDecodeError(
                f"not an image in a supported format (JPEG, PNG, WebP, BMP, GIF); the file "
                f"starts with {f.read(16)!r}") from None
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"refused as a possible decompression bomb: {exc}") from None
        stored_w, stored_h = im.size
        if stored_w * stored_h > MAX_PIXELS:
            raise ImageDecodeError(
                f"{stored_w}x{stored_h} image ({stored_w * stored_h:,} pixels) is over the "
                f"limit of {MAX_PIXELS:,} pixels (MAX_PIXELS): refused as a possible "
                "decompression bomb")
        if max_side is not None and max(stored_w, stored_h) > max_side:
            # Only JPEG implements draft (a no-op elsewhere): libjpeg then decodes at 1/2..1/8
            # scale and the full-size image is never in memory.
            im.draft(None, _draft_size(stored_w, stored_h, max_side))
        try:
            im.load()
        except (OSError, SyntaxError, EOFError, ValueError) as exc:
            raise ImageDecodeError(f"truncated or corrupt image data "
                                   f"({type(exc).__name__}: {exc})") from None
        # After load(): for PNG, EXIF may sit after the pixel data.
        orientation = _orientation(im)
        if max_side is not None and max(im.size) >= 2 * max_side:
            # Box-average by an integer factor (cheap, alias-free) while keeping the longer
            # side at least max_side; the final resize to the network's size comes later.
            im = _reducible(im).reduce(max(im.size) // max_side)
        im = _to_rgb(im)
        if orientation != 1:
            im = im.transpose(getattr(Image.Transpose, _TRANSPOSE_FOR_ORIENTATION[orientation]))
    for w in caught:
        logger.debug("%s: %s", path, w.message)
    width, height = (stored_h, stored_w) if orientation in (5, 6, 7, 8) else (stored_w, stored_h)
    return im, width, height


def load_rgb(path: Path, max_side: int | None = None) -> tuple[np.ndarray, int, int]:
    """Decode an image as uint8 RGB [H, W, 3], upright (EXIF), alpha composited on white.

    Args:
        path: the image file.
        max_side: the longest side the caller will use. Larger images are then decoded at
            reduced size (bounded memory): the array's longer side is at least max_side and
            less than 2 * max_side. None decodes at full size.

    Returns:
        The array (writable) and the upright image's original (width, height): boxes are
        always in the original pixel frame even when the array was decoded at reduced size.

    Raises:
        ImageDecodeError: an empty file, a file that is not a supported image, truncated or
            corrupt image data, or an image over MAX_PIXELS.
        OSError: the file cannot be opened (missing, a dangling link, no permission).
    """
    im, width, height = decode_image(path, max_side)
    view = np.asarray(im, dtype=np.uint8)  # read-only, over one copy of the pixels
    del im  # Pillow's buffer goes before the writable copy: peak 2 copies, not 3
    return view.copy(), width, height


def error_text(exc: BaseException) -> str:
    """`ExceptionType: message` on one short line, for the failure report."""
    lines = str(exc).strip().splitlines()
    msg = " ".join(x.strip() for x in lines) if lines else "(no message)"
    if len(msg) > MAX_ERROR_CHARS:
        msg = msg[: MAX_ERROR_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {msg}"


@dataclass
class Decoded:
    """One image as decoded in a DataLoader worker, or why it could not be."""

    key: str
    image: torch.Tensor | None  # [3, h, w] float in [0, 1], resized for the network
    width: int  # original (upright) size; 0 when decoding failed
    height: int
    error: str | None = None  # "ExceptionType: message" when decoding failed
    # With ImageFolder(letterbox=...): the detector input [3, net_h, net_w] and its geometry
    # (a detect.LetterboxInfo whose orig_w/orig_h are the original upright size).
    letterboxed: tuple[torch.Tensor, Any] | None = None
    # With ImageFolder(keep_rgb=True): the decoded uint8 [H, W, 3] image, upright, possibly
    # reduced (its size over width/height gives the scale).
    rgb: np.ndarray | None = None


def letterbox_decoded(rgb: np.ndarray, width: int, height: int,
                      net: tuple[int, int]) -> tuple[torch.Tensor, Any]:
    """Letterbox a decoded image into the detector input, in the geometry of its original size.

    An image decoded at full size goes through `detect.letterbox` unchanged. A reduced one is
    resized the same way (uint8 bilinear with antialiasing) straight to the placement that
    `letterbox_info` gives for the original size, so boxes map back into the original frame
    exactly, whatever the decode did.

    Args:
        rgb: uint8 [H, W, 3], upright, possibly reduced.
        width: original upright width.
        height: original upright height.
        net: detector input (width, height).

    Returns:
        [3, net_h, net_w] float in [0, 1] padded with grey, and the LetterboxInfo.
    """
    import torch.nn.functional as F

    from vlp_cli.extractors.detect import letterbox, letterbox_info, place_on_canvas

    if rgb.shape[:2] == (height, width):
        return letterbox(rgb, net)
    info = letterbox_info(width, height, net[0], net[1])
    chw = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    chw = F.interpolate(chw, size=(info.new_h, info.new_w), mode="bilinear",
                        align_corners=False, antialias=True)
    return place_on_canvas(chw[0], info), info


class ImageFolder(Dataset):
    """Decodes and resizes in DataLoader workers; a bad file becomes a Decoded with `error`.

    Args:
        items: (key, path) pairs, as from `list_images`.
        min_size: the resized image's shorter side...
        max_size: ...unless that makes the longer side exceed this (see `resize_shape`).
        letterbox: also letterbox each image into this detector input (width, height).
        keep_rgb: also hand back the decoded uint8 image (to draw on).
    """

    def __init__(self, items: list[tuple[str, Path]], min_size: int, max_size: int, *,
                 letterbox: tuple[int, int] | None = None, keep_rgb: bool = False) -> None:
        self.items = items
        self.min_size = min_size
        self.max_size = max_size
        self.letterbox = tuple(letterbox) if letterbox is not None else None
        self.keep_rgb = keep_rgb
        # Decode large enough for every consumer: neither input is ever upsampled.
        self.decode_side = max(max_size, *self.letterbox) if self.letterbox else max_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Decoded:
        from PIL import Image

        from vlp_cli.extractors.backbone import resize_shape

        key, path = self.items[i]
        try:
            im, width, height = decode_image(path, max_side=self.decode_side)
            # The network size follows the original size, not the (possibly reduced) decoded
            # one, so that it never depends on the decode path.
            w, h = resize_shape(width, height, self.min_size, self.max_size)
            small = im.resize((w, h), Image.Resampling.BILINEAR)
            # uint8 HWC -> float CHW in one pass (copy_ converts while it transposes).
            t = torch.empty((3, h, w), dtype=torch.float32).copy_(
                torch.from_numpy(np.array(small, dtype=np.uint8)).permute(2, 0, 1)).div_(255.0)
            rgb = np.array(im, dtype=np.uint8) if self.letterbox or self.keep_rgb else None
            boxed = (letterbox_decoded(rgb, width, height, self.letterbox)  # type: ignore[arg-type]
                     if self.letterbox else None)
            return Decoded(key, t, width, height, letterboxed=boxed,
                           rgb=rgb if self.keep_rgb else None)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is reported, not raised
            return Decoded(key, None, 0, 0, error_text(exc))


def collate_decoded(items: list[Decoded]) -> list[Decoded]:
    """Keep a batch as a list: images differ in size and some carry only an error."""
    return items


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's intra-op work on the calling thread only, inside the block.

    For the per-image work around the networks (resizing, letterboxing, stacking, NMS,
    RoIAlign): each op is small, so a second thread gains little, while every multi-threaded
    op waits at a barrier for all its threads. When other processes keep the cores busy that
    wait is a scheduler time slice per op: a 2 MB letterbox copy measured 0.1 ms on one
    thread and 7 ms on two (2 cores, loaded), which made the work around the networks cost
    half as much as the networks themselves. The results do not depend on the thread count
    (each output element is computed the same way), and DataLoader workers already run torch
    on one thread. The previous count is restored on exit.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The boxes-file parser lives in given.py; its names stay importable from here.
from vlp_cli.extractors.given import GivenBoxes, read_boxes_jsonl  # noqa: F401
