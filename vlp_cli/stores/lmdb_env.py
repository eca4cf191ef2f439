"""LMDB plumbing shared by the stores: the only module family that imports lmdb.

Readers open lazily, once per process, read-only and without locks (an environment opened
before `fork` must not be used by DataLoader workers). Writers commit in batches; an LMDB
transaction is atomic, so a killed writer loses at most the batch in flight and never leaves
half a record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lmdb

from vlp_cli import VlpError

META_DB = b"meta"
DATA_DB = b"data"
MAX_KEY_BYTES = 511  # LMDB's compiled-in key limit
_INITIAL_MAP = 1 << 34  # 16 GiB of address space; grown on demand


def is_lmdb_dir(path: Path) -> bool:
    return (Path(path) / "data.mdb").is_file()


# One read-only environment per (store, process): py-lmdb refuses a second handle on the same
# environment in one process, and several readers of one store are common (a stage and its
# checks, a test and the code under test).
_OPEN: dict[tuple[str, int], tuple[lmdb.Environment, Any, Any, lmdb.Transaction]] = {}


class LazyReader:
    """A read-only LMDB environment opened on first use in each process, shared by readers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_lmdb_dir(self.path):
            raise VlpError(f"{self.path} is not a vlp store (no data.mdb inside)")
        self._id = str(self.path.resolve())

    def _handles(self) -> tuple[lmdb.Environment, Any, Any]:  # type: ignore[return]
        key = (self._id, os.getpid())
        found = _OPEN.get(key)
        if found is None:
            env = lmdb.open(
                self._id, readonly=True, lock=False, readahead=False, meminit=False,
                max_dbs=4, subdir=True, max_readers=2048,
            )
            data = env.open_db(DATA_DB, create=False)
            # A read transaction kept for the life of the handle: values read through it are
            # views into the memory map that stay valid, so the hot path copies nothing.
            # Stores are immutable once written, so its snapshot never goes stale.
            found = (env, data, env.open_db(META_DB, create=False),
                     env.begin(db=data, buffers=True))
            _OPEN[key] = found
        return found[:3]

    def view(self, key: bytes) -> memoryview | None:
        """A zero-copy view of a value, valid until this store is closed in this process."""
        found = _OPEN.get((self._id, os.getpid()))  # the hot path: one lookup
        if found is None:
            self._handles()
            found = _OPEN[(self._id, os.getpid())]
        return found[3].get(key)

    def begin(self) -> lmdb.Transaction:
        env, data, _ = self._handles()
        return env.begin(db=data, buffers=True)

    def get(self, key: bytes) -> bytes | None:
        env, data, _ = self._handles()
        with env.begin(db=data) as txn:
            return txn.get(key)

    def meta(self, name: str) -> Any:
        raw = self.meta_bytes(name)
        return None if raw is None else json.loads(raw)

    def meta_bytes(self, name: str) -> bytes | None:
        env, _, meta = self._handles()
        with env.begin(db=meta) as txn:
            return txn.get(name.encode())

    def keys(self) -> list[bytes]:
        env, data, _ = self._handles()
        with env.begin(db=data) as txn:
            return list(txn.cursor().iternext(keys=True, values=False))

    def count(self) -> int:
        env, data, _ = self._handles()
        with env.begin(db=data) as txn:
            return txn.stat(data)["entries"]

    def close(self) -> None:
        """Close this process's handle (every reader of the store reopens on next use)."""
        found = _OPEN.pop((self._id, os.getpid()), None)
        if found is not None:
            found[3].abort()
            found[0].close()


class Writer:
    """A batched LMDB writer: `put` buffers, `commit` writes one atomic transaction."""

    def __init__(self, path: str | Path, commit_every: int = 256):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if is_lmdb_dir(self.path):
            LazyReader(self.path).close()  # a reader's handle here would block this one
        self.env = lmdb.open(
            str(self.path), map_size=_INITIAL_MAP, max_dbs=4, subdir=True, readahead=False,
            meminit=False,
        )
        self.data = self.env.open_db(DATA_DB)
        self.meta_db = self.env.open_db(META_DB)
        self.commit_every = commit_every
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_meta: dict[bytes, bytes] = {}

    def keys(self) -> set[bytes]:
        with self.env.begin(db=self.data) as txn:
            return set(txn.cursor().iternext(keys=True, values=False))

    def read_meta(self, name: str) -> Any:
        with self.env.begin(db=self.meta_db) as txn:
            raw = txn.get(name.encode())
        return None if raw is None else json.loads(raw)

    def put(self, key: bytes, value: bytes) -> None:
        if len(key) > MAX_KEY_BYTES:
            raise VlpError(f"key is {len(key)} bytes, over LMDB's {MAX_KEY_BYTES}: "
                           f"{key[:60]!r}...; shorten the file path")
        self._pending.append((key, value))
        if len(self._pending) >= self.commit_every:
            self.commit()

    def put_meta(self, name: str, value: Any, raw: bool = False) -> None:
        self._pending_meta[name.encode()] = value if raw else json.dumps(value).encode()

    def commit(self) -> None:
        if not self._pending and not self._pending_meta:
            return
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value, db=self.data)
                    for key, value in self._pending_meta.items():
                        txn.put(key, value, db=self.meta_db)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
        self._pending.clear()
        self._pending_meta.clear()

    def close(self) -> None:
        self.commit()
        self.env.sync()
        self.env.close()
