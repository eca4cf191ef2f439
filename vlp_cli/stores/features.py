"""The feature store: region features, boxes, tags and confidences per image, in LMDB.

One record per image key (by default the image's path relative to the input root). A record
is a fixed 32-byte header followed by 8-byte-aligned arrays, read with `np.frombuffer`:

    header  <4sHHIIIIII  magic b"VLPR", record version, flags, K, D, C, width, height, reserved
    feats   float16 [K, D]   region features, boxes sorted by confidence (descending)
    boxes   float32 [K, 4]   x1, y1, x2, y2 in pixels of the original image
    cls     int32   [K]      class id into the store's label vocabulary, -1 for none
    conf    float32 [K]      detector confidence (1.0 for given boxes)
    probs   float16 [K, C]   class distribution (flag 1), for UNITER's MRC-kl
    image   float16 [D]      whole-image feature (flag 2), outside the box budget, no tag

Boxes are stored sorted by confidence so that read-time selection (`conf_th`, `min_boxes`,
`max_boxes`) is a prefix: one extraction serves every recipe, and tags and features always
come from the same selection. Position features are computed at read time from boxes and
image size. The metadata record describes the extractor, so a later stage can reproduce the
extraction on new images or refuse.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlp_cli import VlpError, __version__
from vlp_cli.stores.lmdb_env import LazyReader, Writer, is_lmdb_dir

SCHEMA = "vlp.features"
SCHEMA_VERSION = 1
MAGIC = b"VLPR"
HEADER = struct.Struct("<4sHHIIIIII")
FLAG_PROBS = 1
FLAG_IMAGE = 2


def _pad8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class Regions:
    """The regions of one image, boxes sorted by confidence (descending)."""

    features: np.ndarray  # [K, D] float16
    boxes: np.ndarray  # [K, 4] float32, pixels
    class_ids: np.ndarray  # [K] int32, -1 = no class
    confidences: np.ndarray  # [K] float32
    width: int
    height: int
    class_probs: np.ndarray | None = None  # [K, C] float16
    image_feature: np.ndarray | None = None  # [D] float16

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def take(self, n: int) -> Regions:
        """The first n regions (the n most confident)."""
        return Regions(
            self.features[:n], self.boxes[:n], self.class_ids[:n], self.confidences[:n],
            self.width, self.height,
            None if self.class_probs is None else self.class_probs[:n], self.image_feature,
        )


def encode_regions(r: Regions) -> bytes:
    """Serialise one record (sorting boxes by confidence first)."""
    order = np.argsort(-np.asarray(r.confidences, dtype=np.float32), kind="stable")
    k = int(len(order))
    feats = np.ascontiguousarray(np.asarray(r.features, dtype=np.float16)[order])
    if feats.ndim != 2 or feats.shape[0] != k:
        raise ValueError(f"features must be [K, D] with K={k}, got {feats.shape}")
    d = int(feats.shape[1])
    flags, c = 0, 0
    parts = [
        feats.tobytes(),
        np.asarray(r.boxes, dtype=np.float32).reshape(k, 4)[order].tobytes(),
        np.asarray(r.class_ids, dtype=np.int32).reshape(k)[order].tobytes(),
        np.asarray(r.confidences, dtype=np.float32).reshape(k)[order].tobytes(),
    ]
    if r.class_probs is not None:
        probs = np.asarray(r.class_probs, dtype=np.float16)
        c = int(probs.shape[1])
        parts.append(probs.reshape(k, c)[order].tobytes())
        flags |= FLAG_PROBS
    if r.image_feature is not None:
        parts.append(np.asarray(r.image_feature, dtype=np.float16).reshape(d).tobytes())
        flags |= FLAG_IMAGE
    out = bytearray(HEADER.pack(MAGIC, SCHEMA_VERSION, flags, k, d, c, r.width, r.height, 0))
    for p in parts:
        out += p
        out += b"\0" * (_pad8(len(p)) - len(p))
    return bytes(out)


def decode_regions(buf: bytes | memoryview, limit: int | None = None,
                   copy: bool = True) -> Regions:
    """Parse one record; `limit` reads only the first `limit` regions' features."""
    magic, version, flags, k, d, c, width, height, _ = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise VlpError("not a vlp feature record (bad magic); is this a vlp feature store?")
    if version != SCHEMA_VERSION:
        raise VlpError(f"feature record version {version}, this vlp reads {SCHEMA_VERSION}: "
                       "re-extract the features with this version")
    n = k if limit is None else min(k, limit)
    off = HEADER.size
    feats = np.frombuffer(buf, np.float16, n * d, off).reshape(n, d)
    off += _pad8(k * d * 2)
    boxes = np.frombuffer(buf, np.float32, n * 4, off).reshape(n, 4)
    off += _pad8(k * 16)
    cls = np.frombuffer(buf, np.int32, n, off)
    off += _pad8(k * 4)
    conf = np.frombuffer(buf, np.float32, n, off)
    off += _pad8(k * 4)
    probs = image = None
    if flags & FLAG_PROBS:
        probs = np.frombuffer(buf, np.float16, n * c, off).reshape(n, c)
        off += _pad8(k * c * 2)
    if flags & FLAG_IMAGE:
        image = np.frombuffer(buf, np.float16, d, off)
    r = Regions(feats, boxes, cls, conf, width, height, probs, image)
    if copy:  # LMDB buffers die with their transaction
        r = Regions(feats.copy(), boxes.copy(), cls.copy(), conf.copy(), width, height,
                    None if probs is None else probs.copy(),
                    None if image is None else image.copy())
    return r


def read_header(buf: bytes | memoryview) -> tuple[int, int]:
    """(K, D) of a record without touching its arrays."""
    _, _, _, k, d, *_ = HEADER.unpack_from(buf, 0)
    return k, d


def select_count(confidences: np.ndarray, conf_th: float, min_boxes: int, max_boxes: int) -> int:
    """How many of the (sorted) boxes UNITER's read-time policy keeps."""
    above = int(np.count_nonzero(confidences >= conf_th))
    return int(min(len(confidences), max(min_boxes, min(above, max_boxes))))


def position_features(boxes: np.ndarray, width: int, height: int,
                      kind: str = "uniter7") -> np.ndarray:
    """Box geometry normalised by image size.

    oscar6:  x1/W, y1/H, x2/W, y2/H, w/W, h/H (Oscar's 6 numbers after the 2048-d feature).
    uniter7: the same plus the normalised area w*h (UNITER's 7-d position).
    """
    b = np.asarray(boxes, dtype=np.float32)
    w, h = float(max(width, 1)), float(max(height, 1))
    x1, y1, x2, y2 = b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h
    bw, bh = x2 - x1, y2 - y1
    cols = [x1, y1, x2, y2, bw, bh]
    if kind == "uniter7":
        cols.append(bw * bh)
    elif kind != "oscar6":
        raise ValueError(f"unknown position kind {kind!r}")
    return np.stack(cols, axis=1).astype(np.float32)


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class FeatureStore:
    """Read-only access to a feature store; opens lazily in each process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise VlpError(f"feature store {self.path} does not exist: run `vlp extract-features`")
        if not is_lmdb_dir(self.path):
            raise VlpError(f"{self.path} is not a feature store (no data.mdb): "
                           "pass the folder `vlp extract-features --out` wrote")
        self._reader = LazyReader(self.path)
        meta = self._reader.meta("store")
        if not meta or meta.get("schema") != SCHEMA:
            raise VlpError(f"{self.path} is not a vlp feature store (schema "
                           f"{(meta or {}).get('schema')!r})")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise VlpError(f"{self.path}: feature store schema version "
                           f"{meta.get('schema_version')}, this vlp reads {SCHEMA_VERSION}; "
                           "re-extract the features with this version of vlp")
        self.meta: dict = meta
        self.labels: list[str] = list(meta.get("labels", []))
        self.feature_dim: int = int(meta["feature_dim"])
        self.fingerprint: str = str(meta["fingerprint"])
        self._reader.close()  # reopened lazily in whichever process reads

    def __len__(self) -> int:
        return self._reader.count()

    def __contains__(self, key: str) -> bool:
        return self._reader.get(key.encode()) is not None

    def keys(self) -> list[str]:
        return [bytes(k).decode() for k in self._reader.keys()]

    def get(self, key: str, limit: int | None = None) -> Regions:
        """All regions of one image (or the `limit` most confident)."""
        with self._reader.begin() as txn:
            buf = txn.get(key.encode())
            if buf is None:
                raise KeyError(key)
            return decode_regions(buf, limit=limit)

    def get_selected(self, key: str, conf_th: float, min_boxes: int, max_boxes: int) -> Regions:
        """The regions kept by the read-time policy; only their bytes are copied."""
        with self._reader.begin() as txn:
            buf = txn.get(key.encode())
            if buf is None:
                raise KeyError(key)
            head = decode_regions(buf, copy=False)
            n = select_count(head.confidences, conf_th, min_boxes, max_boxes)
            return decode_regions(buf, limit=n)

    def describe(self) -> dict:
        """Counts, dims and provenance, for `vlp inspect`."""
        counts = []
        tags: dict[int, int] = {}
        with self._reader.begin() as txn:
            for _, buf in txn.cursor():
                r = decode_regions(buf, copy=False)
                counts.append(len(r))
                for c in r.class_ids[r.class_ids >= 0].tolist():
                    tags[c] = tags.get(c, 0) + 1
        arr = np.asarray(counts or [0])
        top = sorted(tags.items(), key=lambda kv: -kv[1])[:10]
        return {
            "kind": "feature store",
            "path": str(self.path),
            "images": len(counts),
            "feature_dim": self.feature_dim,
            "boxes_per_image": {"min": int(arr.min()), "mean": round(float(arr.mean()), 2),
                                "max": int(arr.max())},
            "top_tags": {self.labels[c] if 0 <= c < len(self.labels) else str(c): n
                         for c, n in top},
            "meta": self.meta,
        }


class FeatureStoreWriter:
    """Writes records in batches; reopening an existing store resumes it (keys are skipped)."""

    def __init__(self, path: str | Path, meta: dict, commit_every: int = 256):
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()) and not is_lmdb_dir(self.path):
            raise VlpError(f"{self.path} exists and is not a feature store: choose a new --out")
        self._w = Writer(self.path, commit_every=commit_every)
        old = self._w.read_meta("store")
        self.meta = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "vlp_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta,
        }
        if "fingerprint" not in self.meta:
            self.meta["fingerprint"] = fingerprint(self.meta.get("extractor"))
        if old is not None:
            if json.dumps(old.get("extractor"), sort_keys=True) != json.dumps(
                    self.meta.get("extractor"), sort_keys=True):
                self._w.close()
                raise VlpError(
                    f"{self.path} holds features from another extractor configuration "
                    f"(or other boxes): choose a new --out to keep both, nothing was changed")
            self.meta["created"] = old.get("created", self.meta["created"])
        self.done: set[bytes] = self._w.keys()
        self._w.put_meta("store", {**self.meta, "complete": False})
        self._w.commit()

    def __contains__(self, key: str) -> bool:
        return key.encode() in self.done

    def put(self, key: str, regions: Regions) -> None:
        k = key.encode()
        if k in self.done:
            return
        self._w.put(k, encode_regions(regions))
        self.done.add(k)

    def flush(self) -> None:
        """Commit what is pending in one transaction (call once per batch)."""
        self._w.commit()

    def close(self, **extra: Any) -> dict:
        """Commit what is pending and mark the store complete."""
        self.meta.update(extra)
        self.meta["complete"] = True
        self.meta["images"] = len(self.done)
        self._w.put_meta("store", self.meta)
        self._w.close()
        return self.meta
