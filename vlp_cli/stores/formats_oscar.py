"""Oscar's and VinVL's TSV layouts: read into a feature store, and write a store back for Oscar.

Oscar (microsoft/Oscar):
    features.tsv      `image_id \\t num_boxes \\t base64(float32[num_boxes x 2054])`, read as
                      `row[1]`, `row[-1]` (oscar/run_retrieval.py get_image, oscar_tsv.py
                      get_img_feature); captioning's variant is `image_id \\t {"num_boxes": n,
                      "features": base64}` (oscar/run_captioning.py get_image_features). Each
                      box is 2048 feature numbers then x1/W, y1/H, x2/W, y2/H, w/W, h/H.
    features.lineidx  byte offset of every line; TSVFile needs it and does not create it
                      (oscar/utils/tsv_file.py: splitext(tsv)[0] + ".lineidx").
    imageid2idx.json  {image_id: row index} beside features.tsv (run_retrieval.py).
    predictions.tsv   tags: `image_id \\t {"objects": [{"class", "conf", "rect"}...],
                      "image_h", "image_w"}` or `image_id \\t [objects]` (run_retrieval.py reads
                      either; captioning's label.tsv is the list form), with its own .lineidx.
VinVL (microsoft/scene_graph_benchmark, maskrcnn_benchmark/engine/inference.py
convert_predictions_to_tsv): `image_key \\t {"objects": [{"rect": [x1, y1, x2, y2] pixels,
"bbox_id": i, "class", "conf", "feature": base64(float32[2048])}], "relations": null}`; no
image size in it (a data set's `hw.tsv` has it).

Tags are joined to regions by `bbox_id` (VinVL and vlp write it), else by box overlap when the
image size is known, else by order when the counts agree; tags that cannot be placed are
counted (`tags_unaligned`), not guessed. Regions without a known detector confidence get 1.0,
vlp's value for given boxes.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.stores.features import FeatureStore, Regions, position_features
from vlp_cli.stores.import_common import (
    Record, Source, TsvIndex, Vocab, b64_floats, check_boxes, parse_json, to_f16, tsv_rows,
)

logger = logging.getLogger(__name__)

POS_DIM = 6  # the numbers after the features in each Oscar box
DEFAULT_DIM = 2048  # every Oscar/VinVL release; used only if no image has a single box
TAG_FILES = ("predictions.tsv", "label.tsv", "predictions_gt.tsv")
Pending = Callable[[int], Record]  # an image without boxes, built once the width is known


class Width:
    """Numbers per box: given, or fixed by the first image that has boxes; then enforced."""

    def __init__(self, value: int | None, given: str = "--feature-dim") -> None:
        self.value = value
        self.first = given

    def check(self, n: int, where: str, what: str) -> None:
        if self.value is None:
            self.value, self.first = n, where
        elif n != self.value:
            raise VlpError(f"{where}: {n} {what}, but {self.first} has {self.value}")


def _resolve(items: Iterator[Record | Pending], width: Width, extra: int) -> Iterator[Record]:
    """Yield records in source order, building box-less ones once the feature width is known."""
    pending: list[Pending] = []
    for item in items:
        if callable(item):
            if width.value is None:
                pending.append(item)
                continue
            item = item(width.value - extra)
        d = width.value - extra  # type: ignore[operator]  # set by the record just built
        yield from (p(d) for p in pending)
        pending.clear()
        yield item
    d = DEFAULT_DIM if width.value is None else width.value - extra
    yield from (p(d) for p in pending)


def _empty(key: str, where: str, size: tuple[int, int] | None) -> Pending:
    h, w = size or (1, 1)
    return lambda d: Record(key, Regions(np.zeros((0, d), np.float16), np.zeros((0, 4), np.float32),
                                         np.zeros(0, np.int32), np.zeros(0, np.float32), w, h),
                            where, size is not None)


def _size(obj: dict, where: str) -> tuple[int, int] | None:
    if "image_h" not in obj or "image_w" not in obj:
        return None
    h, w = obj["image_h"], obj["image_w"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise VlpError(f"{where}: image_h and image_w must be positive numbers")
    return int(h), int(w)


def _objects(cols: list[str], where: str) -> tuple[list[dict], tuple[int, int] | None]:
    """The objects of a tags/predictions row and the image size when the row has it."""
    if len(cols) < 2:
        raise VlpError(f"{where}: expected `image_id <TAB> json`")
    obj = parse_json(cols[1], where, "the second column")
    size = None
    if isinstance(obj, dict):
        size = _size(obj, where)
        if "objects" not in obj and isinstance(obj.get("labels"), list):
            obj = {"objects": [{"class": x} for x in obj["labels"]]}  # oscar_tsv.py's QA form
        obj = obj.get("objects")
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise VlpError(f"{where}: expected a list of objects or {{\"objects\": [...]}}")
    return obj, size


def _rect(value: Any, where: str) -> np.ndarray:
    try:
        r = np.asarray(value, dtype=np.float64).reshape(4)
    except (TypeError, ValueError):
        raise VlpError(f"{where}: 'rect' must be [x1, y1, x2, y2] numbers") from None
    if not np.isfinite(r).all():
        raise VlpError(f"{where}: 'rect' holds non-finite numbers")
    return r


def _tag(o: dict, where: str) -> tuple[str | None, float]:
    name, conf = o.get("class"), o.get("conf", 1.0)
    if name is not None and not isinstance(name, str):
        raise VlpError(f"{where}: 'class' must be a string")
    if not isinstance(conf, (int, float)) or isinstance(conf, bool) or not np.isfinite(conf):
        raise VlpError(f"{where}: 'conf' must be a number")
    return name, float(conf)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def _align(objs: list[dict], norm: np.ndarray, size: tuple[int, int] | None, vocab: Vocab,
           where: str, stats: dict[str, int]) -> tuple[np.ndarray, np.ndarray, dict[int, Any]]:
    """Class ids and confidences per region from the tags; pixel rects that match a region."""
    k = len(norm)
    cls, conf, rects = np.full(k, -1, np.int32), np.ones(k, np.float32), {}
    tags = [_tag(o, f"{where} object {i}") for i, o in enumerate(objs)]
    have_rects = all("rect" in o for o in objs)
    boxes = [_rect(o["rect"], f"{where} object {i}") for i, o in enumerate(objs)] \
        if have_rects else []
    scale = np.array([size[1], size[0]] * 2, np.float64) if size else None
    ids = [o.get("bbox_id") for o in objs]
    if objs and all(type(i) is int and 0 <= i < k for i in ids) and len(set(ids)) == len(ids):
        slots: list[int | None] = list(ids)
    elif objs and have_rects and scale is not None:
        iou = _iou(np.stack(boxes) / scale, norm.astype(np.float64))
        slots, free = [None] * len(objs), np.ones(k, bool)
        for i in np.argsort([-c for _, c in tags], kind="stable"):
            cand = np.where(free, iou[i], -1.0)
            j = int(cand.argmax()) if k else -1
            if j >= 0 and cand[j] >= 0.5:
                slots[i], free[j] = j, False
    else:
        slots = list(range(k)) if len(objs) == k else [None] * len(objs)
    for i, ((name, c), s) in enumerate(zip(tags, slots)):
        if s is None or name is None:
            stats["tags_unaligned"] = stats.get("tags_unaligned", 0) + (name is not None)
            continue
        cls[s], conf[s] = vocab.id(name, f"{where} object {i}"), c
        # The tag's pixel rect is the detector's own box: exact where norm * size is rounded.
        if have_rects and scale is not None and np.abs(boxes[i] / scale - norm[s]).max() < 1e-3:
            rects[s] = boxes[i]
    return cls, conf, rects


def _feature_row(cols: list[str], where: str) -> tuple[int, np.ndarray]:
    """(num_boxes, flat float32 numbers) of one features.tsv row, in either Oscar layout."""
    if len(cols) >= 3:
        try:
            num = int(cols[1])
        except ValueError:
            raise VlpError(f"{where}: num_boxes {cols[1][:20]!r} is not an integer") from None
        data: Any = cols[-1]
    elif len(cols) == 2 and cols[1].startswith("{"):
        info = parse_json(cols[1], where, "the features column")
        if not isinstance(info, dict) or type(info.get("num_boxes")) is not int:
            raise VlpError(f"{where}: expected {{\"num_boxes\": n, \"features\": base64}}")
        num, data = info["num_boxes"], info.get("features")
    else:
        raise VlpError(f"{where}: expected `image_id <TAB> num_boxes <TAB> base64 features`, "
                       f"got {len(cols)} column(s)")
    flat = b64_floats(data, where, "the features column")
    if num < 0 or (num == 0 and flat.size) or (num and flat.size % num):
        raise VlpError(f"{where}: num_boxes is {num} but the features hold {flat.size} "
                       "numbers, which is not a whole number of boxes")
    return num, flat


def open_oscar(src: Path, vocab: Vocab, tags: Path | None = None,
               sizes: dict[str, tuple[int, int]] | None = None,
               feature_dim: int | None = None) -> Source:
    """Oscar's features.tsv (a file, or the folder holding it) with its tags, if any."""
    feats = src / "features.tsv" if src.is_dir() else src
    if not feats.is_file():
        raise VlpError(f"{feats} not found: pass Oscar's features.tsv or the folder holding it")
    if tags is None:
        tags = next((feats.parent / n for n in TAG_FILES if (feats.parent / n).is_file()), None)
    elif not Path(tags).is_file():
        raise VlpError(f"tags file {tags} not found")
    idmap_file = feats.parent / "imageid2idx.json"
    keys_of_row: dict[int, list[str]] | None = None
    if idmap_file.is_file():
        idmap = parse_json(idmap_file.read_text(encoding="utf-8"), str(idmap_file), "it")
        if not isinstance(idmap, dict) or not all(type(v) is int for v in idmap.values()):
            raise VlpError(f"{idmap_file}: expected {{\"image_id\": row index}}")
        keys_of_row = {}
        for key, row in idmap.items():
            keys_of_row.setdefault(row, []).append(key)
    files = {"features": str(feats.resolve())}
    if keys_of_row is not None:
        files["imageid2idx"] = str(idmap_file.resolve())
    if tags is not None:
        files["tags"] = str(Path(tags).resolve())
        logger.info("tags from %s", tags)
    source = Source("oscar", src, iter(()), vocab, files,
                    total=len(idmap) if keys_of_row is not None else None)
    width = Width(None if feature_dim is None else feature_dim + POS_DIM,
                  f"--feature-dim {feature_dim} (+ {POS_DIM} box numbers)")
    source.records = _resolve(_oscar_items(feats, keys_of_row, tags, sizes or {}, vocab, width,
                                           source.stats), width, POS_DIM)
    source.notes["positions"] = "the 6 numbers after each feature: x1/W y1/H x2/W y2/H w/W h/H"
    return source


def _oscar_items(feats: Path, keys_of_row: dict[int, list[str]] | None, tags: Path | None,
                 sizes: dict[str, tuple[int, int]], vocab: Vocab, width: Width,
                 stats: dict[str, int]) -> Iterator[Record | Pending]:
    index = TsvIndex(tags) if tags is not None else None
    try:
        for n, where, cols in tsv_rows(feats):
            num, flat = _feature_row(cols, where)
            keys = [cols[0]] if keys_of_row is None else keys_of_row.get(n - 1, [])
            if not keys:  # Oscar looks rows up through imageid2idx.json: this one is unreachable
                stats["rows_not_in_imageid2idx"] = stats.get("rows_not_in_imageid2idx", 0) + 1
                continue
            if num:
                width.check(flat.size // num, where, "numbers per box")
                if width.value <= POS_DIM:  # type: ignore[operator]
                    raise VlpError(f"{where}: {width.value} numbers per box leaves no features")
            for key in keys:
                row = index.get(key) if index is not None else None
                objs, size = _objects(*row) if row is not None else ([], None)
                size = size or sizes.get(key)
                if not num:
                    yield _empty(key, where, size)
                    continue
                arr = flat.reshape(num, -1)
                d = arr.shape[1] - POS_DIM
                norm = arr[:, d:d + 4].astype(np.float32)
                cls, conf, rects = _align(objs, norm, size, vocab, row[1] if row else where, stats)
                h, w = size or (1, 1)
                boxes = norm * np.array([w, h, w, h], np.float32)
                for s, rect in rects.items():
                    boxes[s] = rect
                yield Record(key, Regions(to_f16(arr[:, :d], where), check_boxes(boxes, where),
                                          cls, conf, w, h), where, size is not None)
    finally:
        if index is not None:
            index.close()


def open_vinvl(src: Path, vocab: Vocab, tags: Path | None = None,
               sizes: dict[str, tuple[int, int]] | None = None,
               feature_dim: int | None = None) -> Source:
    """VinVL's predictions.tsv with a feature per object."""
    if tags is not None:
        raise VlpError("--tags is for Oscar's features.tsv; VinVL's objects carry their class")
    if not src.is_file():
        raise VlpError(f"{src} is not a file: pass VinVL's predictions.tsv")
    source = Source("vinvl", src, iter(()), vocab, {"predictions": str(src.resolve())})
    width = Width(feature_dim)
    source.records = _resolve(_vinvl_items(src, sizes or {}, vocab, width), width, 0)
    return source


def _vinvl_items(path: Path, sizes: dict[str, tuple[int, int]], vocab: Vocab,
                 width: Width) -> Iterator[Record | Pending]:
    for _, where, cols in tsv_rows(path):
        key = cols[0]
        objs, size = _objects(cols, where)
        size = size or sizes.get(key)
        if size is None:
            raise VlpError(f"{where}: no size for image {key!r} (VinVL's predictions.tsv has "
                           "none): pass --hw with the data set's hw.tsv")
        if not objs:
            yield _empty(key, where, size)
            continue
        feats, boxes, cls, conf = [], [], [], []
        for i, o in enumerate(objs):
            at = f"{where} object {i}"
            if "feature" not in o or "rect" not in o:
                raise VlpError(f"{at}: no 'feature' or 'rect': run VinVL with TEST.OUTPUT_FEATURE "
                               "True and 'feature' in TEST.TSV_SAVE_SUBSET")
            f = b64_floats(o["feature"], at, "'feature'")
            width.check(f.size, at, "feature numbers")
            name, c = _tag(o, at)
            feats.append(f)
            boxes.append(_rect(o["rect"], at))
            cls.append(-1 if name is None else vocab.id(name, at))
            conf.append(c)
        h, w = size
        yield Record(key, Regions(to_f16(np.stack(feats), where),
                                  check_boxes(np.stack(boxes), where), np.asarray(cls, np.int32),
                                  np.asarray(conf, np.float32), w, h), where, True)


def _write_lineidx(path: Path, offsets: list[int]) -> None:
    path.write_text("".join(f"{o}\n" for o in offsets), encoding="ascii")


def export_oscar_tsv(store: FeatureStore, out: Path,
                     advance: Callable[[int], None] | None = None) -> dict:
    """Write `store` in Oscar's layout into the new directory `out` (built aside, then renamed).

    features.tsv (+ .lineidx, imageid2idx.json) always; predictions.tsv (+ .lineidx) when the
    store has tags, with only the tagged regions (Oscar joins every object's 'class'), each
    with its `bbox_id` (its row in features.tsv). Stores with normalised boxes (image size
    unknown) get the list form, which carries no image size.
    """
    if out.exists():
        raise VlpError(f"{out} exists: choose a new --out (an export never overwrites)")
    tmp = out.with_name(f".{out.name}.exporting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    unit = store.meta.get("boxes_unit", "pixels")
    with_tags = bool(store.labels)
    feat_off: list[int] = []
    tag_off: list[int] = []
    idmap: dict[str, int] = {}
    try:
        tmp.mkdir(parents=True)
        with (tmp / "features.tsv").open("wb") as ff, (tmp / "predictions.tsv").open("wb") as tf:
            for key in store.keys():
                if any(c in key for c in "\t\r\n"):
                    raise VlpError(f"{store.path}: key {key!r} holds a tab or newline, which "
                                   "Oscar's TSV cannot represent")
                r = store.get(key)
                row = np.concatenate([r.features.astype(np.float32),
                                      position_features(r.boxes, r.width, r.height, "oscar6")], 1)
                line = (f"{key}\t{len(r)}\t"
                        f"{base64.b64encode(row.astype('<f4').tobytes()).decode('ascii')}\n")
                idmap[key] = len(feat_off)
                feat_off.append(ff.tell())
                ff.write(line.encode("utf-8"))
                if with_tags:
                    objs = [{"rect": r.boxes[j].tolist(), "bbox_id": j,
                             "class": store.labels[c] if c < len(store.labels) else str(c),
                             "conf": float(r.confidences[j])}
                            for j, c in enumerate(r.class_ids.tolist()) if c >= 0]
                    normalised = unit == "normalised" or (
                        unit == "mixed" and (r.width, r.height) == (1, 1))
                    value: Any = objs if normalised else {
                        "objects": objs, "image_h": r.height, "image_w": r.width}
                    tag_off.append(tf.tell())
                    tf.write(f"{key}\t{json.dumps(value)}\n".encode("utf-8"))
                if advance is not None:
                    advance(1)
        _write_lineidx(tmp / "features.lineidx", feat_off)
        (tmp / "imageid2idx.json").write_text(json.dumps(idmap), encoding="utf-8")
        if with_tags:
            _write_lineidx(tmp / "predictions.lineidx", tag_off)
        else:
            (tmp / "predictions.tsv").unlink()
        info = {"from": str(store.path), "fingerprint": store.fingerprint,
                "extractor": store.meta.get("extractor"), "images": len(feat_off),
                "img_feature_dim": store.feature_dim + POS_DIM, "boxes_unit": unit,
                "files": sorted(p.name for p in tmp.iterdir()) + ["vlp_export.json"]}
        (tmp / "vlp_export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
