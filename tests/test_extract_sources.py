"""extract-features stays true to its source: changed files are re-extracted, another folder
is refused, the fingerprint follows the content, and drawings never overwrite each other."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_recipe_obj
from vlp_cli import VlpError
from vlp_cli.stores.features import FeatureStore
from vlp_cli.stores.verify import verify_store


def _recipe():
    r = tiny_recipe_obj()
    r.extract.detector = "grid"
    r.extract.batch_size = 4
    return r


def _bmp_folder(folder: Path, n: int, first: int = 0) -> Path:
    """n easy-VQA images as BMP: every file has the same size, whatever its pixels."""
    from vlp_cli.readers.easyvqa import data_root as easy_vqa_root

    src = easy_vqa_root() / "train" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.open(src / f"{first + i}.png").convert("RGB").save(folder / f"{i}.bmp")
    return folder


def test_changed_files_are_extracted_again(tmp_path: Path) -> None:
    from vlp_cli.stages import extract

    imgs = _bmp_folder(tmp_path / "imgs", 5)
    out = tmp_path / "f"
    extract.run(str(imgs), out, _recipe())
    store = FeatureStore(out)
    before = {k: store.get(k).features.copy() for k in store.keys()}
    print_before = store.fingerprint
    store.close()
    # Swap two files: sizes stay the same, contents (and hashes) change.
    a, b = (imgs / "1.bmp").read_bytes(), (imgs / "3.bmp").read_bytes()
    assert len(a) == len(b) and a != b
    (imgs / "1.bmp").write_bytes(b)
    (imgs / "3.bmp").write_bytes(a)
    extract.run(str(imgs), out, _recipe())
    store = FeatureStore(out)
    assert len(store) == 5 and store.meta["images"] == 5
    assert np.array_equal(store.get("1.bmp").features, before["3.bmp"])
    assert np.array_equal(store.get("3.bmp").features, before["1.bmp"])
    assert np.array_equal(store.get("0.bmp").features, before["0.bmp"])
    assert store.fingerprint != print_before  # the content moved, so did the fingerprint
    assert verify_store(out).ok
    # A file that no longer decodes takes its stale features with it.
    (imgs / "2.bmp").write_bytes(b"BM" + b"\0" * 40)
    extract.run(str(imgs), out, _recipe())
    store = FeatureStore(out)
    assert "2.bmp" not in store and len(store) == 4 and verify_store(out).ok


def test_another_source_folder_is_refused(tmp_path: Path) -> None:
    from vlp_cli.stages import extract

    a = _bmp_folder(tmp_path / "a", 3)
    b = _bmp_folder(tmp_path / "b", 3, first=10)  # other images, the same file names
    out = tmp_path / "f"
    extract.run(str(a), out, _recipe())
    with pytest.raises(VlpError, match=rf"f was extracted from {a.resolve()}, not "
                                       rf"{b.resolve()}: choose a new --out"):
        extract.run(str(b), out, _recipe())
    assert FeatureStore(out).meta["source"] == str(a.resolve())  # never rewritten
    extract.run(str(b), tmp_path / "g", _recipe())
    # Same extractor, same keys, other pixels: other fingerprints.
    fa, fb = FeatureStore(out), FeatureStore(tmp_path / "g")
    assert fa.extractor_fingerprint == fb.extractor_fingerprint
    assert fa.fingerprint != fb.fingerprint


def test_drawings_keep_the_original_file_name(tmp_path: Path) -> None:
    from vlp_cli.readers.easyvqa import data_root as easy_vqa_root
    from vlp_cli.stages import extract

    src = easy_vqa_root() / "train" / "images"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(src / "0.png", imgs / "cat.png")
    Image.open(src / "1.png").convert("RGB").save(imgs / "cat.jpg")
    extract.run(str(imgs), tmp_path / "f", _recipe(), draw=tmp_path / "drawn")
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["cat.jpg.jpg",
                                                                      "cat.png.jpg"]


def test_images_gone_from_the_source_are_said(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    import logging
    import shutil

    from vlp_cli.readers.easyvqa import data_root as easy_vqa_root
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import extract

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        shutil.copy(easy_vqa_root() / "train" / "images" / f"{i}.png", imgs / f"{i}.png")
    recipe = load_recipe(None, ["extract.detector=grid", "extract.min_size=64"])
    extract.run(str(imgs), tmp_path / "f", recipe)
    (imgs / "1.png").unlink()
    with caplog.at_level(logging.WARNING):
        extract.run(str(imgs), tmp_path / "f", recipe)
    assert "1 images in" in caplog.text and "no longer in" in caplog.text
