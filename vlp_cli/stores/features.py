"""The feature store: region features, boxes, tags and confidences per image, in LMDB.

One record per image key (by default the image's path relative to the input root), in the
format of `records.py`: a header with an xxh3 checksum, then arrays read in place.

Boxes are stored sorted by confidence so that read-time selection (`conf_th`, `min_boxes`,
`max_boxes`) is a prefix: one extraction serves every recipe, and tags and features always
come from the same selection. Position features are computed at read time from boxes and
image size. The metadata record describes the extractor, so a later stage can reproduce the
extraction on new images or refuse.

Integrity: every read checks the record's checksum (a damaged record is a one-line error
naming the store and key). The store's `fingerprint` covers the extractor configuration and
every (key, record checksum) pair, so two stores of different images never share one. A
side database `sources` remembers each source image's size and content hash, so that a rerun
re-extracts the images that changed. Schema-1 stores (no checksums) are still read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vlp_cli import VlpError, __version__
from vlp_cli.stores.integrity import ContentDigest, DamagedRecord, fingerprint
from vlp_cli.stores.lmdb_env import LazyReader, Writer, is_lmdb_dir
from vlp_cli.stores.records import (  # noqa: F401 - the record API, re-exported
    FLAG_IMAGE, FLAG_PROBS, HEADER, MAGIC, RECORD_VERSION, Regions, check_record,
    decode_regions, encode_regions, position_features, select_count, stored_checksum)

logger = logging.getLogger(__name__)

SCHEMA = "vlp.features"
SCHEMA_VERSION = 2  # 2: record checksums, content fingerprint, sources; 1: vlp 0.1
READABLE_VERSIONS = (1, 2)
SOURCES_DB = "sources"
_NOTED_LEGACY: set[str] = set()


def extractor_fingerprint(meta: dict) -> str:
    """The fingerprint of the extractor configuration alone (schema 1 called it `fingerprint`)."""
    return str(meta.get("extractor_fingerprint") or meta.get("fingerprint"))


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


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

    Environments open lazily in each process, read-only and without locks. A store whose
    extraction has not finished (`complete: false`) is refused unless `allow_incomplete`
    (then a warning says how many images are missing, unless `warn=False`: describing).
    """

    def __init__(self, path: str | Path, allow_incomplete: bool = False, warn: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise VlpError(f"feature store {self.path} does not exist: run `vlp extract-features`")
        self.parts = store_parts(self.path)
        if not self.parts:
            raise VlpError(f"{self.path} is not a feature store (no data.mdb, shard-* folders or "
                           "manifest.json): pass the folder `vlp extract-features --out` wrote")
        self._readers = [LazyReader(p) for p in self.parts]
        self.part_metas: list[dict] = [r.meta("store") for r in self._readers]
        self._check_parts()
        first = self.part_metas[0]
        self.meta: dict = dict(first)
        self.meta["shards"] = len(self.parts)
        self.schema_version: int = int(first["schema_version"])
        self.checksums: bool = self.schema_version >= 2
        if not self.checksums and str(self.path.resolve()) not in _NOTED_LEGACY:
            _NOTED_LEGACY.add(str(self.path.resolve()))
            logger.info("note: %s was written by an older vlp (feature store schema 1): its "
                        "records carry no checksums, so damage cannot be detected; re-extract "
                        "it into a new --out to get them", self.path)
        self.labels: list[str] = list(self.meta.get("labels", []))
        self.feature_dim: int = int(self.meta["feature_dim"])
        self.extractor_fingerprint: str = extractor_fingerprint(first)
        self.complete: bool = all(m.get("complete") for m in self.part_metas)
        if not self.complete:
            self._incomplete(allow_incomplete, warn)
        self.fingerprint: str = self._fingerprint()

    def _check_parts(self) -> None:
        metas, parts = self.part_metas, self.parts
        for p, meta in zip(parts, metas):
            if not meta or meta.get("schema") != SCHEMA:
                raise VlpError(f"{p} is not a vlp feature store (schema "
                               f"{(meta or {}).get('schema')!r})")
            if meta.get("schema_version") not in READABLE_VERSIONS:
                raise VlpError(f"{p}: feature store schema version "
                               f"{meta.get('schema_version')}, this vlp reads "
                               f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade vlp, or "
                               "re-extract the features with this version")
            for field in ("schema_version", "feature_dim", "labels"):
                if meta.get(field) != metas[0].get(field):
                    raise VlpError(f"{p} differs from {parts[0]} in its {field}: shards of one "
                                   "store must come from the same extractor")
            if extractor_fingerprint(meta) != extractor_fingerprint(metas[0]):
                raise VlpError(f"{p} differs from {parts[0]} in its extractor fingerprint: "
                               "shards of one store must come from the same extractor")

    def _incomplete(self, allow: bool, warn: bool) -> None:
        have = len(self)
        planned = [m.get("planned_images") for m in self.part_metas]
        total = sum(planned) if all(isinstance(n, int) for n in planned) else None
        missing = f"{total - have} of {total} images missing" if total is not None else \
            f"{have} images so far, the planned number is not recorded"
        if not allow:
            raise VlpError(f"{self.path} is incomplete ({missing}): its extraction was "
                           "interrupted or is still running; rerun the same `vlp "
                           f"extract-features ... --out {self.path}` to finish it, or pass "
                           "--allow-incomplete to use the images there")
        if warn:
            logger.warning("%s is incomplete (%s): using the %d images there", self.path,
                           missing, have)

    def _fingerprint(self) -> str:
        """Extractor configuration + content; shards combine their content digests."""
        if not self.checksums:
            return str(self.meta["fingerprint"])  # schema 1: the extractor's only
        digest = ContentDigest()
        for reader, meta in zip(self._readers, self.part_metas):
            if meta.get("complete") and "content" in meta:
                digest = digest.merge(ContentDigest.from_hex(meta["content"], meta["images"]))
            else:  # an unfinished part has no digest yet: fold the checksums it carries
                for key, buf in reader.items():
                    if len(buf) >= HEADER.size:
                        digest.add(key, stored_checksum(buf))
        return digest.fingerprint(self.extractor_fingerprint)

    def close(self) -> None:
        """Close this process's LMDB handles (they reopen on the next read)."""
        for r in self._readers:
            r.close()

    def __len__(self) -> int:
        return sum(r.count() for r in self._readers)

    def __contains__(self, key: str) -> bool:
        k = key.encode()
        return any(r.view(k) is not None for r in self._readers)

    def keys(self) -> list[str]:
        if len(self._readers) == 1:
            return [bytes(k).decode() for k in self._readers[0].keys()]
        seen: dict[str, None] = {}
        for r in self._readers:
            seen.update((bytes(k).decode(), None) for k in r.keys())
        return list(seen)

    def damaged(self, key: str, exc: DamagedRecord) -> VlpError:
        """The one-line error for a record that failed its check."""
        return VlpError(f"{self.path} record {key!r} is damaged ({exc.why}): re-extract it "
                        f"(vlp extract-features resumes and replaces it) or run "
                        f"`vlp verify {self.path}`")

    def _read(self, key: str, fn: Callable[[memoryview], Regions]) -> Regions:
        k = key.encode()
        for r in self._readers:
            buf = r.view(k)
            if buf is not None:
                try:
                    return fn(buf)
                except DamagedRecord as exc:
                    raise self.damaged(key, exc) from None
        raise KeyError(key)

    def get(self, key: str, limit: int | None = None) -> Regions:
        """All regions of one image (or the `limit` most confident)."""
        v = self.schema_version
        return self._read(key, lambda buf: decode_regions(buf, limit=limit, version=v))

    def get_selected(self, key: str, conf_th: float, min_boxes: int, max_boxes: int,
                     copy: bool = True, probs: bool = True) -> Regions:
        """The regions kept by the read-time policy.

        With `copy=False` the arrays are read-only views into the memory-mapped store (valid
        until `close()` in this process): nothing is copied until the caller consumes them,
        which is how the data loader reads. Either way the record's checksum is checked;
        `probs=False` neither reads nor verifies the class distribution (`class_probs` None).
        """
        # The data loader's hot path: no closure, one view, one decode.
        k = key.encode()
        for r in self._readers:
            buf = r.view(k)
            if buf is not None:
                try:
                    return decode_regions(buf, copy=copy, select=(conf_th, min_boxes, max_boxes),
                                          version=self.schema_version, probs=probs)
                except DamagedRecord as exc:
                    raise self.damaged(key, exc) from None
        raise KeyError(key)

    def _items(self, copy: bool) -> Iterator[tuple[str, Regions]]:
        for r in self._readers:
            for k, buf in r.items():
                key = k.decode()
                try:
                    yield key, decode_regions(buf, copy=copy, version=self.schema_version)
                except DamagedRecord as exc:
                    raise self.damaged(key, exc) from None

    def records(self) -> Iterator[tuple[str, Regions]]:
        """Every (key, regions) in storage order (no copies kept: stream, don't hold)."""
        return self._items(copy=True)

    def scan(self) -> Iterator[tuple[int, str, int | None, str | None]]:
        """Every record of every part, checked: (part, key, its checksum, why damaged or None)."""
        for i, r in enumerate(self._readers):
            for k, buf in r.items():
                why = check_record(buf, self.schema_version)
                has = self.checksums and len(buf) >= HEADER.size
                yield i, k.decode(errors="replace"), stored_checksum(buf) if has else None, why

    def describe(self, conf_th: float = 0.2) -> dict:
        """Counts, dims, provenance, boxes per image and the tags most images have.

        Args:
            conf_th: a tag counts for an image when one of its boxes is at least this
                confident (the read-time threshold, `data.conf_th`).
        """
        counts = []
        tags: dict[int, int] = {}
        for _, reg in self._items(copy=False):
            counts.append(len(reg))
            kept = reg.class_ids[: int(np.count_nonzero(reg.confidences >= conf_th))]
            for c in np.unique(kept[kept >= 0]).tolist():
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
            "complete": self.complete,
            "checksums": self.checksums,
            "fingerprint": self.fingerprint,
            "boxes_per_image": {"min": int(arr.min()), "mean": round(float(arr.mean()), 2),
                                "max": int(arr.max()), "histogram": hist},
            f"images_per_tag (conf >= {conf_th:g})": {
                self.labels[c] if 0 <= c < len(self.labels) else str(c): n for c, n in top},
            "meta": {k: v for k, v in self.meta.items() if k != "labels"}
            | {"labels": f"{len(self.labels)} labels"},
        }


class FeatureStoreWriter:
    """Writes records in batches; reopening an existing store resumes it.

    Resuming checks every record already there: damaged ones are removed (so that they are
    extracted again) and the content digest is rebuilt from the others. A store is bound to
    its extractor configuration and its source folder: reopening it with another of either
    is refused, and the recorded source is never rewritten.
    """

    def __init__(self, path: str | Path, meta: dict, commit_every: int = 256,
                 planned: int | None = None):
        """Open (or create) the store at `path`.

        Args:
            path: the store directory.
            meta: extractor description (`extractor`, `feature_dim`, `labels`, optional
                `source` folder and `fingerprint` of the extractor configuration).
            commit_every: records per transaction at most.
            planned: how many images this run means to write in all (readers of an
                unfinished store report how many are missing).
        """
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()) and not is_lmdb_dir(self.path):
            raise VlpError(f"{self.path} exists and is not a feature store: choose a new --out")
        self._w = Writer(self.path, commit_every=commit_every)
        try:
            self._open(dict(meta), planned)
        except BaseException:
            self._w.env.close()
            raise

    def _open(self, meta: dict, planned: int | None) -> None:
        old = self._w.read_meta("store")
        ext_fp = str(meta.pop("fingerprint", None) or fingerprint(meta.get("extractor")))
        self.meta = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "vlp_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta,
            "extractor_fingerprint": ext_fp,
        }
        if planned is not None:
            self.meta["planned_images"] = int(planned)
        self.done: dict[bytes, int] = {}  # key -> record checksum
        self.sources: dict[bytes, bytes] = {}  # key -> source file signature
        self.digest = ContentDigest()
        self.removed: list[str] = []  # damaged records found when resuming
        if old is not None:
            self._resume(old)
        self._w.put_meta("store", {**self.meta, "complete": False})
        self._w.commit()

    def _resume(self, old: dict) -> None:
        if old.get("schema") != SCHEMA:
            raise VlpError(f"{self.path} holds a {old.get('schema')!r} store, not features: "
                           "choose a new --out")
        if old.get("schema_version") != SCHEMA_VERSION:
            raise VlpError(f"{self.path} was written by an older vlp (feature store schema "
                           f"{old.get('schema_version')}, no checksums): it cannot be extended; "
                           "choose a new --out")
        if json.dumps(old.get("extractor"), sort_keys=True) != json.dumps(
                self.meta.get("extractor"), sort_keys=True):
            raise VlpError(
                f"{self.path} holds features from another extractor configuration "
                f"(or other boxes): choose a new --out to keep both, nothing was changed")
        was, now = old.get("source"), self.meta.get("source")
        if was and now and not _same_path(str(was), str(now)):
            raise VlpError(f"{self.path} was extracted from {was}, not {now}: choose a new "
                           "--out (nothing was changed)")
        self.meta["created"] = old.get("created", self.meta["created"])
        if was:
            self.meta["source"] = was  # the store's provenance: never rewritten
        for key, buf in self._w.items():
            if check_record(buf) is None:
                self.done[key] = stored_checksum(buf)
                self.digest.add(key, self.done[key])
            else:
                self.removed.append(key.decode(errors="replace"))
        for key in self.removed:
            self._w.delete(key.encode())
        self.sources = {k: bytes(v) for k, v in self._w.items(SOURCES_DB)}
        if self.removed:
            logger.warning("%s: %d damaged records removed, to be extracted again (first: %r)",
                           self.path, len(self.removed), self.removed[0])

    def __contains__(self, key: str) -> bool:
        return key.encode() in self.done

    def changed(self, key: str, signature: bytes) -> bool:
        """Whether the source file of a stored key is not the one it was extracted from."""
        return self.sources.get(key.encode()) != signature

    def put(self, key: str, regions: Regions, source: bytes | None = None,
            replace: bool = False) -> None:
        """Add one record (a key already there is skipped unless `replace`).

        Args:
            source: the source file's signature (`integrity.file_signature`), remembered.
        """
        k = key.encode()
        old = self.done.get(k)
        if old is not None:
            if not replace:
                return
            self.digest.remove(k, old)
        record = encode_regions(regions)
        self.done[k] = stored_checksum(record)
        self.digest.add(k, self.done[k])
        self._w.put(k, record)
        if source is not None:
            self._w.put(k, source, db=SOURCES_DB)
            self.sources[k] = source

    def remove(self, key: str) -> None:
        """Drop a stored record (its source file changed and no longer extracts)."""
        k = key.encode()
        old = self.done.pop(k, None)
        if old is not None:
            self.digest.remove(k, old)
            self._w.delete(k)
        if self.sources.pop(k, None) is not None:
            self._w.delete(k, db=SOURCES_DB)

    def flush(self) -> None:
        """Commit what is pending in one transaction (call once per batch)."""
        self._w.commit()

    def close(self, **extra: Any) -> dict:
        """Commit what is pending and mark the store complete."""
        self.meta.update(extra)
        self.meta.update(complete=True, images=len(self.done), content=self.digest.hex,
                         fingerprint=self.digest.fingerprint(self.meta["extractor_fingerprint"]))
        self._w.put_meta("store", self.meta)
        self._w.close()
        return self.meta
