"""Caption data sets in their released formats: the Karpathy splits (COCO, Flickr30K) and
Conceptual Captions / SBU TSV files, read into corpus examples and built into a corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_regions
from vlp_cli.cli import app
from vlp_cli.readers import caption_tsv, karpathy, reader_for

FIX = Path(__file__).parent / "fixtures"
COCO = FIX / "karpathy" / "dataset_coco.json"
F30K = FIX / "karpathy" / "dataset_flickr30k.json"
CC = FIX / "cc" / "Train_GCC-training.tsv"


def test_karpathy_coco_splits_restval_into_train(tmp_path: Path) -> None:
    assert reader_for(str(COCO)) is karpathy and reader_for(str(F30K)) is karpathy
    exs = karpathy.read(str(COCO), tmp_path)
    assert len(exs) == 6
    by_image = {}
    for e in exs:
        by_image.setdefault(e["images"][0], set()).add(e["split"])
    assert by_image == {"COCO_val2014_000000391895.jpg": {"test"},
                        "COCO_val2014_000000522418.jpg": {"train"},  # restval
                        "COCO_train2014_000000318556.jpg": {"train"},
                        "COCO_val2014_000000184613.jpg": {"val"}}
    first = exs[0]
    assert first["kind"] == "caption" and first["id"] == 770337
    assert first["texts"] == ["A man with a red helmet on a small moped on a dirt road."]
    test_only = karpathy.read(f"test={COCO}", tmp_path)
    assert {e["images"][0] for e in test_only} == {"COCO_val2014_000000391895.jpg"}
    f30k = karpathy.read(str(F30K), tmp_path)
    assert [e["images"][0] for e in f30k] == ["1000092795.jpg"] * 2 + ["10002456.jpg"]


def test_conceptual_captions_tsv(tmp_path: Path) -> None:
    assert reader_for(str(CC)) is caption_tsv
    exs = caption_tsv.read(str(CC), tmp_path)
    assert [e["images"][0] for e in exs] == ["000000000.jpg", "000000001.jpg", "my-girl.jpg"]
    assert [e["id"] for e in exs] == [1, 2, 4] and {e["split"] for e in exs} == {"train"}
    assert exs[0]["texts"] == ["a very typical bus station"]
    assert {e["split"] for e in caption_tsv.read(f"val={CC}", tmp_path)} == {"val"}
    bad = tmp_path / "bad.tsv"
    bad.write_text("just a caption\n")
    from vlp_cli import VlpError

    with pytest.raises(VlpError, match=r"bad\.tsv:1: expected `caption<TAB>image"):
        caption_tsv.read(str(bad), tmp_path)


def _store(path: Path) -> None:
    """A synthetic feature store with the Karpathy fixture's images."""
    from vlp_cli.stores.features import FeatureStoreWriter

    rng = np.random.default_rng(0)
    w = FeatureStoreWriter(path, {"extractor": {"name": "synthetic"}, "feature_dim": 16,
                                  "labels": ["a", "b"]})
    for im in json.loads(COCO.read_text())["images"]:
        w.put(im["filename"], make_regions(rng, 3, 16))
    w.close()


def test_build_corpus_from_the_karpathy_file(tmp_path: Path) -> None:
    _store(tmp_path / "features")
    res = CliRunner().invoke(app, ["build-corpus", str(COCO), "--features",
                                   str(tmp_path / "features"), "--out", str(tmp_path / "c"),
                                   "--set", "corpus.tokenizer=embedded:minilm"])
    assert res.exit_code == 0, res.output
    info = json.loads(CliRunner().invoke(app, ["inspect", str(tmp_path / "c"),
                                               "--json"]).stdout)
    assert info["counts"] == {"caption/test": 2, "caption/train": 3, "caption/val": 1}


def test_exclude_drops_the_images_of_evaluation_splits(tmp_path: Path) -> None:
    """UNITER's cleaning: a pre-training corpus built from the Karpathy file without any image
    of COCO's val2014 captions (three of the four images): their 4 examples go, the count is
    recorded in the corpus."""
    _store(tmp_path / "features")
    res = CliRunner().invoke(app, ["build-corpus", str(COCO), "--features",
                                   str(tmp_path / "features"), "--out", str(tmp_path / "c"),
                                   "--exclude", str(FIX / "coco" / "captions_val2014.json"),
                                   "--set", "corpus.tokenizer=embedded:minilm",
                                   "--set", "corpus.val_fraction=0"])
    assert res.exit_code == 0, res.output
    info = json.loads(CliRunner().invoke(app, ["inspect", str(tmp_path / "c"),
                                               "--json"]).stdout)
    assert info["counts"] == {"caption/train": 2}
    assert info["meta"]["excluded"] == {"sources": [str(FIX / "coco" / "captions_val2014.json")],
                                        "images": 3, "examples": 4}
