"""The corpus store: tokenised text, image keys and task fields per example, in LMDB.

Examples are numbered 0..N-1 (8-byte big-endian keys) and stored as small JSON objects:

    {"kind": "caption" | "vqa", "split": "train" | "val" | "test", "image": key,
     "text": raw text, "ids": [word-piece ids, no special tokens],
     # vqa only:
     "qid": ..., "answers": [raw human answers], "labels": [answer index], "scores": [soft score]}

Object tags are not baked in: the data loader reads them from the feature store with the same
box selection as the features. The metadata record holds the tokenizer's identity, the feature
store's fingerprint, the answer vocabulary, and per-example lengths and (kind, split) indices
as int32 arrays for length-aware batching.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from vlp_cli import VlpError, __version__
from vlp_cli.stores.features import fingerprint
from vlp_cli.stores.lmdb_env import LazyReader, Writer, is_lmdb_dir

SCHEMA = "vlp.corpus"
SCHEMA_VERSION = 1
KINDS = ("caption", "vqa")
SPLITS = ("train", "val", "test")


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
        if kind not in KINDS:
            raise ValueError(f"example kind must be one of {KINDS}, got {kind!r}")
        if split not in SPLITS:
            raise ValueError(f"example split must be one of {SPLITS}, got {split!r}")
        i = self._n
        self._w.put(_key(i), json.dumps(example, separators=(",", ":")).encode())
        self._lengths.append(len(example["ids"]))
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
        self._w.put_meta("lengths", np.asarray(self._lengths, np.int32).tobytes(), raw=True)
        for (kind, split), idx in self._index.items():
            self._w.put_meta(f"index/{kind}/{split}", np.asarray(idx, np.int32).tobytes(),
                             raw=True)
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
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise VlpError(f"{self.path}: corpus schema version {meta.get('schema_version')}, "
                           f"this vlp reads {SCHEMA_VERSION}; rebuild it with `vlp build-corpus`")
        self.meta: dict = meta
        raw = self._reader.meta_bytes("lengths") or b""
        self.lengths = np.frombuffer(raw, np.int32).copy()

    def __len__(self) -> int:
        return int(self.meta["examples"])

    @property
    def answers(self) -> list[str]:
        return list(self.meta.get("answers", []))

    def get(self, i: int) -> dict:
        raw = self._reader.get(_key(i))
        if raw is None:
            raise IndexError(i)
        return json.loads(raw)

    def indices(self, kind: str, split: str) -> np.ndarray:
        raw = self._reader.meta_bytes(f"index/{kind}/{split}")
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
            "length": {"min": int(self.lengths.min()) if len(self.lengths) else 0,
                       "mean": round(float(self.lengths.mean()), 2) if len(self.lengths) else 0,
                       "max": int(self.lengths.max()) if len(self.lengths) else 0},
            "meta": {k: v for k, v in self.meta.items() if k != "answers"}
            | {"answers": f"{len(self.answers)} answers"},
        }
