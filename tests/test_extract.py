"""extract-features as a stage: failures, resume after SIGKILL, shards, detection on photos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_recipe_obj
from vlp_cli import VlpError
from vlp_cli.stores.features import FeatureStore

PHOTOS = Path(os.environ.get("VLP_DARKNET_DATA", "/usr/share/darknet/data"))


def _easy_vqa_folder(root: Path, n: int) -> Path:
    from vlp_cli.readers.easyvqa import data_root as easy_vqa_root

    src = easy_vqa_root() / "train" / "images"
    for i in range(n):
        (root / "imgs" / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(src / f"{i}.png", root / "imgs" / f"d{i % 3}" / f"{i}.png")
    return root / "imgs"


def _grid_recipe():
    r = tiny_recipe_obj()
    r.extract.detector = "grid"
    r.extract.batch_size = 4
    return r


def test_bad_files_are_reported_and_skipped(tmp_path: Path) -> None:
    from vlp_cli.stages import extract

    imgs = _easy_vqa_folder(tmp_path, 6)
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (imgs / "notes.jpg").write_text("not an image")
    extract.run(str(imgs), tmp_path / "f", _grid_recipe())
    store = FeatureStore(tmp_path / "f")
    assert len(store) == 6
    report = [json.loads(x) for x in (tmp_path / "f" / "failures.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in report) == ["broken.png", "notes.jpg"]
    assert store.meta["failures_total"] == 2
    r = store.get("d0/0.png")
    assert len(r) == 9 and r.image_feature is not None  # 3x3 grid + whole image
    assert (r.class_ids == -1).all()  # grid cells carry no tag
    with pytest.raises(VlpError, match="--strict"):
        extract.run(str(imgs), tmp_path / "g", _grid_recipe(), strict=True)


def test_fine_stride_appends_the_finer_map_and_keeps_the_rest(tmp_path: Path) -> None:
    """extract.fine_stride: the stride-8 map's 40 channels after the same 1280; the store
    says so, and an extractor rebuilt from its metadata makes the same features."""
    from vlp_cli.extractors.pipeline import Extractor
    from vlp_cli.stages import extract

    imgs = _easy_vqa_folder(tmp_path, 3)
    plain = _grid_recipe()
    plain.extract.fine_stride = 0
    extract.run(str(imgs), tmp_path / "plain", plain)
    fine = _grid_recipe()
    fine.extract.fine_stride = 8
    extract.run(str(imgs), tmp_path / "fine", fine)
    a, b = FeatureStore(tmp_path / "plain"), FeatureStore(tmp_path / "fine")
    assert (a.feature_dim, b.feature_dim) == (1280, 1320)
    assert a.fingerprint != b.fingerprint
    ra, rb = a.get("d0/0.png"), b.get("d0/0.png")
    np.testing.assert_array_equal(rb.features[:, :1280], ra.features)
    assert np.abs(rb.features[:, 1280:].astype(np.float32)).sum() > 0
    np.testing.assert_array_equal(rb.image_feature[:1280], ra.image_feature)
    rebuilt = Extractor.from_meta(b.meta).backbone
    assert rebuilt.feature_dim == 1320
    # a narrow image (26 pixels: its maps' size ratios are not the strides) gets its fine map
    import torch
    coarse, fine_map = rebuilt(torch.rand(1, 3, 300, 26))
    assert fine_map.shape[1] == 40 and fine_map.shape[-1] == 4 and coarse.shape[1] == 1280


def test_killed_extraction_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    imgs = _easy_vqa_folder(tmp_path, 60)
    out = tmp_path / "f"
    cmd = [sys.executable, "-m", "vlp_cli", "extract-features", str(imgs), "--out", str(out),
           "--set", "extract.detector=grid", "--set", "extract.batch_size=4",
           "--set", "extract.min_size=64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait until some batches are committed, then kill without warning.
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        if (out / "data.mdb").is_file() and (out / "data.mdb").stat().st_size > 200_000:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = FeatureStore(out, allow_incomplete=True)  # refused by default
    done = len(partial)
    assert 0 < done < 60, done  # killed mid-way (if this fails the machine was too fast)
    for key in partial.keys():  # every committed record is whole
        assert len(partial.get(key)) == 9
    partial.close()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = FeatureStore(out)
    keys = store.keys()
    assert len(keys) == len(set(keys)) == 60
    assert store.meta["complete"] is True


def test_shards_read_as_one_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp_cli.stages import extract

    imgs = _easy_vqa_folder(tmp_path, 10)
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        extract.run(str(imgs), tmp_path / "f", _grid_recipe())
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "shard-00000-of-00002", "shard-00001-of-00002"]
    store = FeatureStore(tmp_path / "f")
    assert len(store) == 10 and store.meta["shards"] == 2
    assert sorted(store.keys()) == sorted(f"d{i % 3}/{i}.png" for i in range(10))
    assert len(store.get("d1/4.png")) == 9
    # A manifest names the same parts explicitly.
    (tmp_path / "m.json").write_text(json.dumps({"stores": [
        "f/shard-00000-of-00002", "f/shard-00001-of-00002"]}))
    assert len(FeatureStore(tmp_path / "m.json")) == 10
    # A rerun with one process skips what the shards already hold.
    (imgs / "extra.png").write_bytes((imgs / "d0" / "0.png").read_bytes())
    extract.run(str(imgs), tmp_path / "f", _grid_recipe())
    store = FeatureStore(tmp_path / "f")
    assert len(store) == 11 and store.meta["shards"] == 3
    assert len(FeatureStore(tmp_path / "f" / "shard-00000-of-00001")) == 1  # only the new one


@pytest.mark.slow
def test_detector_finds_the_obvious_objects_and_draws_them(tmp_path: Path) -> None:
    """Debian's darknet photos (dog, bicycle, car; person, horse) when installed (.ci/run
    installs them), else scikit-image's photos that ship with pip (person, cup)."""
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import extract

    imgs = tmp_path / "photos"
    imgs.mkdir()
    sets = ["data.conf_th=0.3", "data.min_boxes=1"]
    if (PHOTOS / "dog.jpg").is_file():
        for name in ("dog.jpg", "person.jpg", "horses.jpg"):
            shutil.copy(PHOTOS / name, imgs / name)
        expect = {"dog.jpg": {"dog", "bicycle", "car"}, "person.jpg": {"person", "horse"},
                  "horses.jpg": {"horse"}}
    else:
        from PIL import Image
        from skimage import data as skdata

        Image.fromarray(skdata.astronaut()).save(imgs / "astronaut.png")
        Image.fromarray(skdata.coffee()).save(imgs / "coffee.png")
        # YOLOv3-tiny finds the astronaut only at a 320 input (Darknet itself does the same).
        sets += ["extract.detector_input=320", "data.conf_th=0.2"]
        expect = {"astronaut.png": {"person"}, "coffee.png": {"cup"}}
    recipe = load_recipe("tiny", sets)
    extract.run(str(imgs), tmp_path / "f", recipe, draw=tmp_path / "drawn")
    store = FeatureStore(tmp_path / "f")
    assert store.meta["extractor"]["boxes"]["source"] == "detector"
    assert len(store.labels) == 80 and "traffic light" in store.labels
    for key, tags in expect.items():
        r = store.get_selected(key, recipe.data.conf_th, 1, 100)
        assert tags <= {store.labels[c] for c in r.class_ids}, key
        full = store.get(key)
        assert full.class_probs is not None
        assert np.allclose(full.class_probs.astype(np.float32).sum(1), 1, atol=1e-2)
    if "dog.jpg" in expect:
        r = store.get("dog.jpg")
        assert (r.width, r.height) == (768, 576)
        dog = r.boxes[[store.labels[c] == "dog" for c in r.class_ids]][0]
        assert dog[0] < 250 and dog[2] > 250 and dog[3] > 400  # the dog sits bottom left
    drawn = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert drawn == sorted(f"{k}.jpg" for k in expect)  # the key's own name + .jpg


def test_folded_backbone_computes_what_the_released_one_does() -> None:
    # load_backbone folds each BatchNorm into its convolution, pads stride-1 convolutions
    # inside them and runs channels-last: the same maps as the package's own network.
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from vlp_cli.assets import backbone_weights
    from vlp_cli.extractors.backbone import load_backbone

    folded = load_backbone("efficientnet-lite0", fine_stride=8)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    plain = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    plain.load_state_dict(torch.load(backbone_weights(), map_location="cpu", weights_only=True))
    plain.eval()
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        coarse, fine = folded(images)
        expected = plain.extract_features((images - 0.5) / 0.5)
    assert coarse.shape == expected.shape and fine.shape[1:] == (40, 12, 16)
    torch.testing.assert_close(coarse, expected, atol=1e-3, rtol=1e-3)
