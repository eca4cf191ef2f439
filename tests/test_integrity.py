"""Damage cannot pass silently: record checksums, vlp verify, content fingerprints,
incomplete stores, and stores written by vlp 0.1 (schema 1)."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import LABELS, make_regions
from vlp_cli import VlpError
from vlp_cli.cli import app
from vlp_cli.stores.corpus import Corpus, CorpusWriter
from vlp_cli.stores.features import (FeatureStore, FeatureStoreWriter, decode_regions,
                                     encode_regions)
from vlp_cli.stores.integrity import DamagedRecord
from vlp_cli.stores.lmdb_env import Writer
from vlp_cli.stores.records import HEADER_V1
from vlp_cli.stores.verify import verify_store

META = {"extractor": {"name": "synthetic"}, "feature_dim": 16, "labels": LABELS}


def _write_store(path: Path, n: int, seed: int = 0, keys: str = "img/{}.png",
                 **kw: object) -> dict[str, bytes]:
    """A store of n records; returns each key's record bytes as written."""
    rng = np.random.default_rng(seed)
    w = FeatureStoreWriter(path, META, commit_every=10_000, **kw)
    out = {}
    for i in range(n):
        r = make_regions(rng, 5, 16, with_probs=i % 2 == 0)
        w.put(keys.format(i), r)
        out[keys.format(i)] = encode_regions(r)
    w.close()
    return out


def _flip(data: bytearray, record: bytes, offset: int) -> int:
    """Flip one byte of every copy of `record` in a data.mdb image; returns the copies."""
    copies, at = 0, data.find(record)
    while at >= 0:
        data[at + offset] ^= 0x5A
        copies += 1
        at = data.find(record, at + 1)
    return copies


def test_checksum_covers_header_and_payload() -> None:
    rec = bytearray(encode_regions(make_regions(np.random.default_rng(0), 4, 8, True)))
    decode_regions(bytes(rec))
    for offset in (5, 12, 36, 40, len(rec) - 1):  # version, K, checksum, features, image
        bad = bytearray(rec)
        bad[offset] ^= 1
        with pytest.raises(DamagedRecord):
            decode_regions(bytes(bad))
    with pytest.raises(DamagedRecord, match="shorter"):
        decode_regions(bytes(rec[:20]))


def test_fifty_flipped_records_are_all_caught(tmp_path: Path) -> None:
    store = tmp_path / "features"
    records = _write_store(store, 300)
    rng = np.random.default_rng(7)
    hit = sorted(rng.choice(sorted(records), size=50, replace=False).tolist())
    data = bytearray((store / "data.mdb").read_bytes())
    for key in hit:
        rec = records[key]
        assert _flip(data, rec, int(rng.integers(0, len(rec)))) >= 1, key
    (store / "data.mdb").write_bytes(bytes(data))

    report = verify_store(store)
    assert report.records == 300 and sorted(report.damaged) == hit and not report.ok
    result = CliRunner().invoke(app, ["verify", str(store)])
    assert result.exit_code == 1
    assert "damaged: 50" in result.output and "DAMAGED" in result.output
    as_json = json.loads(CliRunner().invoke(app, ["verify", str(store), "--json"]).output)
    assert sorted(as_json["damaged"]) == hit and as_json["ok"] is False

    fs = FeatureStore(store)
    for key in hit:
        for read in (lambda k: fs.get(k), lambda k: fs.get_selected(k, 0.2, 1, 100),
                     lambda k: fs.get_selected(k, 0.2, 1, 100, copy=False)):
            with pytest.raises(VlpError, match=rf"record '{key}' is damaged .*vlp verify"):
                read(key)
    fine = next(k for k in records if k not in hit)
    assert len(fs.get_selected(fine, 0.2, 1, 100, copy=False)) >= 1
    with pytest.raises(VlpError, match="is damaged"):
        list(fs.records())
    with pytest.raises(VlpError, match="is damaged"):
        fs.describe()
    fs.close()


def test_data_loader_path_refuses_a_damaged_record(tmp_path: Path) -> None:
    from conftest import tiny_recipe_obj

    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.data.examples import ExampleBuilder

    store = tmp_path / "features"
    records = _write_store(store, 20)
    data = bytearray((store / "data.mdb").read_bytes())
    _flip(data, records["img/3.png"], 100)
    (store / "data.mdb").write_bytes(bytes(data))
    recipe = tiny_recipe_obj()
    builder = ExampleBuilder(load_tokenizer(recipe.corpus.tokenizer), FeatureStore(store),
                             recipe.data)
    builder.regions("img/2.png")
    with pytest.raises(VlpError, match="'img/3.png' is damaged"):
        builder.regions("img/3.png")


def test_resume_replaces_damaged_records(tmp_path: Path) -> None:
    store = tmp_path / "features"
    records = _write_store(store, 30)
    before = FeatureStore(store).fingerprint
    FeatureStore(store).close()
    data = bytearray((store / "data.mdb").read_bytes())
    _flip(data, records["img/4.png"], 60)
    (store / "data.mdb").write_bytes(bytes(data))
    w = FeatureStoreWriter(store, META)
    assert w.removed == ["img/4.png"] and "img/4.png" not in w
    rng = np.random.default_rng(0)  # the same regions as _write_store made
    regions = [make_regions(rng, 5, 16, with_probs=i % 2 == 0) for i in range(30)]
    w.put("img/4.png", regions[4])
    w.close()
    assert verify_store(store).ok
    assert FeatureStore(store).fingerprint == before


def test_fingerprint_covers_content_and_ignores_write_order(tmp_path: Path) -> None:
    _write_store(tmp_path / "a", 10, seed=0)
    a = FeatureStore(tmp_path / "a")
    b_records = _write_store(tmp_path / "b", 10, seed=1)  # same extractor, other images
    b = FeatureStore(tmp_path / "b")
    assert a.extractor_fingerprint == b.extractor_fingerprint
    assert a.fingerprint != b.fingerprint
    # The same records written in another order, in two sessions: the same fingerprint.
    rng = np.random.default_rng(1)
    regions = {f"img/{i}.png": make_regions(rng, 5, 16, with_probs=i % 2 == 0)
               for i in range(10)}
    assert {k: encode_regions(r) for k, r in regions.items()} == b_records
    w = FeatureStoreWriter(tmp_path / "c", META)
    for k in list(regions)[::-1][:4]:
        w.put(k, regions[k])
    w.flush()
    w._w.env.close()  # killed
    w = FeatureStoreWriter(tmp_path / "c", META)
    for k in list(regions)[::-1]:
        w.put(k, regions[k])
    w.close()
    assert FeatureStore(tmp_path / "c").fingerprint == b.fingerprint
    # Shards of the same records combine to the single store's fingerprint.
    for rank, keys in enumerate((list(regions)[:3], list(regions)[3:])):
        w = FeatureStoreWriter(tmp_path / "d" / f"shard-{rank:05d}-of-00002", META)
        for k in keys:
            w.put(k, regions[k])
        w.close()
    assert FeatureStore(tmp_path / "d").fingerprint == b.fingerprint
    assert verify_store(tmp_path / "d").ok and verify_store(tmp_path / "d").records == 10


def _killed_store(store: Path, written: int, planned: int) -> Path:
    """A feature store whose extraction was killed after `written` of `planned` images."""
    w = FeatureStoreWriter(store, META, planned=planned)
    rng = np.random.default_rng(0)
    for i in range(written):
        w.put(f"img/{i}.png", make_regions(rng, 5, 16))
    w.flush()
    w._w.env.close()  # killed mid-way: never closed, so never marked complete
    return store


def test_incomplete_store_is_refused_unless_allowed(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    store = _killed_store(tmp_path / "features", written=4, planned=10)
    with pytest.raises(VlpError, match=r"incomplete \(6 of 10 images missing\).*--allow-inc"):
        FeatureStore(store)
    with caplog.at_level(logging.WARNING):
        fs = FeatureStore(store, allow_incomplete=True)
    assert len(fs) == 4 and "6 of 10 images missing" in caplog.text
    info = json.loads(CliRunner().invoke(app, ["inspect", str(store), "--json"]).output)
    assert info["complete"] is False and info["images"] == 4
    result = CliRunner().invoke(app, ["verify", str(store)])
    assert result.exit_code == 0 and "incomplete" in result.output


def test_build_corpus_refuses_an_incomplete_store_unless_allowed(tiny_data: dict,
                                                                 tmp_path: Path) -> None:
    store = _killed_store(tmp_path / "features", written=24, planned=30)
    args = ["build-corpus", f"{tiny_data['source']}", "-f", str(store), "--skip-missing"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "c1")])
    assert result.exit_code == 1 and "incomplete (6 of 30 images missing)" in result.output
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "c2"), "--allow-incomplete"])
    assert result.exit_code == 0, result.output
    assert len(Corpus(tmp_path / "c2")) > 0


def test_corpus_checksums(tmp_path: Path) -> None:
    w = CorpusWriter(tmp_path / "c", {})
    blobs = []
    for i in range(40):
        ex = {"kind": "caption", "split": "train", "source": "s", "images": [f"k{i}"],
              "texts": [f"text number {i}"], "segments": [[i, i + 1]], "label": None,
              "id": None}
        w.add(ex)
        blobs.append(json.dumps(ex, separators=(",", ":")).encode())
    w.close()
    assert verify_store(tmp_path / "c").ok
    data = bytearray((tmp_path / "c" / "data.mdb").read_bytes())
    for i in (3, 17):
        assert _flip(data, blobs[i], 10) >= 1  # LMDB may keep a stale copy in a free page
    (tmp_path / "c" / "data.mdb").write_bytes(bytes(data))
    c = Corpus(tmp_path / "c")
    assert c.get(2)["images"] == ["k2"]
    with pytest.raises(VlpError, match="record 17 is damaged"):
        c.get(17)
    report = verify_store(tmp_path / "c")
    assert report.damaged == ["record 3", "record 17"] and report.records == 40


def _legacy_body(r) -> tuple[int, int, int, int, bytes]:
    """(flags, K, D, C, arrays) as vlp 0.1 and 0.2.0 laid a record out: sorted regions, then
    the class distribution before the whole-image feature, no positions."""
    order = np.argsort(-r.confidences, kind="stable")
    k, d = r.features.shape
    arrays = [r.features.astype(np.float16)[order], r.boxes.astype(np.float32)[order],
              r.class_ids.astype(np.int32)[order], r.confidences.astype(np.float32)[order]]
    flags, c = 0, 0
    if r.class_probs is not None:
        arrays.append(r.class_probs.astype(np.float16)[order])
        flags, c = flags | 1, r.class_probs.shape[1]
    if r.image_feature is not None:
        arrays.append(r.image_feature.astype(np.float16))
        flags |= 2
    body = b"".join(a.tobytes() + b"\0" * (-a.nbytes % 8) for a in arrays)
    return flags, k, d, c, body


def _v1_record(r) -> bytes:
    """The regions as vlp 0.1 wrote them: a 32-byte header, no checksum."""
    flags, k, d, c, body = _legacy_body(r)
    return HEADER_V1.pack(b"VLPR", 1, flags, k, d, c, r.width, r.height, 0) + body


def _v020_record(r) -> bytes:
    """The regions as vlp 0.2.0 wrote them: one xxh3-64 over everything after the header."""
    import xxhash
    flags, k, d, c, body = _legacy_body(r)
    head = HEADER_V1.pack(b"VLPR", 2, flags, k, d, c, r.width, r.height, 0)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(
        body, xxhash.xxh3_64_intdigest(head))) + body


def test_schema_1_stores_still_open_with_one_note(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    regions = {f"k{i}": make_regions(rng, 5, 16, with_probs=True) for i in range(5)}
    w = Writer(tmp_path / "f")
    for k, r in regions.items():
        w.put(k.encode(), _v1_record(r))
    w.put_meta("store", {"schema": "vlp.features", "schema_version": 1, "fingerprint": "f1",
                         "extractor": {"name": "old"}, "feature_dim": 16, "labels": LABELS,
                         "complete": True, "images": 5})
    w.close()
    cw = Writer(tmp_path / "c")
    cw.put((0).to_bytes(8, "big"), json.dumps({"kind": "caption", "split": "train",
                                               "image": "k0", "text": "t", "ids": [1]}).encode())
    cw.put_meta("lengths", np.asarray([1], np.int32).tobytes(), raw=True)
    cw.put_meta("index/caption/train", np.asarray([0], np.int32).tobytes(), raw=True)
    cw.put_meta("store", {"schema": "vlp.corpus", "schema_version": 1, "examples": 1})
    cw.close()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            fs = FeatureStore(tmp_path / "f")
            c = Corpus(tmp_path / "c")
    assert caplog.text.count("no checksums") == 2  # once per store
    assert fs.fingerprint == "f1" and not fs.checksums
    got = fs.get_selected("k1", 0.0, 1, 100, copy=False)
    assert np.array_equal(got.features, regions["k1"].features[
        np.argsort(-regions["k1"].confidences, kind="stable")])
    # Seen as schema 3.
    assert c.get(0)["images"] == ["k0"] and c.get(0)["segments"] == [[1]]
    assert list(c.indices("caption", "train")) == [0]
    report = verify_store(tmp_path / "f")
    assert report.ok and report.schema_version == 1 and not report.checksums
    with pytest.raises(VlpError, match="older vlp.*choose a new --out"):
        FeatureStoreWriter(tmp_path / "f", {"extractor": {"name": "old"}, "feature_dim": 16})


def test_records_of_vlp_0_2_0_still_read_and_checked(tmp_path: Path) -> None:
    """0.2.0 records: no stored positions, one checksum over the whole record."""
    rng = np.random.default_rng(3)
    regions = {f"k{i}": make_regions(rng, 6, 16, with_probs=True) for i in range(4)}
    w = FeatureStoreWriter(tmp_path / "f", META)
    w.close()
    raw = Writer(tmp_path / "f")
    for k, r in regions.items():
        raw.put(k.encode(), _v020_record(r))
    raw.close()
    fs = FeatureStore(tmp_path / "f", allow_incomplete=True)
    for k, r in regions.items():
        new = decode_regions(encode_regions(r))
        old = fs.get_selected(k, 0.0, 1, 100)
        assert old.positions is None and new.positions is not None
        for name in ("features", "boxes", "class_ids", "confidences", "class_probs"):
            assert np.array_equal(getattr(old, name), getattr(new, name)), name
    bad = bytearray(_v020_record(regions["k0"]))
    bad[-3] ^= 0x10  # inside the class distribution, which 0.2.0 checked with the rest
    with pytest.raises(DamagedRecord, match="checksum"):
        decode_regions(bytes(bad), probs=False)


def test_class_distribution_checked_when_read() -> None:
    """The class distribution has its own checksum: read, it is verified; skipped, it is not."""
    from vlp_cli.stores.records import position_features
    r = make_regions(np.random.default_rng(4), 7, 16, with_probs=True)
    rec = encode_regions(r)
    got = decode_regions(rec)
    assert np.allclose(got.positions, position_features(got.boxes, got.width, got.height))
    bad = bytearray(rec)
    bad[-3] ^= 0x10  # the last bytes are the class distribution's
    with pytest.raises(DamagedRecord, match="class distribution"):
        decode_regions(bytes(bad))
    assert decode_regions(bytes(bad), probs=False).class_probs is None
    bad = bytearray(rec)
    bad[50] ^= 0x10  # a feature
    with pytest.raises(DamagedRecord, match="checksum"):
        decode_regions(bytes(bad), probs=False)
