"""UNITER-style image features in LMDB: a benchmark baseline, not a vlp store format.

`vlp bench store-read` compares vlp's feature store with the way UNITER (ChenRocks/UNITER)
keeps region features: scripts/convert_imgdir.py writes one LMDB value per image,
`msgpack.dumps(dict of arrays, use_bin_type=True)` with msgpack_numpy's array encoding
({b'nd': True, b'type': dtype.str, b'kind': b'', b'shape': [...], b'data': bytes}) and every
float32 array stored as float16; data/data.py `DetectFeatLmdb` keeps one read transaction
open, unpacks a value with msgpack (msgpack_numpy rebuilds each array over its bytes, without
a further copy) and slices the first `nbb` boxes.

This module writes such an LMDB and reads it the same way, with vlp's read-time box selection
(`select_count`) in place of UNITER's precomputed `name2nbb` table, so that both arms return
the same regions. msgpack_numpy itself is not a dependency: its encoding is reproduced here
for numeric arrays only (it would pickle object arrays; this module never unpickles). To
import real UNITER LMDBs into a vlp store, see `vlp_cli.stores.formats_uniter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb
import msgpack
import numpy as np

from vlp_cli.stores.features import select_count

# The arrays of one UNITER image record, in convert_imgdir.py's naming.
FIELDS = ("features", "norm_bb", "conf", "soft_labels")


def encode_array(a: np.ndarray) -> dict[bytes, Any]:
    """One numeric array in msgpack_numpy's encoding (C order, dtype string, raw bytes)."""
    a = np.ascontiguousarray(a)
    if a.dtype.kind not in "fiub":
        raise ValueError(f"only numeric arrays are encoded, got dtype {a.dtype}")
    return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape),
            b"data": a.tobytes()}


def _decode_hook(obj: dict) -> Any:
    """msgpack object hook, as msgpack_numpy's `decode`: an array over the unpacked bytes."""
    if obj.get(b"nd") is True:
        return np.frombuffer(obj[b"data"], np.dtype(obj[b"type"])).reshape(obj[b"shape"])
    return obj


def pack_record(arrays: dict[str, np.ndarray]) -> bytes:
    """One LMDB value as convert_imgdir.py writes it: float32 arrays become float16."""
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        out[name] = encode_array(a.astype(np.float16) if a.dtype == np.float32 else a)
    return msgpack.packb(out, use_bin_type=True)


def unpack_record(buf: bytes | memoryview) -> dict[str, np.ndarray]:
    """Every array of one value (read-only views over the bytes msgpack unpacked)."""
    return msgpack.unpackb(buf, raw=False, object_hook=_decode_hook)


class UniterStyleWriter:
    """Writes an UNITER-style LMDB: key = image name (UTF-8), value = `pack_record(arrays)`."""

    def __init__(self, path: str | Path, commit_every: int = 1000) -> None:
        """Create (or open) the LMDB directory `path`.

        Args:
            path: the LMDB directory.
            commit_every: records per write transaction.
        """
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # convert_imgdir.py maps 1 TiB of address space; 64 GiB is plenty for a benchmark.
        self._env = lmdb.open(str(self.path), map_size=1 << 36, readahead=False, meminit=False)
        self._commit_every = commit_every
        self._pending: list[tuple[bytes, bytes]] = []

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Queue one image's arrays (committed every `commit_every` records)."""
        self._pending.append((key.encode("utf-8"), pack_record(arrays)))
        if len(self._pending) >= self._commit_every:
            self.commit()

    def commit(self) -> None:
        """Write what is queued in one transaction."""
        with self._env.begin(write=True) as txn:
            for k, v in self._pending:
                txn.put(k, v)
        self._pending.clear()

    def close(self) -> None:
        """Commit, sync and close."""
        self.commit()
        self._env.sync()
        self._env.close()


class UniterStyleReader:
    """Reads an UNITER-style LMDB as `DetectFeatLmdb` does, with vlp's read-time selection.

    One read-only transaction with `buffers=True` stays open for the reader's life, as in
    UNITER; each read unpacks the whole value, counts the boxes the policy keeps from `conf`,
    and copies that many rows of every array.
    """

    def __init__(self, path: str | Path, conf_th: float, min_boxes: int,
                 max_boxes: int) -> None:
        """Open the LMDB directory `path` read-only, with the box-selection policy."""
        self._env = lmdb.open(str(path), readonly=True, lock=False, readahead=False,
                              create=False)
        self._txn = self._env.begin(buffers=True)
        self.conf_th, self.min_boxes, self.max_boxes = conf_th, min_boxes, max_boxes

    def get(self, key: str, copy: bool = True) -> dict[str, np.ndarray]:
        """The selected rows of every array of one image.

        msgpack already copied the values out of the map; `copy=True` copies the selected
        rows again, so that both stores' `get_selected` hand back compact arrays of their own
        (`copy=False` is what UNITER's loader does: slices of the unpacked arrays).

        Raises:
            KeyError: no such key.
        """
        buf = self._txn.get(key.encode("utf-8"))
        if buf is None:
            raise KeyError(key)
        arrays = unpack_record(buf)
        # Compared in float32, as vlp compares its float32 confidences: an fp16 comparison
        # would round the threshold itself (0.2 -> 0.2000122).
        conf = arrays["conf"].astype(np.float32)
        n = select_count(conf, self.conf_th, self.min_boxes, self.max_boxes)
        return {name: a[:n].copy() if copy else a[:n] for name, a in arrays.items()}

    def read_like_uniter(self, key: str) -> tuple[Any, Any]:
        """One image's (features, 7-d positions) as float32 tensors, the way UNITER's
        data/data.py does it: `DetectFeatLmdb.__getitem__` (msgpack unpack, `torch.tensor(a[:nbb])
        .float()` of features and norm_bb) then `_get_img_feat` (area appended by `torch.cat`).
        The count comes from `select_count` where UNITER looks it up in its name2nbb table.
        """
        import torch

        buf = self._txn.get(key.encode("utf-8"))
        if buf is None:
            raise KeyError(key)
        dump = unpack_record(buf)
        nbb = select_count(dump["conf"].astype(np.float32), self.conf_th, self.min_boxes,
                           self.max_boxes)
        img_feat = torch.tensor(dump["features"][:nbb, :]).float()
        bb = torch.tensor(dump["norm_bb"][:nbb, :]).float()
        return img_feat, torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], dim=-1)

    def close(self) -> None:
        """End the transaction and close the environment."""
        self._txn.abort()
        self._env.close()
