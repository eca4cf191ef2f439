"""Checksums and fingerprints: how a store proves that it still holds what was written.

* Every record carries an xxh3-64 checksum of its bytes, checked on every read.
* A store's content digest folds all (key, record checksum) pairs into one number with a
  sum modulo 2**128 of per-pair hashes: the order of writes does not matter (a resumed or
  sharded extraction gives the digest of a single-process one), a replaced record is taken
  out again by subtraction, and shards combine by adding their digests.
* A source file is remembered by its size and the xxh3-64 of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import xxhash

from vlp_cli import VlpError

_MOD = 1 << 128
SOURCE = struct.Struct("<QQ")  # a source file's (size, xxh3-64 of its bytes)


class DamagedRecord(VlpError):
    """A record failed its checksum or does not parse; the store adds its path and key."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checksum(data: bytes | memoryview, seed: int = 0) -> int:
    """xxh3-64 of `data` (any buffer: a view into a memory map is hashed in place)."""
    return xxhash.xxh3_64_intdigest(data, seed)


class ContentDigest:
    """An order-free digest of a store's (key, record checksum) pairs."""

    def __init__(self, total: int = 0, count: int = 0) -> None:
        self.total = total
        self.count = count

    @staticmethod
    def _term(key: bytes, record_checksum: int) -> int:
        return xxhash.xxh3_128_intdigest(key + record_checksum.to_bytes(8, "little"))

    def add(self, key: bytes, record_checksum: int) -> None:
        self.total = (self.total + self._term(key, record_checksum)) % _MOD
        self.count += 1

    def remove(self, key: bytes, record_checksum: int) -> None:
        self.total = (self.total - self._term(key, record_checksum)) % _MOD
        self.count -= 1

    def merge(self, other: ContentDigest) -> ContentDigest:
        return ContentDigest((self.total + other.total) % _MOD, self.count + other.count)

    @property
    def hex(self) -> str:
        return f"{self.total:032x}"

    @classmethod
    def from_hex(cls, text: str, count: int) -> ContentDigest:
        return cls(int(text, 16), count)

    def fingerprint(self, extractor_fingerprint: str) -> str:
        """The store fingerprint: the extractor's configuration and every record's content."""
        return fingerprint({"extractor": extractor_fingerprint, "content": self.hex,
                            "records": self.count})


def file_signature(path: Path) -> bytes:
    """(size, xxh3-64 of the bytes) of a file, packed in 16 bytes."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return SOURCE.pack(size, h.intdigest())
