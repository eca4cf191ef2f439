"""Image listing and decoding against bad, odd and huge inputs (every fixture made here)."""

from __future__ import annotations

import json
import logging
import os
import resource
import struct
import sys
import unicodedata
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlp_cli import VlpError
from vlp_cli.extractors import images
from vlp_cli.extractors.backbone import resize_shape
from vlp_cli.extractors.images import (
    Decoded,
    ImageDecodeError,
    ImageFolder,
    collate_decoded,
    error_text,
    list_images,
    load_rgb,
    read_boxes_jsonl,
)

RED, BLUE, GREEN, YELLOW = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)


def _save(im: Image.Image, path: Path, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _halves(size: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...],
            mode: str = "RGB") -> Image.Image:
    """Left half one colour, right half another."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def _quadrants(size: tuple[int, int]) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    w, h = size
    im = Image.new("RGB", size, RED)
    im.paste(GREEN, (w // 2, 0, w, h // 2))
    im.paste(BLUE, (0, h // 2, w // 2, h))
    im.paste(YELLOW, (w // 2, h // 2, w, h))
    return im


def _assert_quadrants(arr: np.ndarray, tol: int) -> None:
    h, w = arr.shape[:2]
    for (y, x), colour in {(h // 4, w // 4): RED, (h // 4, 3 * w // 4): GREEN,
                           (3 * h // 4, w // 4): BLUE, (3 * h // 4, 3 * w // 4): YELLOW}.items():
        assert np.abs(arr[y, x].astype(int) - colour).max() <= tol, (y, x, arr[y, x], colour)


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


# --- files that are not (whole) images ---------------------------------------------------


def _bad_file(kind: str, tmp: Path) -> Path:
    if kind == "truncated-jpeg":
        data = (_save(_noise((64, 64)), tmp / "src.jpg", quality=90)).read_bytes()
        (tmp / "t.jpg").write_bytes(data[: len(data) // 2])
        return tmp / "t.jpg"
    if kind == "truncated-png":
        data = (_save(_noise((64, 64)), tmp / "src.png")).read_bytes()
        (tmp / "t.png").write_bytes(data[: len(data) // 2])
        return tmp / "t.png"
    if kind == "empty":
        (tmp / "e.jpg").write_bytes(b"")
        return tmp / "e.jpg"
    if kind == "text":
        (tmp / "x.jpg").write_text("<!DOCTYPE html><html>404 not found</html>\n")
        return tmp / "x.jpg"
    if kind == "random":
        (tmp / "y.png").write_bytes(np.random.default_rng(1).bytes(4096))
        return tmp / "y.png"
    if kind == "tiff-named-jpg":  # a real image, but in a format that is not decoded
        return _save(Image.new("RGB", (8, 8)), tmp / "z.jpg", format="TIFF")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, phrase", [
    ("truncated-jpeg", "truncated or corrupt image data"),
    ("truncated-png", "truncated or corrupt image data"),
    ("empty", "empty file (0 bytes)"),
    ("text", "not an image in a supported format (JPEG, PNG, WebP, BMP, GIF); the file "
             "starts with b'<!DOCTYPE html><'"),
    ("random", "not an image in a supported format"),
    ("tiff-named-jpg", "starts with b'II*\\x00"),
])
def test_bad_files_are_clear_one_line_errors(tmp_path: Path, kind: str, phrase: str) -> None:
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path, max_side=100)
    assert phrase in str(info.value)
    item = ImageFolder([("k", path)], 32, 64)[0]
    assert item.image is None and (item.width, item.height) == (0, 0) and item.key == "k"
    assert item.error is not None and item.error.startswith("ImageDecodeError: ")
    assert phrase in item.error and "\n" not in item.error


def test_error_text_is_one_short_line() -> None:
    assert error_text(ValueError("first\nsecond")) == "ValueError: first second"
    assert error_text(OSError()) == "OSError: (no message)"
    long = error_text(RuntimeError("x" * 10_000))
    assert len(long) <= len("RuntimeError: ") + images.MAX_ERROR_CHARS and long.endswith("...")


# --- modes and formats ---------------------------------------------------------------------


def _mode_fixture(kind: str, tmp: Path) -> tuple[Path, dict[tuple[int, int], tuple[int, ...]], int]:
    """(file, {(x, y): expected RGB}, tolerance) for one colour-mode fixture, 16x8 pixels."""
    size = (16, 8)
    if kind == "cmyk-jpeg":
        im = Image.new("CMYK", size, (0, 255, 255, 0))  # pure red in naive CMYK
        return _save(im, tmp / "cmyk.jpg", quality=95), {(4, 4): RED}, 4
    if kind == "grey-L":
        return _save(Image.new("L", size, 77), tmp / "l.png"), {(4, 4): (77, 77, 77)}, 0
    if kind == "1-bit":
        im = _halves(size, (0,), (1,), mode="1")
        return _save(im, tmp / "b.png"), {(2, 2): (0, 0, 0), (12, 2): (255, 255, 255)}, 0
    if kind in ("palette", "palette-transparent"):
        im = Image.new("P", size, 0)
        im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
        im.paste(1, (8, 0, 16, 8))
        if kind == "palette":
            return _save(im, tmp / "p.png"), {(2, 2): (10, 20, 30), (12, 2): (200, 100, 50)}, 0
        return (_save(im, tmp / "pt.png", transparency=0),
                {(2, 2): (255, 255, 255), (12, 2): (200, 100, 50)}, 0)
    if kind == "grey-16bit":
        # Values chosen so that saturating (-> 255) or wrapping (v & 255) would both show.
        vals = np.array([0, 300, 1000, 25700, 40000, 65280, 65535, 32896], np.uint16)
        arr = np.repeat(np.repeat(vals[None, :], 2, axis=1), 8, axis=0)  # 16 x 8, 2 px each
        im = Image.fromarray(arr)
        assert im.mode == "I;16"
        want = [round(int(v) / 257) for v in vals]  # 0 1 4 100 156 254 255 128
        return (_save(im, tmp / "g16.png"),
                {(2 * i, 3): (v, v, v) for i, v in enumerate(want)}, 0)
    if kind == "rgba":
        im = Image.new("RGBA", size, (255, 0, 0, 128))
        im.paste((0, 0, 0, 0), (8, 0, 16, 8))
        # 50% red over white: (255, 127.5, 127.5); fully transparent: white.
        return (_save(im, tmp / "rgba.png"),
                {(2, 2): (255, 127, 127), (12, 2): (255, 255, 255)}, 1)
    if kind == "la":
        im = Image.new("LA", size, (100, 128))
        im.paste((0, 255), (8, 0, 16, 8))
        return (_save(im, tmp / "la.png"),
                {(2, 2): (177, 177, 177), (12, 2): (0, 0, 0)}, 1)  # 100*.502 + 255*.498
    if kind == "grey-trns":
        im = _halves(size, (0,), (90,), mode="L")  # value 0 is the tRNS key colour
        return _save(im, tmp / "lt.png", transparency=0), {(2, 2): (255,) * 3,
                                                           (12, 2): (90,) * 3}, 0
    if kind == "webp-lossless":
        return (_save(Image.new("RGB", size, (10, 200, 30)), tmp / "w.webp", lossless=True),
                {(4, 4): (10, 200, 30)}, 0)
    if kind == "webp-lossy":
        return (_save(Image.new("RGB", size, (10, 200, 30)), tmp / "w.webp", quality=90),
                {(4, 4): (10, 200, 30)}, 8)
    if kind == "bmp":
        return _save(Image.new("RGB", size, (1, 2, 3)), tmp / "b.bmp"), {(4, 4): (1, 2, 3)}, 0
    if kind == "gif-named-png":
        return (_save(Image.new("RGB", size, (0, 128, 255)), tmp / "g.png", format="GIF"),
                {(4, 4): (0, 128, 255)}, 0)
    if kind == "jpeg-named-png":
        return (_save(Image.new("RGB", size, (40, 80, 160)), tmp / "j.png", format="JPEG",
                      quality=95), {(4, 4): (40, 80, 160)}, 4)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "cmyk-jpeg", "grey-L", "1-bit", "palette", "palette-transparent", "grey-16bit", "rgba",
    "la", "grey-trns", "webp-lossless", "webp-lossy", "bmp", "gif-named-png", "jpeg-named-png",
])
def test_every_mode_decodes_to_uint8_rgb(tmp_path: Path, kind: str) -> None:
    path, want, tol = _mode_fixture(kind, tmp_path)
    arr, w, h = load_rgb(path)
    assert arr.dtype == np.uint8 and arr.shape == (8, 16, 3) and (w, h) == (16, 8)
    for (x, y), colour in want.items():
        assert np.abs(arr[y, x].astype(int) - colour).max() <= tol, (x, y, arr[y, x], colour)


def test_image_folder_returns_resized_unit_float_tensor(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (40, 20), (51, 102, 255)), tmp_path / "a.png")
    item = ImageFolder([("a.png", path)], min_size=30, max_size=50)[0]
    assert item.error is None and (item.width, item.height) == (40, 20)
    assert item.image is not None and item.image.dtype == torch.float32
    assert tuple(item.image.shape) == (3, 20, 40)[:1] + resize_shape(40, 20, 30, 50)[::-1]
    assert tuple(item.image.shape) == (3, 25, 50)  # shorter side 30 would make 60 > 50
    assert torch.allclose(item.image[:, 10, 10], torch.tensor([0.2, 0.4, 1.0]))
    assert collate_decoded([item]) == [item]


def test_one_pixel_image(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (1, 1), (9, 8, 7)), tmp_path / "one.png")
    arr, w, h = load_rgb(path, max_side=64)
    assert arr.shape == (1, 1, 3) and (w, h) == (1, 1) and arr[0, 0].tolist() == [9, 8, 7]
    item = ImageFolder([("one.png", path)], 32, 64)[0]
    assert item.image is not None and tuple(item.image.shape) == (3, 32, 32)
    assert torch.allclose(item.image, torch.tensor([9, 8, 7]).view(3, 1, 1) / 255.0)


# --- EXIF orientation ----------------------------------------------------------------------


@pytest.mark.parametrize("orientation, top, bottom, left, right", [
    (1, None, None, RED, BLUE),
    (3, None, None, BLUE, RED),  # rotated 180
    (6, RED, BLUE, None, None),  # stored rotated 90 counter-clockwise: the left goes on top
    (8, BLUE, RED, None, None),
])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_comes_back_upright(tmp_path: Path, orientation: int, top: Any,
                                             bottom: Any, left: Any, right: Any,
                                             fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(_halves((40, 20), RED, BLUE), tmp_path / f"o.{fmt.lower()}", format=fmt,
                 exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    arr, w, h = load_rgb(path)
    upright = (20, 40) if orientation in (6, 8) else (40, 20)
    assert (w, h) == upright and arr.shape == (upright[1], upright[0], 3)
    H, W = arr.shape[:2]
    probes = {"top": (H // 4, W // 2), "bottom": (3 * H // 4, W // 2),
              "left": (H // 2, W // 4), "right": (H // 2, 3 * W // 4)}
    for where, colour in (("top", top), ("bottom", bottom), ("left", left), ("right", right)):
        if colour is not None:
            assert np.abs(arr[probes[where]].astype(int) - colour).max() <= 8, where
    item = ImageFolder([("o", path)], 20, 100)[0]
    assert (item.width, item.height) == upright and item.image is not None
    assert tuple(item.image.shape[1:]) == resize_shape(*upright, 20, 100)[::-1]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillows_exif_transpose(tmp_path: Path, orientation: int) -> None:
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(_noise((7, 5), seed=orientation), tmp_path / "n.png", exif=exif)
    arr, w, h = load_rgb(path)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(arr, want) and (w, h) == (want.shape[1], want.shape[0])


def test_corrupt_exif_does_not_fail_a_good_image(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (8, 4), (0, 99, 0)), tmp_path / "e.jpg", quality=95,
                 exif=b"Exif\x00\x00MM\x00*garbage-that-is-not-a-tiff-ifd")
    arr, w, h = load_rgb(path)
    assert (w, h) == (8, 4) and abs(int(arr[2, 4, 1]) - 99) <= 3


# --- large images and bombs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12000 x 9000 (108 Mpixel) quadrant JPEG: 324 MB as decoded RGB, ~1.5 MB on disk."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    big = _quadrants((120, 90)).resize((12000, 9000), Image.Resampling.NEAREST)
    big.save(path, quality=5)
    return path


def test_huge_jpeg_decodes_reduced_in_the_original_frame(huge_jpeg: Path) -> None:
    arr, w, h = load_rgb(huge_jpeg, max_side=1333)
    assert (w, h) == (12000, 9000)
    assert 1333 <= arr.shape[1] < 2 * 1333 and arr.shape[1] / arr.shape[0] == pytest.approx(4 / 3,
                                                                                           rel=0.01)
    _assert_quadrants(arr, tol=40)
    item = ImageFolder([("huge.jpg", huge_jpeg)], 800, 1333)[0]
    assert item.error is None and (item.width, item.height) == (12000, 9000)
    assert item.image is not None and tuple(item.image.shape) == (3, 800, 1067)


def _in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run fn in a forked child (fresh peak-RSS counter at the current RSS); its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            payload = json.dumps(fn())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload, code = json.dumps({"error": repr(exc)}), 1
        finally:
            try:
                os.write(write_end, payload.encode())
            finally:
                os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result
    return result


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB after fork: Linux")
def test_huge_jpeg_is_never_materialised(huge_jpeg: Path) -> None:
    def measure() -> dict[str, Any]:
        def peak_mib() -> float:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        base = peak_mib()
        arr, w, h = load_rgb(huge_jpeg, max_side=1333)
        reduced = peak_mib() - base
        shape = list(arr.shape)
        del arr
        # Control: the same measurement sees a full decode, so the bound above means something.
        full_arr, _, _ = load_rgb(huge_jpeg)
        full = peak_mib() - base
        return {"reduced_mib": reduced, "full_mib": full, "shape": shape,
                "full_shape": list(full_arr.shape)}

    r = _in_child(measure)
    full_rgb_mib = 12000 * 9000 * 3 / 2**20  # 309 MiB
    assert r["shape"] == [1125, 1500, 3] and r["full_shape"] == [9000, 12000, 3]
    assert r["full_mib"] > full_rgb_mib  # decoded image + its array copy
    assert r["reduced_mib"] < 48, r  # under a sixth of the full image: never materialised


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P-transparent", "I;16", "1"])
def test_large_non_jpeg_is_reduced_with_original_size(tmp_path: Path, mode: str) -> None:
    # 1200 x 800, max_side 200: box-reduced by 6 to 200 x 134 (ceil), in each mode's own way.
    size, kw = (1200, 800), {}
    quad = _quadrants(size)
    white = (255, 255, 255)
    # Probes in the reduced image: (row, column) -> RGB.
    want = {(30, 50): RED, (30, 150): GREEN, (100, 50): BLUE, (100, 150): YELLOW}
    if mode == "RGB":
        im = quad
    elif mode == "RGBA":
        im = quad.convert("RGBA")
        im.paste((0, 0, 0, 0), (0, 0, 600, 400))  # top-left fully transparent: white
        want[(30, 50)] = white
    elif mode == "P-transparent":
        im = quad.quantize(4)
        kw = {"transparency": int(np.asarray(im)[0, 0])}  # the red entry
        want[(30, 50)] = white
    elif mode == "I;16":
        arr16 = np.full((800, 1200), 65535, np.uint16)
        arr16[:, 600:] = 25700
        im = Image.fromarray(arr16)
        want = {(60, 50): white, (60, 150): (100, 100, 100)}
    else:
        im = _halves(size, (0,), (1,), mode="1")
        want = {(60, 50): (0, 0, 0), (60, 150): white}
    path = _save(im, tmp_path / "big.png", **kw)
    arr, w, h = load_rgb(path, max_side=200)
    assert (w, h) == size and arr.dtype == np.uint8 and arr.shape == (134, 200, 3)
    for (y, x), colour in want.items():
        assert arr[y, x].tolist() == list(colour), (y, x)


def test_oriented_large_jpeg_reports_upright_original_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(_halves((4000, 3000), RED, BLUE), tmp_path / "p.jpg", exif=exif, quality=50)
    arr, w, h = load_rgb(path, max_side=500)
    assert (w, h) == (3000, 4000)
    assert 500 <= arr.shape[0] < 1000 and arr.shape[0] > arr.shape[1]  # portrait, reduced
    assert np.abs(arr[arr.shape[0] // 4, arr.shape[1] // 2].astype(int) - RED).max() <= 8


@pytest.mark.parametrize("size", [(25_000, 20_000), (100_000, 100_000)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path,
                                                       size: tuple[int, int]) -> None:
    # 500 Mpixels trips our own check; 10 Gpixels trips Pillow's (at 2 x MAX_PIXELS) first.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(*size))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_rgb(path, max_side=100)
    item = ImageFolder([("bomb.png", path)], 32, 64)[0]
    assert item.error is not None and item.error.startswith("ImageDecodeError: ")
    assert "decompression bomb" in item.error


def test_max_pixels_is_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    ok = _save(Image.new("RGB", (100, 100)), tmp_path / "ok.png")
    big = _save(Image.new("RGB", (101, 100)), tmp_path / "big.png")
    assert load_rgb(ok)[0].shape == (100, 100, 3)
    with pytest.raises(ImageDecodeError, match=r"101x100 image \(10,100 pixels\) is over the "
                       r"limit of 10,000 pixels \(MAX_PIXELS\)"):
        load_rgb(big)


# --- listing: names, symlinks, hidden files ------------------------------------------------


def test_unicode_and_duplicate_names_get_distinct_nfc_keys(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _save(Image.new("RGB", (4, 4), RED), root / "café" / "猫.png")
    _save(Image.new("RGB", (4, 4), GREEN), root / "a" / "1.png")
    _save(Image.new("RGB", (4, 4), BLUE), root / "b" / "1.png")
    nfd = unicodedata.normalize("NFD", "naïve")  # as macOS hands it out
    assert nfd != "naïve"
    _save(Image.new("RGB", (4, 4), YELLOW), root / nfd / "x.png")
    files = list_images(root)
    keys = [k for k, _ in files]
    assert keys == ["a/1.png", "b/1.png", "café/猫.png", "naïve/x.png"]
    assert all(unicodedata.is_normalized("NFC", k) for k in keys)
    got = {x.key: x for x in (ImageFolder(files, 4, 8)[i] for i in range(len(files)))}
    for key, colour in (("a/1.png", GREEN), ("b/1.png", BLUE), ("café/猫.png", RED),
                        ("naïve/x.png", YELLOW)):
        image = got[key].image
        assert got[key].error is None and image is not None
        assert (image[:, 0, 0] * 255).round().tolist() == list(colour)


def test_names_equal_after_nfc_keep_one_and_warn(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    nfc, nfd = "é.png", unicodedata.normalize("NFD", "é.png")
    _save(Image.new("RGB", (4, 4), RED), tmp_path / nfc)
    _save(Image.new("RGB", (4, 4), BLUE), tmp_path / nfd)
    if len(os.listdir(tmp_path)) != 2:
        pytest.skip("this file system normalises names itself")
    with caplog.at_level(logging.WARNING, logger="vlp_cli.extractors.images"):
        files = list_images(tmp_path)
    assert [k for k, _ in files] == [nfc]
    assert files[0][1].name == min(nfc, nfd)  # deterministic: code-point order of real names
    assert "Unicode normalisation" in caplog.text


def test_undecodable_name_bytes_become_escaped_keys(tmp_path: Path) -> None:
    name = os.fsdecode(b"bad\xff.png")
    try:
        _save(Image.new("RGB", (4, 4), GREEN), tmp_path / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    files = list_images(tmp_path)
    assert [k for k, _ in files] == ["bad\\xff.png"]
    files[0][0].encode("utf-8")  # storable key
    assert load_rgb(files[0][1])[0][0, 0].tolist() == list(GREEN)


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32",
                    reason="needs POSIX symlinks and FIFOs")
def test_symlink_and_hidden_file_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    _save(Image.new("RGB", (4, 4), RED), root / "a" / "1.png")
    _save(Image.new("RGB", (4, 4), RED), root / "UPPER.JPG", format="JPEG")
    for hidden in (".hidden.png", ".ipynb_checkpoints/1-checkpoint.png", "._1.png",
                   "sub/.cache/x.png"):
        _save(Image.new("RGB", (4, 4)), root / hidden)
    (root / "notes.txt").write_text("not an image")
    (root / "link.png").symlink_to(root / "a" / "1.png")  # file link: followed
    (root / "dirlink").symlink_to(root / "a", target_is_directory=True)  # folder link: followed
    (root / "a" / "up").symlink_to("..", target_is_directory=True)  # loop: cut
    (root / "dangling.png").symlink_to(root / "missing.png")  # listed, fails when decoded
    os.mkfifo(root / "fifo.png")  # would block a reader forever: skipped
    (root / "folder.png").mkdir()  # a folder with an image name: walked, not listed
    with caplog.at_level(logging.WARNING, logger="vlp_cli.extractors.images"):
        files = list_images(root)
    assert [k for k, _ in files] == ["UPPER.JPG", "a/1.png", "dangling.png", "dirlink/1.png",
                                     "link.png"]
    assert "a folder link back to one of its own parents" in caplog.text
    items = {x.key: x for x in (ImageFolder(files, 4, 8)[i] for i in range(len(files)))}
    assert items["link.png"].error is None and items["dirlink/1.png"].error is None
    assert items["dangling.png"].error is not None
    assert items["dangling.png"].error.startswith("FileNotFoundError: ")


def test_list_images_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(VlpError, match="does not exist or is not a folder"):
        list_images(tmp_path / "nope")


def test_bad_files_flow_through_dataloader_workers(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for i in range(5):
        _save(Image.new("RGB", (8 + i, 6), (i * 40, 0, 0)), root / f"good{i}.png")
    for kind in ("truncated-jpeg", "empty", "text", "random"):
        sub = root / kind
        sub.mkdir()
        _bad_file(kind, sub)
        for extra in sub.glob("src.*"):
            extra.unlink()
    loader = DataLoader(ImageFolder(list_images(root), 8, 16), batch_size=3, num_workers=2,
                        collate_fn=collate_decoded)
    seen: list[Decoded] = [x for batch in loader for x in batch]
    assert len(seen) == 9
    assert sorted(x.key for x in seen if x.error is None) == [f"good{i}.png" for i in range(5)]
    assert all(x.error.startswith("ImageDecodeError: ") for x in seen if x.error is not None)


# --- given boxes ---------------------------------------------------------------------------


def test_read_boxes_jsonl_nfc_bom_and_line_separators(tmp_path: Path) -> None:
    nfd_key = unicodedata.normalize("NFD", "café/1.png")
    recs = [{"image": nfd_key, "boxes": [[0, 0, 2, 2]], "labels": ["cat\u2028dog"]},
            {"image": "b.png", "boxes": [], "labels": []}]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in recs)
    path = tmp_path / "boxes.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    given = read_boxes_jsonl(path)
    assert sorted(given.boxes) == ["b.png", "café/1.png"]
    assert given.labels == ["cat\u2028dog"]
    assert given.boxes["café/1.png"][2].tolist() == [1.0]


@pytest.mark.parametrize("line, phrase", [
    ('{"image": "a", "boxes": [[0, 0, 1, 1]], "labels": ["x"], "scores": ["high"]}',
     "line 2: 'scores' must be numbers"),
    ('{"image": "a", "boxes": [[0, 0, 1, 1]], "labels": ["x"], "scores": [NaN]}',
     "line 2: 'scores' must be finite"),
])
def test_read_boxes_jsonl_bad_scores_name_the_line(tmp_path: Path, line: str,
                                                   phrase: str) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"image": "ok", "boxes": [], "labels": []}\n' + line + "\n")
    with pytest.raises(VlpError, match=phrase):
        read_boxes_jsonl(path)


def test_read_boxes_jsonl_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"image": "ok", "boxes": [], "labels": []}\n{"image": "\xff"}\n')
    with pytest.raises(VlpError, match="line 2: not UTF-8"):
        read_boxes_jsonl(path)


# --- detector input and kept pixels --------------------------------------------------------


def test_letterbox_of_reduced_decode_keeps_the_original_geometry(tmp_path: Path) -> None:
    from vlp_cli.extractors.detect import PAD_VALUE, letterbox, letterbox_info

    path = _save(_quadrants((3000, 1000)), tmp_path / "wide.jpg", quality=90)
    item = ImageFolder([("wide.jpg", path)], 100, 200, letterbox=(416, 416), keep_rgb=True)[0]
    assert item.error is None
    assert item.letterboxed is not None and item.rgb is not None
    canvas, info = item.letterboxed
    assert info == letterbox_info(3000, 1000, 416, 416)  # orig_w/h: the original frame
    assert (info.new_w, info.new_h, info.pad_y) == (416, 138, 139)
    assert tuple(canvas.shape) == (3, 416, 416)
    assert torch.all(canvas[:, : info.pad_y] == PAD_VALUE)
    assert torch.all(canvas[:, info.pad_y + info.new_h:] == PAD_VALUE)
    inside = (canvas[:, info.pad_y:info.pad_y + info.new_h] * 255).round()
    assert inside[:, 30, 100].tolist() == pytest.approx(list(RED), abs=6)
    assert inside[:, 100, 300].tolist() == pytest.approx(list(YELLOW), abs=6)
    # Decoded for the larger consumer (416 > 200) at JPEG draft 1/4: 750 x 250, uint8.
    assert item.rgb.dtype == np.uint8 and item.rgb.shape == (250, 750, 3)
    assert (item.width, item.height) == (3000, 1000) and tuple(item.image.shape) == (3, 67, 200)
    # A full-size decode is letterboxed exactly as detect.letterbox does it.
    small = _save(_quadrants((300, 100)), tmp_path / "small.png")
    item = ImageFolder([("small.png", small)], 100, 416, letterbox=(416, 416))[0]
    want, want_info = letterbox(load_rgb(small)[0], 416)
    assert item.letterboxed is not None and item.letterboxed[1] == want_info
    assert torch.equal(item.letterboxed[0], want) and item.rgb is None
