"""Import of Oscar / VinVL / UNITER feature files and export back to Oscar's layout.

The fixtures are written the way the public code writes them (byte layouts, not its code):
Oscar's tsv_writer + generate_lineidx_file (oscar/utils/tsv_file_ops.py, tsv_file.py),
imageid2idx.json (oscar/run_retrieval.py), VinVL's convert_predictions_to_tsv
(scene_graph_benchmark maskrcnn_benchmark/engine/inference.py) and UNITER's
scripts/convert_imgdir.py with msgpack_numpy's array encoding, spelled out by hand here.
Every value is exactly representable in float16 and every image size is a power of two, so
the round trips can be checked for equality.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import zipfile
from pathlib import Path

import lmdb
import msgpack
import numpy as np
import pytest

from vlp_cli import VlpError
from vlp_cli.stages.convert import export_features, import_features
from vlp_cli.stores.features import FeatureStore, position_features

D = 2048
NAMES = ["man", "shirt", "dog", "frisbee", "tree"]


# ---------------------------------------------------------------- fixtures in the sources' layouts
def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).decode()


def _write_tsv(path: Path, rows: list[list[object]]) -> None:
    """Oscar's tsv_writer: tab-joined str() of each value, '\\n'; and its .lineidx."""
    data = b"".join(("\t".join(map(str, r)) + "\n").encode() for r in rows)
    path.write_bytes(data)
    offsets, pos = [], 0
    for line in data.splitlines(keepends=True):
        offsets.append(pos)
        pos += len(line)
    path.with_suffix(".lineidx").write_text("".join(f"{o}\n" for o in offsets))


def _images(rng: np.random.Generator) -> list[dict]:
    """Four images (keys in LMDB order; the first has no box), boxes sorted by confidence."""
    out = []
    for key, (w, h), k in (("100042", (128, 128), 0), ("184613", (512, 256), 3),
                           ("391895", (256, 256), 4), ("522418", (1024, 512), 2)):
        x1 = rng.integers(0, w // 2, k)
        y1 = rng.integers(0, h // 2, k)
        boxes = np.stack([x1, y1, x1 + rng.integers(1, w // 2, k),
                          y1 + rng.integers(1, h // 2, k)], 1).astype(np.float32)
        out.append({"key": key, "w": w, "h": h, "boxes": boxes,
                    "feats": (rng.integers(-64, 64, (k, D)) / 8).astype(np.float32),
                    "cls": rng.integers(0, len(NAMES), k),
                    "conf": np.float32([0.96875, 0.75, 0.5, 0.25][:k])})
    return out


def _oscar_rows(img: dict) -> np.ndarray:
    b, w, h = img["boxes"], img["w"], img["h"]
    pos = np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h,
                    (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1)
    return np.concatenate([img["feats"], pos], 1).astype(np.float32)


def _objects(img: dict, bbox_id: bool = True) -> list[dict]:
    objs = []
    for i in range(len(img["boxes"])):  # key order as VinVL writes them
        o: dict = {"rect": img["boxes"][i].tolist()}
        if bbox_id:
            o["bbox_id"] = i
        o.update({"class": NAMES[img["cls"][i]], "conf": float(img["conf"][i])})
        objs.append(o)
    return objs


@pytest.fixture
def oscar_dir(tmp_path: Path) -> tuple[Path, list[dict]]:
    imgs = _images(np.random.default_rng(0))
    d = tmp_path / "coco_ir"
    d.mkdir()
    _write_tsv(d / "features.tsv", [[m["key"], len(m["boxes"]), _b64(_oscar_rows(m))]
                                    for m in imgs])
    (d / "imageid2idx.json").write_text(json.dumps({m["key"]: i for i, m in enumerate(imgs)}))
    _write_tsv(d / "predictions.tsv", [[m["key"], json.dumps(
        {"objects": _objects(m), "image_h": m["h"], "image_w": m["w"]})] for m in imgs])
    return d, imgs


def _check_against(store: FeatureStore, imgs: list[dict], pixels: bool = True) -> None:
    assert store.keys() == [m["key"] for m in imgs]
    for m in imgs:
        r = store.get(m["key"])
        scale = np.float32([m["w"], m["h"]] * 2)
        assert np.array_equal(r.features.astype(np.float32), m["feats"])
        assert np.array_equal(r.boxes, m["boxes"] if pixels else m["boxes"] / scale)
        assert (r.width, r.height) == ((m["w"], m["h"]) if pixels else (1, 1))
        assert np.array_equal(r.confidences, m["conf"])
        assert [store.labels[c] for c in r.class_ids] == [NAMES[c] for c in m["cls"]]


# ------------------------------------------------------------------------------------ Oscar
def test_oscar_import_export_round_trip(oscar_dir: tuple[Path, list[dict]],
                                        tmp_path: Path) -> None:
    src, imgs = oscar_dir
    import_features("oscar", src, tmp_path / "store")
    store = FeatureStore(tmp_path / "store")
    _check_against(store, imgs)
    ext = store.meta["extractor"]
    assert ext["format"] == "oscar" and ext["reproducible"] is False
    assert ext["files"]["features"].endswith("features.tsv") and store.feature_dim == D
    assert store.meta["boxes_unit"] == "pixels"
    pos = position_features(store.get("391895").boxes, 256, 256, "oscar6")
    assert np.array_equal(pos, _oscar_rows(imgs[2])[:, D:])  # Oscar's 6 numbers, exactly
    del store  # py-lmdb refuses a second handle on one environment in a process
    gc.collect()

    export_features(tmp_path / "store", "oscar-tsv", tmp_path / "back")
    back = tmp_path / "back"
    for name in ("features.tsv", "features.lineidx", "imageid2idx.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    assert (back / "predictions.lineidx").is_file() and (back / "vlp_export.json").is_file()
    import_features("oscar", back, tmp_path / "again")
    _check_against(FeatureStore(tmp_path / "again"), imgs)
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_oscar_tags_by_overlap_and_captioning_layout(tmp_path: Path) -> None:
    imgs = _images(np.random.default_rng(1))
    d = tmp_path / "src"
    d.mkdir()
    # Tags without bbox_id, in another order and one missing: matched by box overlap.
    rows = []
    for m in imgs:
        objs = _objects(m, bbox_id=False)[::-1][1:]
        rows.append([m["key"], json.dumps({"objects": objs, "image_h": m["h"],
                                           "image_w": m["w"]})])
    _write_tsv(d / "features.tsv", [[m["key"], len(m["boxes"]), _b64(_oscar_rows(m))]
                                    for m in imgs])
    _write_tsv(d / "predictions.tsv", rows)
    import_features("oscar", d, tmp_path / "a")
    s = FeatureStore(tmp_path / "a")
    for m in imgs:
        r = s.get(m["key"])
        tagged = r.class_ids >= 0
        if len(m["boxes"]):
            assert tagged.sum() == len(m["boxes"]) - 1
            assert r.confidences[~tagged].tolist() == [1.0]
    # Captioning's layout: `key \t {"num_boxes", "features"}` and label.tsv as a plain list,
    # which carries no image size: boxes stay normalised.
    c = tmp_path / "cap"
    c.mkdir()
    _write_tsv(c / "features.tsv", [[m["key"], json.dumps(
        {"num_boxes": len(m["boxes"]), "features": _b64(_oscar_rows(m))})] for m in imgs])
    _write_tsv(c / "label.tsv", [[m["key"], json.dumps(_objects(m, bbox_id=False))]
                                 for m in imgs])
    import_features("oscar", c / "features.tsv", tmp_path / "b")
    s = FeatureStore(tmp_path / "b")
    _check_against(s, imgs, pixels=False)
    assert s.meta["boxes_unit"] == "normalised"


# ------------------------------------------------------------------------------------ VinVL
def test_vinvl_predictions_with_hw(tmp_path: Path) -> None:
    imgs = _images(np.random.default_rng(2))
    rows = []
    for m in imgs:
        objs = _objects(m)
        for o, f in zip(objs, m["feats"]):
            o["feature"] = _b64(f)
        rows.append([m["key"], json.dumps({"objects": objs, "relations": None})])
    _write_tsv(tmp_path / "predictions.tsv", rows)
    with pytest.raises(VlpError, match=r"predictions.tsv line 1: .*--hw"):
        import_features("vinvl", tmp_path / "predictions.tsv", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    _write_tsv(tmp_path / "hw.tsv", [[m["key"], json.dumps([{"height": m["h"], "width": m["w"]}])]
                                     for m in imgs])
    import_features("vinvl", tmp_path / "predictions.tsv", tmp_path / "store",
                    hw=tmp_path / "hw.tsv")
    _check_against(FeatureStore(tmp_path / "store"), imgs)


# ----------------------------------------------------------------------------------- UNITER
def _uniter_images(rng: np.random.Generator) -> list[dict]:
    out = []
    for name, k in (("coco_val2014_000000000042.npz", 3), ("nlvr2_dev-0-0-img0.npz", 12)):
        x = rng.integers(0, 4, (k, 2)) / 8
        wh = rng.integers(1, 4, (k, 2)) / 8
        soft = np.zeros((k, 1601), np.float32)
        for i in range(k):
            top, second = rng.choice(np.arange(1, 1601), 2, replace=False)
            soft[i, [0, top, second]] = [0.5, 0.375, 0.125] if i % 2 else [0.0, 0.75, 0.25]
        conf = np.r_[0.9375, 0.5, 0.25, 0.1875 - np.arange(k - 3) / 128][:k]  # 3 above 0.2
        out.append({"name": name, "features": (rng.integers(-64, 64, (k, D)) / 8),
                    "norm_bb": np.concatenate([x, x + wh, wh], 1), "conf": conf,
                    "soft_labels": soft})
    return [{k: (v.astype(np.float32) if k != "name" else v) for k, v in m.items()} for m in out]


def _savez_numpy1(dump: dict[str, np.ndarray]) -> bytes:
    """np.savez_compressed(writer, **dump, allow_pickle=True) under numpy 1.x, where the
    keyword became an array named `allow_pickle` (convert_imgdir.py dumps_npz)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, arr in {**dump, "allow_pickle": np.array(True)}.items():
            with z.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def _msgpack_numpy(dump: dict[str, np.ndarray]) -> bytes:
    """msgpack.dumps(dump, use_bin_type=True) with msgpack_numpy patched in."""
    enc = {k: {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape),
               b"data": a.tobytes()} for k, a in dump.items()}
    return msgpack.packb(enc, use_bin_type=True)


def _convert_imgdir(imgs: list[dict], db: Path, compress: bool, conf_th: float = 0.2,
                    max_bb: int = 100, min_bb: int = 10) -> dict[str, int]:
    """scripts/convert_imgdir.py: float32 -> float16, the first nbb boxes, key = file name."""
    env = lmdb.open(str(db), map_size=1 << 26)
    name2nbb = {}
    with env.begin(write=True) as txn:
        for m in imgs:
            nbb = int(min(max_bb, max(min_bb, (m["conf"] > conf_th).sum())))
            dump = {k: v.astype(np.float16)[:nbb] for k, v in m.items() if k != "name"}
            txn.put(m["name"].encode(), _savez_numpy1(dump) if compress else _msgpack_numpy(dump))
            name2nbb[m["name"]] = nbb
        txn.put(b"__keys__", json.dumps(list(name2nbb)).encode())
    env.close()
    return name2nbb


def _check_uniter(store: FeatureStore, imgs: list[dict], nbb: dict[str, int] | None) -> None:
    assert store.keys() == sorted(m["name"] for m in imgs)
    for m in imgs:
        n = nbb[m["name"]] if nbb else len(m["conf"])
        r = store.get(m["name"])
        soft = m["soft_labels"][:n, 1:]
        assert np.array_equal(r.features.astype(np.float32), m["features"][:n])
        assert np.array_equal(r.boxes, m["norm_bb"][:n, :4]) and (r.width, r.height) == (1, 1)
        assert np.array_equal(r.confidences, m["conf"][:n])
        assert np.array_equal(r.class_ids, soft.argmax(1))
        assert np.array_equal(r.class_probs, (soft / soft.sum(1, keepdims=True)).astype(np.float16))
        # UNITER's 7-d position (data/data.py): norm_bb plus w*h; identical from the store.
        want = np.concatenate([m["norm_bb"][:n], m["norm_bb"][:n, 4:5] * m["norm_bb"][:n, 5:]], 1)
        assert np.array_equal(position_features(r.boxes, r.width, r.height, "uniter7"), want)


@pytest.mark.parametrize("compress", [False, True])
def test_uniter_npz_and_lmdb(tmp_path: Path, compress: bool) -> None:
    imgs = _uniter_images(np.random.default_rng(3))
    (tmp_path / "npz").mkdir()
    for m in imgs:
        np.savez_compressed(tmp_path / "npz" / m["name"],
                            **{k: v for k, v in m.items() if k != "name"})
    vocab = [f"class{i}" for i in range(1600)]
    vocab[7] = "shirt,t-shirt,tshirt"  # VG vocab lines list synonyms: the first is the name
    (tmp_path / "objects_vocab.txt").write_text("\n".join(vocab) + "\n")

    import_features("uniter-npz", tmp_path / "npz", tmp_path / "a",
                    labels=tmp_path / "objects_vocab.txt")
    a = FeatureStore(tmp_path / "a")
    _check_uniter(a, imgs, None)
    assert a.meta["boxes_unit"] == "normalised" and len(a.labels) == 1600
    assert a.labels[7] == "shirt" and a.meta["extractor"]["reproducible"] is False

    split = tmp_path / "img_db" / "coco_val2014"
    split.mkdir(parents=True)
    db = split / ("feat_th0.2_max100_min10" + ("_compressed" if compress else ""))
    nbb = _convert_imgdir(imgs, db, compress)
    assert nbb["nlvr2_dev-0-0-img0.npz"] == 10  # min_bb kept 10 of 12
    import_features("uniter-lmdb", split, tmp_path / "b")  # the split folder: its one LMDB
    b = FeatureStore(tmp_path / "b")
    _check_uniter(b, imgs, nbb)
    assert b.labels == [str(i) for i in range(1600)]  # numeric names without --labels

    hw = tmp_path / "hw.tsv"
    hw.write_text("".join(f"{m['name'][:-4]}\t{json.dumps([{'height': 64, 'width': 128}])}\n"
                          for m in imgs))
    import_features("uniter-lmdb", db, tmp_path / "c", hw=hw)
    c = FeatureStore(tmp_path / "c")
    r = c.get(imgs[0]["name"])
    assert (r.width, r.height) == (128, 64) and c.meta["boxes_unit"] == "pixels"
    assert np.array_equal(r.boxes, imgs[0]["norm_bb"][:, :4] * np.float32([128, 64, 128, 64]))


# ---------------------------------------------------------------------------- hostile inputs
def _refused(tmp_path: Path, fmt: str, src: Path, pattern: str) -> None:
    with pytest.raises(VlpError, match=pattern) as info:
        import_features(fmt, src, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_object_array_in_npz_is_refused(tmp_path: Path) -> None:
    good = _uniter_images(np.random.default_rng(4))[0]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in ("norm_bb", "conf"):
            with z.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, good[name], allow_pickle=False)
        with z.open("features.npy", "w") as f:  # an object array header; the payload would
            np.lib.format.write_array_header_1_0(  # be a pickle (never built here)
                f, {"descr": "|O", "fortran_order": False, "shape": (3,)})
            f.write(b"\x80\x04not-a-real-pickle.")
    (tmp_path / "npz").mkdir()
    (tmp_path / "npz" / "a.npz").write_bytes(buf.getvalue())
    _refused(tmp_path, "uniter-npz", tmp_path / "npz", r"a\.npz: refused array 'features'")


def test_msgpack_pickle_kind_is_refused(tmp_path: Path) -> None:
    good = _uniter_images(np.random.default_rng(5))[:1]
    db = tmp_path / "db"
    _convert_imgdir(good, db, compress=False)
    bad = {"norm_bb": {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [3],
                       b"data": b"\x80\x04not-a-real-pickle."}}
    env = lmdb.open(str(db), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"zzz.npz", msgpack.packb(bad, use_bin_type=True))
        # An older encoder without 'kind': the object dtype alone is refused as well.
        txn.put(b"zzy.npz", msgpack.packb({"conf": {k: v for k, v in bad["norm_bb"].items()
                                                     if k != b"kind"}}, use_bin_type=True))
    env.close()
    _refused(tmp_path, "uniter-lmdb", db, r"key 'zzy\.npz': refused dtype '\|O'")
    env = lmdb.open(str(db), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.delete(b"zzy.npz")
    env.close()
    _refused(tmp_path, "uniter-lmdb", db, r"key 'zzz\.npz': refused a pickled object array")


def test_malformed_oscar_rows(oscar_dir: tuple[Path, list[dict]], tmp_path: Path) -> None:
    src, imgs = oscar_dir
    feats = src / "features.tsv"
    lines = feats.read_text().splitlines(keepends=True)

    feats.write_text(lines[0] + lines[1][:-200] + "x\n" + lines[2])  # truncated base64
    _refused(tmp_path, "oscar", src, r"features\.tsv line 2: the features column is not valid "
                                     r"base64")

    key, _, data = lines[2].rstrip("\n").split("\t")
    feats.write_text("".join(lines[:2]) + f"{key}\t3\t{data}\n")  # 4 boxes' data, says 3
    _refused(tmp_path, "oscar", src, r"features\.tsv line 3: num_boxes is 3 but the features "
                                     r"hold 8216 numbers")
    feats.write_text("".join(lines[:2]) + f"{key}\t8\t{data}\n")  # divides: 1027 per box
    _refused(tmp_path, "oscar", src, r"line 3: 1027 numbers per box, but .*line 2 has 2054")

    feats.write_text("".join(lines))
    tags = (src / "predictions.tsv").read_text().splitlines(keepends=True)
    (src / "predictions.tsv").write_text(tags[0] + tags[1][:40] + "\n" + "".join(tags[2:]))
    _refused(tmp_path, "oscar", src, r"predictions\.tsv line 2: the second column is not "
                                     r"valid JSON")


def test_cli_commands(oscar_dir: tuple[Path, list[dict]], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlp_cli.cli import app

    names = {c.name for c in app.registered_commands}
    if not {"import-features", "export-features"} <= names:
        pytest.skip("import-features / export-features are not registered in cli.py yet")
    src, imgs = oscar_dir
    run = CliRunner().invoke
    res = run(app, ["import-features", "oscar", str(src), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    res = run(app, ["export-features", str(tmp_path / "s"), "--format", "oscar-tsv",
                    "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e" / "features.tsv").read_bytes() == (src / "features.tsv").read_bytes()
    res = run(app, ["import-features", "uniter-npz", str(src), "--out", str(tmp_path / "u")])
    assert res.exit_code == 1 and "no images found" in res.output
