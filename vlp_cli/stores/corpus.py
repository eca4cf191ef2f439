"""The corpus store: tokenised text, image keys and labels per example, in LMDB.

Examples are numbered 0..N-1 (8-byte big-endian keys) and stored as small JSON objects
(schema 3):

    {"kind": what the example is ("caption", a question kind, "pair"...; open),
     "split": "train" | "val" | "test", "source": the reader and file it came from,
     "images": [image keys] (NLVR2 has two),
     "texts": [raw text segments], "segments": [[word-piece ids, no special tokens], ...],
     "label": the data set's own label, task-agnostic JSON (annotators' answers, a class...),
     "id": the data set's id of the example, or null}

Object tags are not baked in: the data loader reads them from the feature store with the same
box selection as the features. Tasks turn labels into targets (an answer vocabulary is the
task's, not the corpus's). The metadata record holds the tokenizer's identity, the feature
store's fingerprint, and per-example lengths and (kind, split) indices as int32 arrays for
length-aware batching.

Integrity: each value is an 8-byte little-endian xxh3-64 checksum of the JSON that follows
it, checked on every read; the metadata holds the checksums of the length and index arrays.
Corpora of schema 1 (vlp 0.1, no checksums) and 2 (vlp 0.2, one text and image per example)
are read, their examples seen as schema 3; they cannot be written to.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vlp_cli import VlpError, __version__
from vlp_cli.stores.integrity import checksum, fingerprint
from vlp_cli.stores.lmdb_env import LazyReader, Writer, is_lmdb_dir

logger = logging.getLogger(__name__)

SCHEMA = "vlp.corpus"
SCHEMA_VERSION = 3  # 3: open kinds, several images and text segments; 2: checksums; 1: 0.1
READABLE_VERSIONS = (1, 2, 3)
_NOTED_LEGACY: set[str] = set()
SPLITS = ("train", "val", "test")
FIELDS = ("kind", "split", "source", "images", "texts", "segments", "label", "id")


def upgrade_example(ex: dict) -> dict:
    """A schema-1/2 example (one "image", "text", "ids"; questions with "answers", "qid") as
    schema 3 sees it."""
    return {"kind": ex.get("kind"), "split": ex.get("split"), "source": ex.get("source", ""),
            "images": [ex.get("image")], "texts": [ex.get("text", "")],
            "segments": [ex.get("ids", [])], "label": ex.get("answers"),
            "id": ex.get("qid")}


def _key(i: int) -> bytes:
    return int(i).to_bytes(8, "big")


class CorpusWriter:
    """Accumulates examples; `close` writes indices, lengths and metadata atomically."""

    def __init__(self, path: str | Path, meta: dict, commit_every: int = 4096):
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()):
            raise VlpError(f"{self.path} already exists and is not empty: choose a new --out "
                           "(a corpus is written once; nothing was changed)")
        # Written beside the target and renamed at the end, so an interrupted build leaves no
        # half corpus under the final name.
        self._tmp = self.path.with_name(self.path.name + ".partial")
        if self._tmp.exists():
            import shutil

            shutil.rmtree(self._tmp)
        self._w = Writer(self._tmp, commit_every=commit_every)
        self.workdir = self._tmp  # extra files written here are renamed along with the store
        self.meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                     "vlp_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     **meta}
        self._n = 0
        self._lengths: list[int] = []
        self._index: dict[tuple[str, str], list[int]] = defaultdict(list)

    def add(self, example: dict) -> int:
        kind, split = example.get("kind"), example.get("split")
        if not isinstance(kind, str) or not kind.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"example kind must be a name (letters, digits, _ -), got {kind!r}")
        if split not in SPLITS:
            raise ValueError(f"example split must be one of {SPLITS}, got {split!r}")
        missing = [f for f in FIELDS if f not in example]
        if missing or len(example["texts"]) != len(example["segments"]) or not example["images"]:
            raise ValueError(f"example needs {', '.join(FIELDS)} (one segment per text, at "
                             f"least one image); missing {missing}")
        i = self._n
        blob = json.dumps({f: example[f] for f in FIELDS}, separators=(",", ":")).encode()
        self._w.put(_key(i), checksum(blob).to_bytes(8, "little") + blob)
        self._lengths.append(sum(len(s) for s in example["segments"]))
        self._index[(kind, split)].append(i)
        self._n += 1
        return i

    def abort(self) -> None:
        """Drop the partial store (on an error before `close`); the target is untouched."""
        import shutil

        self._w.env.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def close(self, **extra: Any) -> dict:
        counts = {f"{k}/{s}": len(v) for (k, s), v in sorted(self._index.items())}
        self.meta.update(extra, examples=self._n, counts=counts)
        # Identifies this corpus in the checkpoints trained on it.
        self.meta["fingerprint"] = fingerprint(
            {k: self.meta.get(k) for k in ("created", "examples", "counts", "sources",
                                           "tokenizer", "features")})
        arrays = {"lengths": np.asarray(self._lengths, np.int32).tobytes()}
        for (kind, split), idx in self._index.items():
            arrays[f"index/{kind}/{split}"] = np.asarray(idx, np.int32).tobytes()
        for name, blob in arrays.items():
            self._w.put_meta(name, blob, raw=True)
        self.meta["array_checksums"] = {name: checksum(blob) for name, blob in arrays.items()}
        self._w.put_meta("store", self.meta)
        self._w.close()
        if self.path.exists():
            self.path.rmdir()  # empty, checked in __init__
        self._tmp.rename(self.path)
        return self.meta


class Corpus:
    """Read-only access to a corpus store; opens lazily in each process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_lmdb_dir(self.path):
            raise VlpError(f"corpus {self.path} not found (no data.mdb): run `vlp build-corpus`")
        self._reader = LazyReader(self.path)
        meta = self._reader.meta("store")
        if not meta or meta.get("schema") != SCHEMA:
            raise VlpError(f"{self.path} is not a vlp corpus store")
        if meta.get("schema_version") not in READABLE_VERSIONS:
            raise VlpError(f"{self.path}: corpus schema version {meta.get('schema_version')}, "
                           f"this vlp reads {', '.join(map(str, READABLE_VERSIONS))}; rebuild "
                           "it with `vlp build-corpus`")
        self.meta: dict = meta
        self.schema: int = meta["schema_version"]
        self.checksums: bool = self.schema >= 2
        if not self.checksums and str(self.path.resolve()) not in _NOTED_LEGACY:
            _NOTED_LEGACY.add(str(self.path.resolve()))
            logger.info("note: %s was written by an older vlp (corpus schema 1): its records "
                        "carry no checksums, so damage cannot be detected; rebuild it with "
                        "`vlp build-corpus` to get them", self.path)
        self.lengths = np.frombuffer(self._array("lengths"), np.int32).copy()

    def _damaged(self, what: str, why: str) -> VlpError:
        return VlpError(f"{self.path} {what} is damaged ({why}): rebuild the corpus with "
                        f"`vlp build-corpus` (or run `vlp verify {self.path}`)")

    def _array(self, name: str) -> bytes:
        """A metadata array (lengths, an index), checked against its recorded checksum."""
        raw, why = self._array_checked(name)
        if why is not None:
            raise self._damaged(f"array {name!r}", why)
        return raw

    def _array_checked(self, name: str) -> tuple[bytes, str | None]:
        raw = self._reader.meta_bytes(name) or b""
        want = self.meta.get("array_checksums", {}).get(name) if self.checksums else None
        if want is not None and checksum(raw) != want:
            return raw, "checksum mismatch"
        if len(raw) % 4:
            return raw, f"{len(raw)} bytes, not int32s"
        return raw, None

    def _decode(self, buf: bytes | memoryview) -> tuple[dict | None, str | None]:
        """(example, None), or (None, why damaged)."""
        if self.checksums:
            if len(buf) < 8:
                return None, f"{len(buf)} bytes, shorter than its checksum"
            body = memoryview(buf)[8:]
            if checksum(body) != int.from_bytes(buf[:8], "little"):
                return None, "checksum mismatch"
        else:
            body = memoryview(buf)
        try:
            example = json.loads(bytes(body))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, "not valid JSON"
        if not isinstance(example, dict):
            return None, "not a JSON object"
        if self.schema < 3:
            example = upgrade_example(example)
        return example, None

    def __len__(self) -> int:
        return int(self.meta["examples"])

    def get(self, i: int) -> dict:
        raw = self._reader.view(_key(i))
        if raw is None:
            raise IndexError(i)
        example, why = self._decode(raw)
        if example is None:
            raise self._damaged(f"record {i}", str(why))
        return example

    def scan(self) -> Iterator[tuple[str, str | None]]:
        """Every record and metadata array, checked: (what, why damaged or None)."""
        for name in ("lengths", *(k for k in self.meta.get("array_checksums", {})
                                  if k != "lengths")):
            yield f"array {name!r}", self._array_checked(name)[1]
        for key, buf in self._reader.items():
            yield f"record {int.from_bytes(key, 'big')}", self._decode(buf)[1]

    def indices(self, kind: str, split: str) -> np.ndarray:
        raw = self._array(f"index/{kind}/{split}")
        return np.frombuffer(raw, np.int32).copy() if raw else np.zeros(0, np.int32)

    def require(self, kind: str, split: str) -> np.ndarray:
        idx = self.indices(kind, split)
        if len(idx) == 0:
            have = ", ".join(self.meta.get("counts", {})) or "nothing"
            raise VlpError(f"corpus {self.path} has no '{kind}' examples in split '{split}' "
                           f"(it has: {have})")
        return idx

    def describe(self) -> dict:
        return {
            "kind": "corpus",
            "path": str(self.path),
            "examples": len(self),
            "counts": self.meta.get("counts", {}),
            "checksums": self.checksums,
            "length": {"min": int(self.lengths.min()) if len(self.lengths) else 0,
                       "mean": round(float(self.lengths.mean()), 2) if len(self.lengths) else 0,
                       "max": int(self.lengths.max()) if len(self.lengths) else 0},
            "meta": {k: v for k, v in self.meta.items() if k != "answers"},
        }
