from pathlib import Path

import numpy as np
import pytest

from conftest import LABELS, make_regions
from vlp_cli import VlpError
from vlp_cli.stores.corpus import Corpus, CorpusWriter
from vlp_cli.stores.features import (
    FeatureStore,
    FeatureStoreWriter,
    Regions,
    decode_regions,
    encode_regions,
    position_features,
    select_count,
)


def test_record_round_trip_sorted_by_confidence() -> None:
    rng = np.random.default_rng(1)
    r = make_regions(rng, 7, 12, with_probs=True)
    back = decode_regions(encode_regions(r))
    order = np.argsort(-r.confidences, kind="stable")
    assert np.array_equal(back.features, r.features[order])
    assert np.array_equal(back.boxes, r.boxes[order])
    assert np.array_equal(back.class_ids, r.class_ids[order])
    assert np.array_equal(back.confidences, r.confidences[order])
    assert np.array_equal(back.class_probs, r.class_probs[order])
    assert np.array_equal(back.image_feature, r.image_feature)
    assert (back.width, back.height) == (64, 64)
    assert np.all(np.diff(back.confidences) <= 0)
    limited = decode_regions(encode_regions(r), limit=3)
    assert len(limited) == 3 and np.array_equal(limited.features, back.features[:3])


def test_empty_record_and_no_optional_parts() -> None:
    r = Regions(np.zeros((0, 8), np.float16), np.zeros((0, 4), np.float32),
                np.zeros(0, np.int32), np.zeros(0, np.float32), 10, 20)
    back = decode_regions(encode_regions(r))
    assert len(back) == 0 and back.features.shape == (0, 8)
    assert back.class_probs is None and back.image_feature is None


def test_select_count_is_uniters_policy() -> None:
    conf = np.array([0.9, 0.8, 0.3, 0.1, 0.05], np.float32)
    assert select_count(conf, 0.2, 1, 100) == 3  # above threshold
    assert select_count(conf, 0.2, 4, 100) == 4  # at least min_boxes
    assert select_count(conf, 0.2, 1, 2) == 2  # at most max_boxes
    assert select_count(conf, 0.2, 10, 100) == 5  # never more than there are


def test_position_features() -> None:
    boxes = np.array([[10, 20, 30, 60]], np.float32)
    p7 = position_features(boxes, 100, 200, "uniter7")
    np.testing.assert_allclose(p7[0], [0.1, 0.1, 0.3, 0.3, 0.2, 0.2, 0.04], rtol=1e-6)
    p6 = position_features(boxes, 100, 200, "oscar6")
    np.testing.assert_allclose(p6[0], [0.1, 0.1, 0.3, 0.3, 0.2, 0.2], rtol=1e-6)


def test_feature_store_resume_and_selection(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    meta = {"extractor": {"name": "x"}, "feature_dim": 12, "labels": LABELS}
    w = FeatureStoreWriter(tmp_path / "f", meta, commit_every=2)
    records = {f"a/{i}.jpg": make_regions(rng, 6, 12) for i in range(5)}
    for k, r in list(records.items())[:3]:
        w.put(k, r)
    w.flush()
    w._w.env.close()  # simulate a killed run: no close(), pending nothing
    w2 = FeatureStoreWriter(tmp_path / "f", meta)
    assert set(w2.done) == {k.encode() for k in list(records)[:3]}
    for k, r in records.items():
        w2.put(k, r)  # already-present keys are skipped
    w2.close()
    store = FeatureStore(tmp_path / "f")
    assert len(store) == 5 and sorted(store.keys()) == sorted(records)
    assert store.labels == LABELS and store.feature_dim == 12
    r = records["a/1.jpg"]
    sel = store.get_selected("a/1.jpg", 0.5, 1, 100)
    assert len(sel) == max(1, int((r.confidences >= 0.5).sum()))
    assert np.all(sel.confidences >= min(0.5, r.confidences.max()))
    with pytest.raises(KeyError):
        store.get("missing")
    info = store.describe()
    assert info["images"] == 5 and info["boxes_per_image"]["max"] == 6


def test_feature_store_refuses_other_extractor(tmp_path: Path) -> None:
    w = FeatureStoreWriter(tmp_path / "f", {"extractor": {"name": "a"}, "feature_dim": 4})
    w.close()
    with pytest.raises(VlpError, match="another extractor"):
        FeatureStoreWriter(tmp_path / "f", {"extractor": {"name": "b"}, "feature_dim": 4})
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x.txt").write_text("x")
    with pytest.raises(VlpError, match="not a feature store"):
        FeatureStoreWriter(tmp_path / "g", {"extractor": {}, "feature_dim": 4})
    with pytest.raises(VlpError, match="does not exist"):
        FeatureStore(tmp_path / "nope")


def test_corpus_round_trip_and_atomic_rename(tmp_path: Path) -> None:
    w = CorpusWriter(tmp_path / "c", {})
    assert not (tmp_path / "c").exists()  # written under a temporary name until closed
    for i in range(5):
        w.add({"kind": "vqa" if i % 2 else "caption", "split": "train" if i < 4 else "test",
               "source": "test", "images": [f"k{i}"], "texts": ["t"],
               "segments": [list(range(i + 1))], "label": ["yes"] if i % 2 else None,
               "id": None})
    # Several images and text segments (NLVR2, VCR), and any kind name.
    w.add({"kind": "pair", "split": "test", "source": "test", "images": ["k0", "k1"],
           "texts": ["a", "b"], "segments": [[1], [2, 3]], "label": True, "id": "p0"})
    w.close()
    c = Corpus(tmp_path / "c")
    assert len(c) == 6 and c.meta["schema_version"] == 3
    assert c.get(3)["segments"] == [[0, 1, 2, 3]] and c.get(3)["label"] == ["yes"]
    assert c.get(5)["images"] == ["k0", "k1"] and list(c.indices("pair", "test")) == [5]
    assert list(c.indices("caption", "train")) == [0, 2]
    assert list(c.indices("vqa", "train")) == [1, 3]
    assert list(c.lengths) == [1, 2, 3, 4, 5, 3]
    with pytest.raises(VlpError, match="no 'vqa' examples in split 'test'"):
        c.require("vqa", "test")
    with pytest.raises(VlpError, match="not empty"):
        CorpusWriter(tmp_path / "c", {})


def test_corpus_abort_leaves_nothing(tmp_path: Path) -> None:
    w = CorpusWriter(tmp_path / "c", {})
    w.add({"kind": "caption", "split": "train", "source": "s", "images": ["k"], "texts": ["t"],
           "segments": [[1]], "label": None, "id": None})
    w.abort()
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
