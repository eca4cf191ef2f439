"""LMDB plumbing shared by the stores: the only module family that imports lmdb.

Readers open lazily, once per process, read-only and without locks (an environment opened
before `fork` must not be used by DataLoader workers). Writers commit in batches; an LMDB
transaction is atomic, so a killed writer loses at most the batch in flight and never leaves
half a record.

A damaged file never reaches LMDB's memory map unchecked: reading a mapped page past the end
of a truncated file kills the process with SIGBUS, so every open first compares the file's
length with the one LMDB's own meta pages require, and LMDB's errors become one-line
`VlpError`s naming the store.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from vlp_cli import VlpError

META_DB = b"meta"
DATA_DB = b"data"
MAX_KEY_BYTES = 511  # LMDB's compiled-in key limit
_INITIAL_MAP = 1 << 34  # 16 GiB of address space; grown on demand
_REBUILD = ("the vlp store is damaged: rebuild it (vlp extract-features or vlp build-corpus "
            "into a new --out)")

# LMDB's meta pages (pages 0 and 1 of data.mdb, 64-bit build): a 16-byte page header, then
# MDB_meta: magic, version, address, mapsize, two MDB_db of 48 bytes (the first one's md_pad
# holds the page size), mm_last_pg, mm_txnid.
_PAGE_HEADER = 16
_META = struct.Struct("<IIQQ I44x 48x QQ")
_LMDB_MAGIC = 0xBEEFC0DE


def is_lmdb_dir(path: Path) -> bool:
    return (Path(path) / "data.mdb").is_file()


def check_lmdb_file(path: Path) -> None:
    """Refuse a data.mdb shorter than its own meta pages say (mapping it would SIGBUS).

    Raises:
        VlpError: the file is truncated or its meta pages are not LMDB's.
    """
    file = Path(path) / "data.mdb"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            first = f.read(_PAGE_HEADER + _META.size)
            if len(first) < _PAGE_HEADER + _META.size:
                raise VlpError(f"{file} is truncated ({size} bytes, not even LMDB's header): "
                               + _REBUILD)
            metas = [_META.unpack_from(first, _PAGE_HEADER)]
            page = metas[0][4]
            if metas[0][0] == _LMDB_MAGIC and 512 <= page <= 1 << 16:
                f.seek(page)
                second = f.read(_PAGE_HEADER + _META.size)
                if len(second) == _PAGE_HEADER + _META.size:
                    metas.append(_META.unpack_from(second, _PAGE_HEADER))
    except OSError as exc:
        raise VlpError(f"{file} cannot be read ({exc.strerror})") from None
    if len(metas) < 2 or any(m[0] != _LMDB_MAGIC for m in metas):
        raise VlpError(f"{file} is not a valid LMDB file (its meta pages are damaged or "
                       "missing): " + _REBUILD)
    last_page = max(metas, key=lambda m: m[6])[5]  # the newer meta, by transaction id
    need = (last_page + 1) * page
    if size < need:
        raise VlpError(f"{file} is truncated ({size} bytes; LMDB's meta page says at least "
                       f"{need}): " + _REBUILD)


@contextmanager
def lmdb_errors(path: Path) -> Iterator[None]:
    """LMDB's own errors (MDB_CORRUPTED, MDB_INVALID, page not found...) as one line."""
    try:
        yield
    except lmdb.Error as exc:
        raise VlpError(f"{path}: LMDB reports {type(exc).__name__} ({str(exc).strip()}): "
                       + _REBUILD) from None


# One read-only environment per (store, process): py-lmdb refuses a second handle on the same
# environment in one process, and several readers of one store are common (a stage and its
# checks, a test and the code under test).
_OPEN: dict[tuple[str, int], tuple[lmdb.Environment, Any, Any, lmdb.Transaction]] = {}


def _drop_inherited() -> None:
    """In a forked child (a DataLoader worker): close the handles inherited from the parent.

    LMDB handles must not be used across fork, and py-lmdb refuses to open an environment
    whose files a handle of this process already has open, inherited ones included (the
    "already open in this process" error every worker met). Closing the child's copies (read
    only, no lock file) touches nothing of the parent's; the child then opens its own lazily.
    """
    pid = os.getpid()
    for key in [k for k in _OPEN if k[1] != pid]:
        env, _, _, txn = _OPEN.pop(key)
        try:
            txn.abort()
            env.close()
        except lmdb.Error:
            pass


os.register_at_fork(after_in_child=_drop_inherited)


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
            check_lmdb_file(self.path)
            with lmdb_errors(self.path):
                env = lmdb.open(
                    self._id, readonly=True, lock=False, readahead=False, meminit=False,
                    max_dbs=4, subdir=True, max_readers=2048,
                )
                try:
                    data = env.open_db(DATA_DB, create=False)
                    meta = env.open_db(META_DB, create=False)
                except lmdb.NotFoundError:
                    env.close()
                    raise VlpError(f"{self.path} is an LMDB store vlp did not write (no "
                                   "'data' and 'meta' databases)") from None
                # A read transaction kept for the life of the handle: values read through it
                # are views into the memory map that stay valid, so the hot path copies
                # nothing. Stores are immutable once written, so its snapshot never goes stale.
                found = (env, data, meta, env.begin(db=data, buffers=True))
            _OPEN[key] = found
        return found[:3]

    def view(self, key: bytes) -> memoryview | None:
        """A zero-copy view of a value, valid until this store is closed in this process."""
        found = _OPEN.get((self._id, os.getpid()))  # the hot path: one lookup
        if found is None:
            self._handles()
            found = _OPEN[(self._id, os.getpid())]
        try:
            return found[3].get(key)
        except lmdb.Error:
            with lmdb_errors(self.path):
                raise

    def items(self, db: str = "data") -> Iterator[tuple[bytes, memoryview]]:
        """Every (key, value view) of a database in key order; views live until the next."""
        env, data, _ = self._handles()
        with lmdb_errors(self.path):
            if db == "data":
                handle = data
            else:
                try:
                    handle = env.open_db(db.encode(), create=False)
                except lmdb.NotFoundError:
                    return
            with env.begin(db=handle, buffers=True) as txn:
                for key, value in txn.cursor():
                    yield bytes(key), value

    def get(self, key: bytes) -> bytes | None:
        env, data, _ = self._handles()
        with lmdb_errors(self.path), env.begin(db=data) as txn:
            return txn.get(key)

    def meta(self, name: str) -> Any:
        raw = self.meta_bytes(name)
        try:
            return None if raw is None else json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise VlpError(f"{self.path}: its '{name}' metadata is not valid JSON: "
                           + _REBUILD) from None

    def meta_bytes(self, name: str) -> bytes | None:
        env, _, meta = self._handles()
        with lmdb_errors(self.path), env.begin(db=meta) as txn:
            return txn.get(name.encode())

    def keys(self) -> list[bytes]:
        env, data, _ = self._handles()
        with lmdb_errors(self.path), env.begin(db=data) as txn:
            return list(txn.cursor().iternext(keys=True, values=False))

    def count(self) -> int:
        env, data, _ = self._handles()
        with lmdb_errors(self.path), env.begin(db=data) as txn:
            return txn.stat(data)["entries"]

    def close(self) -> None:
        """Close this process's handle (every reader of the store reopens on next use)."""
        found = _OPEN.pop((self._id, os.getpid()), None)
        if found is not None:
            found[3].abort()
            found[0].close()


class Writer:
    """A batched LMDB writer: `put` buffers, `commit` writes one atomic transaction.

    Besides `data` and `meta`, a store may hold small named side databases (`put(db=...)`).
    """

    def __init__(self, path: str | Path, commit_every: int = 256):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if is_lmdb_dir(self.path):
            LazyReader(self.path).close()  # a reader's handle here would block this one
            check_lmdb_file(self.path)
        with lmdb_errors(self.path):
            self.env = lmdb.open(
                str(self.path), map_size=_INITIAL_MAP, max_dbs=4, subdir=True,
                readahead=False, meminit=False,
            )
            self._dbs = {"data": self.env.open_db(DATA_DB), "meta": self.env.open_db(META_DB)}
        self.commit_every = commit_every
        self._pending: list[tuple[Any, bytes, bytes | None]] = []
        self._pending_meta: dict[bytes, bytes] = {}

    @property
    def data(self) -> Any:
        return self._dbs["data"]

    def _db(self, name: str) -> Any:
        if name not in self._dbs:
            with lmdb_errors(self.path):
                self._dbs[name] = self.env.open_db(name.encode())
        return self._dbs[name]

    def keys(self) -> set[bytes]:
        with lmdb_errors(self.path), self.env.begin(db=self.data) as txn:
            return set(txn.cursor().iternext(keys=True, values=False))

    def items(self, db: str = "data") -> Iterator[tuple[bytes, memoryview]]:
        """Every committed (key, value view) of a database; views live until the next."""
        handle = self._db(db)
        with lmdb_errors(self.path), self.env.begin(db=handle, buffers=True) as txn:
            for key, value in txn.cursor():
                yield bytes(key), value

    def read_meta(self, name: str) -> Any:
        with lmdb_errors(self.path), self.env.begin(db=self._dbs["meta"]) as txn:
            raw = txn.get(name.encode())
        try:
            return None if raw is None else json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise VlpError(f"{self.path}: its '{name}' metadata is not valid JSON: "
                           + _REBUILD) from None

    def put(self, key: bytes, value: bytes, db: str = "data") -> None:
        if len(key) > MAX_KEY_BYTES:
            raise VlpError(f"key is {len(key)} bytes, over LMDB's {MAX_KEY_BYTES}: "
                           f"{key[:60]!r}...; shorten the file path")
        self._pending.append((self._db(db), key, value))
        if len(self._pending) >= self.commit_every:
            self.commit()

    def delete(self, key: bytes, db: str = "data") -> None:
        """Remove a key at the next commit."""
        self._pending.append((self._db(db), key, None))

    def put_meta(self, name: str, value: Any, raw: bool = False) -> None:
        self._pending_meta[name.encode()] = value if raw else json.dumps(value).encode()

    def commit(self) -> None:
        if not self._pending and not self._pending_meta:
            return
        with lmdb_errors(self.path):
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        for db, key, value in self._pending:
                            if value is None:
                                txn.delete(key, db=db)
                            else:
                                txn.put(key, value, db=db)
                        for key, value in self._pending_meta.items():
                            txn.put(key, value, db=self._dbs["meta"])
                    break
                except lmdb.MapFullError:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
        self._pending.clear()
        self._pending_meta.clear()

    def close(self) -> None:
        self.commit()
        self.env.sync()
        self.env.close()
