"""What the feature importers share: the record and source types, TSV and base64 reading,
and the checks every format applies before a record is stored.

The format modules (`formats_oscar`, `formats_uniter`) build on this module and never on
`importers`, which picks a format and writes the store: that keeps the imports one way.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.stores.features import Regions

F16_MAX = 65504.0  # the largest finite float16: features beyond it would be stored as inf


@dataclass
class Record:
    """One image read from a source: its key, its regions, and where it came from."""

    key: str
    regions: Regions
    where: str  # "file line N", "lmdb key 'x'" ...: for error messages
    size_known: bool  # False: width = height = 1 and boxes are in normalised units


class Vocab:
    """Tag names to class ids: fixed by a `--labels` file, or grown as names first appear."""

    def __init__(self, names: list[str] | None = None, source: str | None = None) -> None:
        self.fixed = names is not None
        self.names: list[str] = list(names or [])
        self.index = {n: i for i, n in enumerate(self.names)}
        self.source = source

    def id(self, name: str, where: str) -> int:
        """The class id of `name`; an unknown name is an error only with a labels file."""
        i = self.index.get(name)
        if i is None:
            if self.fixed:
                raise VlpError(f"{where}: tag {name!r} is not in the labels file {self.source}")
            i = len(self.names)
            self.names.append(name)
            self.index[name] = i
        return i


@dataclass
class Source:
    """An opened input: a stream of records plus what the store's metadata records about it."""

    fmt: str
    path: Path
    records: Iterator[Record]
    vocab: Vocab
    files: dict[str, str]  # role -> file read (features, tags, hw ...), for provenance
    total: int | None = None  # number of images when cheaply known (progress bar)
    stats: dict[str, int] = field(default_factory=dict)  # counters filled while reading
    notes: dict[str, Any] = field(default_factory=dict)  # conventions applied, for the meta


def tsv_rows(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, where, columns) per non-blank line, streamed.

    Columns are stripped as Oscar's TSVFile.seek does (oscar/utils/tsv_file.py); a row's index
    in Oscar (`imageid2idx.json`, `.lineidx`) is its line number - 1, blank lines included.
    """
    with Path(path).open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise VlpError(f"{where}: not UTF-8 text") from None
            if line.strip():
                yield n, where, [c.strip() for c in line.split("\t")]


class TsvIndex:
    """Random access to a TSV by its first column without loading it: key -> byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        with self.path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                key = raw.split(b"\t", 1)[0].strip()
                if key:
                    self.offsets.setdefault(key.decode("utf-8", "replace"), (pos, n))
                pos += len(raw)
        self._f = self.path.open("rb")

    def get(self, key: str) -> tuple[list[str], str] | None:
        """(columns, where) of the row for `key`, or None."""
        hit = self.offsets.get(key)
        if hit is None:
            return None
        self._f.seek(hit[0])
        where = f"{self.path} line {hit[1]}"
        try:
            line = self._f.readline().decode("utf-8")
        except UnicodeDecodeError:
            raise VlpError(f"{where}: not UTF-8 text") from None
        return [c.strip() for c in line.split("\t")], where

    def close(self) -> None:
        self._f.close()


def parse_json(text: str, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise VlpError(f"{where}: {what} is not valid JSON "
                       f"({getattr(exc, 'msg', 'nested too deeply')})") from None


def b64_floats(text: Any, where: str, what: str) -> np.ndarray:
    """Decode base64 of raw little-endian float32 bytes (how Oscar and VinVL store arrays)."""
    if not isinstance(text, str):
        raise VlpError(f"{where}: {what} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VlpError(f"{where}: {what} is not valid base64 ({exc}); the row may be "
                       "truncated") from None
    if len(raw) % 4:
        raise VlpError(f"{where}: {what} holds {len(raw)} bytes, not whole float32 numbers; "
                       "the row may be truncated")
    return np.frombuffer(raw, dtype="<f4")


def to_f16(features: np.ndarray, where: str) -> np.ndarray:
    """float32 -> float16, refusing what float16 cannot hold (it would turn into inf)."""
    f = np.asarray(features, dtype=np.float32)
    if f.size and not (np.isfinite(f).all() and float(np.abs(f).max()) <= F16_MAX):
        raise VlpError(f"{where}: features hold non-finite values or values beyond float16's "
                       f"range (|x| > {F16_MAX:g}); they cannot be stored")
    return f.astype(np.float16)


def check_boxes(boxes: np.ndarray, where: str) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float32)
    if b.size and not np.isfinite(b).all():
        raise VlpError(f"{where}: boxes hold non-finite numbers")
    return b
