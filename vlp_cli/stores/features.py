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
from collections.abc import Iterator
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


def _header(buf: bytes | memoryview) -> tuple[int, int, int, int, int, int]:
    """(flags, K, D, C, width, height) of a record, after checking its magic and version."""
    magic, version, flags, k, d, c, width, height, _ = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise VlpError("not a vlp feature record (bad magic); is this a vlp feature store?")
    if version != SCHEMA_VERSION:
        raise VlpError(f"feature record version {version}, this vlp reads {SCHEMA_VERSION}: "
                       "re-extract the features with this version")
    return flags, k, d, c, width, height


# Byte offsets of (feats, boxes, cls, conf, probs, image) by (K, D, C): a store holds few
# distinct shapes, and a read then costs one header unpack and one view per array.
_LAYOUTS: dict[tuple[int, int, int], tuple[int, int, int, int, int, int]] = {}


def _layout(k: int, d: int, c: int) -> tuple[int, int, int, int, int, int]:
    found = _LAYOUTS.get((k, d, c))
    if found is None:
        feats = HEADER.size
        boxes = feats + _pad8(k * d * 2)
        cls = boxes + _pad8(k * 16)
        conf = cls + _pad8(k * 4)
        probs = conf + _pad8(k * 4)
        image = probs + _pad8(k * c * 2)  # c is 0 without class distributions
        if len(_LAYOUTS) < 4096:
            _LAYOUTS[(k, d, c)] = found = (feats, boxes, cls, conf, probs, image)
        else:
            found = (feats, boxes, cls, conf, probs, image)
    return found


def _confidences(buf: bytes | memoryview) -> np.ndarray:
    """A record's [K] confidences, read in place (a view over `buf`), nothing else parsed."""
    _, k, d, c, _, _ = _header(buf)
    return np.ndarray((k,), np.float32, buf, _layout(k, d, c)[3])


def decode_regions(buf: bytes | memoryview, limit: int | None = None, copy: bool = True,
                   select: tuple[float, int, int] | None = None) -> Regions:
    """Parse one record.

    Args:
        buf: the record's bytes (or a view into the store's memory map).
        limit: keep only the first `limit` regions (the most confident).
        copy: copy the arrays out of `buf`; otherwise they are read-only views over it.
        select: (conf_th, min_boxes, max_boxes): keep what `select_count` keeps.
    """
    magic, version, flags, k, d, c, width, height, _ = HEADER.unpack_from(buf, 0)
    if magic != MAGIC or version != SCHEMA_VERSION:
        _header(buf)  # raises the error that says which
    lay = _layout(k, d, c)
    n = k
    if select is not None:
        n = select_count(np.ndarray((k,), np.float32, buf, lay[3]), *select)
    if limit is not None:
        n = min(n, limit)
    # np.ndarray over the buffer: a view, like np.frombuffer + reshape in one call.
    feats = np.ndarray((n, d), np.float16, buf, lay[0])
    boxes = np.ndarray((n, 4), np.float32, buf, lay[1])
    cls = np.ndarray((n,), np.int32, buf, lay[2])
    conf = np.ndarray((n,), np.float32, buf, lay[3])
    probs = np.ndarray((n, c), np.float16, buf, lay[4]) if flags & FLAG_PROBS else None
    image = np.ndarray((d,), np.float16, buf, lay[5]) if flags & FLAG_IMAGE else None
    if copy:  # LMDB buffers die with their transaction
        return Regions(feats.copy(), boxes.copy(), cls.copy(), conf.copy(), width, height,
                       None if probs is None else probs.copy(),
                       None if image is None else image.copy())
    return Regions(feats, boxes, cls, conf, width, height, probs, image)


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
    if kind not in ("oscar6", "uniter7"):
        raise ValueError(f"unknown position kind {kind!r}")
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = np.empty((len(b), 7 if kind == "uniter7" else 6), np.float32)
    # Written in place, column blocks at once: a read calls this per image (float32 throughout).
    size = np.array([max(width, 1), max(height, 1)] * 2, np.float32)
    np.divide(b, size, out=out[:, :4])
    np.subtract(out[:, 2:4], out[:, :2], out=out[:, 4:6])
    if kind == "uniter7":
        np.multiply(out[:, 4], out[:, 5], out=out[:, 6])
    return out


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


MANIFEST = "manifest.json"


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}"


def store_parts(path: Path) -> list[Path]:
    """The LMDB directories that make up a store: itself, its shard folders, or a manifest's.

    A data-parallel extraction writes one shard per process under the output folder; every
    reader takes the folder (or a `manifest.json` listing store paths) as one store.
    """
    path = Path(path)
    if is_lmdb_dir(path):
        return [path]
    if path.is_file() and path.name.endswith(".json"):
        manifest = path
    else:
        manifest = path / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8"))["stores"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise VlpError(f"{manifest}: expected {{\"stores\": [paths...]}}")
        parts = [(manifest.parent / p).resolve() for p in listed]
        bad = [p for p in parts if not is_lmdb_dir(p)]
        if bad:
            raise VlpError(f"{manifest} lists {bad[0]}, which is not a feature store")
        return parts
    if path.is_dir():
        shards = sorted(p for p in path.glob("shard-*") if is_lmdb_dir(p))
        if shards:
            return shards
    return []


class FeatureStore:
    """Read-only access to a feature store (one LMDB, or shards read as one).

    Environments open lazily in each process, read-only and without locks.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise VlpError(f"feature store {self.path} does not exist: run `vlp extract-features`")
        parts = store_parts(self.path)
        if not parts:
            raise VlpError(f"{self.path} is not a feature store (no data.mdb, shard-* folders or "
                           "manifest.json): pass the folder `vlp extract-features --out` wrote")
        self._readers = [LazyReader(p) for p in parts]
        metas = [r.meta("store") for r in self._readers]
        for p, meta in zip(parts, metas):
            if not meta or meta.get("schema") != SCHEMA:
                raise VlpError(f"{p} is not a vlp feature store (schema "
                               f"{(meta or {}).get('schema')!r})")
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise VlpError(f"{p}: feature store schema version "
                               f"{meta.get('schema_version')}, this vlp reads {SCHEMA_VERSION}; "
                               "re-extract the features with this version of vlp")
            for field in ("fingerprint", "feature_dim", "labels"):
                if meta.get(field) != metas[0].get(field):
                    raise VlpError(f"{p} differs from {parts[0]} in its {field}: shards of one "
                                   "store must come from the same extractor")
        self.meta: dict = dict(metas[0])
        self.meta["shards"] = len(parts)
        self.labels: list[str] = list(self.meta.get("labels", []))
        self.feature_dim: int = int(self.meta["feature_dim"])
        self.fingerprint: str = str(self.meta["fingerprint"])

    def close(self) -> None:
        """Close this process's LMDB handles (they reopen on the next read)."""
        for r in self._readers:
            r.close()

    def __len__(self) -> int:
        return sum(r.count() for r in self._readers)

    def __contains__(self, key: str) -> bool:
        k = key.encode()
        return any(r.get(k) is not None for r in self._readers)

    def keys(self) -> list[str]:
        if len(self._readers) == 1:
            return [bytes(k).decode() for k in self._readers[0].keys()]
        seen: dict[str, None] = {}
        for r in self._readers:
            seen.update((bytes(k).decode(), None) for k in r.keys())
        return list(seen)

    def _read(self, key: str, fn: Any) -> Any:
        k = key.encode()
        for r in self._readers:
            with r.begin() as txn:
                buf = txn.get(k)
                if buf is not None:
                    return fn(buf)
        raise KeyError(key)

    def get(self, key: str, limit: int | None = None) -> Regions:
        """All regions of one image (or the `limit` most confident)."""
        return self._read(key, lambda buf: decode_regions(buf, limit=limit))

    def get_selected(self, key: str, conf_th: float, min_boxes: int, max_boxes: int,
                     copy: bool = True) -> Regions:
        """The regions kept by the read-time policy.

        With `copy=False` the arrays are read-only views into the memory-mapped store (valid
        until `close()` in this process): nothing is copied until the caller consumes them,
        which is how the data loader reads.
        """
        select = (conf_th, min_boxes, max_boxes)
        if not copy:
            k = key.encode()
            for r in self._readers:
                buf = r.view(k)
                if buf is not None:
                    return decode_regions(buf, copy=False, select=select)
            raise KeyError(key)
        # Only the confidences decide the count, read in place before anything is copied.
        return self._read(key, lambda buf: decode_regions(buf, select=select))

    def records(self) -> Iterator[tuple[str, Regions]]:
        """Every (key, regions) in storage order (no copies kept: stream, don't hold)."""
        for r in self._readers:
            with r.begin() as txn:
                for k, buf in txn.cursor():
                    yield bytes(k).decode(), decode_regions(buf)

    def describe(self) -> dict:
        """Counts, dims, provenance, boxes per image and the most frequent tags."""
        counts = []
        tags: dict[int, int] = {}
        for r in self._readers:
            with r.begin() as txn:
                for _, buf in txn.cursor():
                    reg = decode_regions(buf, copy=False)
                    counts.append(len(reg))
                    for c in reg.class_ids[reg.class_ids >= 0].tolist():
                        tags[c] = tags.get(c, 0) + 1
        arr = np.asarray(counts or [0])
        edges = [0, 1, 2, 5, 10, 20, 50, 100, 1 << 30]
        hist = {(f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}" if hi < 1 << 30 else f">={lo}"):
                int(((arr >= lo) & (arr < hi)).sum()) for lo, hi in zip(edges, edges[1:])}
        top = sorted(tags.items(), key=lambda kv: -kv[1])[:15]
        return {
            "kind": "feature store",
            "path": str(self.path),
            "images": len(counts),
            "shards": len(self._readers),
            "feature_dim": self.feature_dim,
            "boxes_per_image": {"min": int(arr.min()), "mean": round(float(arr.mean()), 2),
                                "max": int(arr.max()), "histogram": hist},
            "top_tags": {self.labels[c] if 0 <= c < len(self.labels) else str(c): n
                         for c, n in top},
            "meta": {k: v for k, v in self.meta.items() if k != "labels"}
            | {"labels": f"{len(self.labels)} labels"},
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
