"""UNITER's image features: a folder of per-image `.npz` files, or the image LMDB built from it.

What UNITER holds (ChenRocks/UNITER):
    arrays      `features` [K, 2048], `norm_bb` [K, 6] (x1, y1, x2, y2, w, h, all divided by
                the image size; UNITER appends w*h itself, data/data.py _get_img_feat), `conf`
                [K], `soft_labels` [K, 1601]: BUTD's class distribution over the 1600 Visual
                Genome classes with background at column 0 (utils/const.py IMG_LABEL_DIM;
                model/pretrain.py takes `label_targets[:, 1:]` + 1 as the MRC class).
    LMDB        scripts/convert_imgdir.py: key = the npz file's name (with `.npz`, as the text
                DB's `img_fname` names it), value = `msgpack.dumps(dict of arrays)` through
                msgpack_numpy, or `np.savez_compressed` bytes for `*_compressed` DBs; float32
                arrays are stored as float16; a `__keys__` entry lists the keys (JSON).
    msgpack_numpy encodes an array as {b'nd': True, b'type': dtype.str, b'kind': b'' (b'O'
                for object arrays, whose data is a pickle), b'shape': [...], b'data': bytes}.

There is no image size: width = height = 1 and boxes stay normalised (position features come
out the same), unless `--hw` gives sizes. Class ids are the argmax over the classes without
background (as UNITER's MRC target); `class_probs` are `soft_labels` without the background
column, renormalised to sum to 1, so that column c is label c of the store's vocabulary (UNITER's
own MRC-kl target keeps the background column: its mass is dropped here).
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import numpy as np

from vlp_cli import VlpError
from vlp_cli.stores.features import Regions
from vlp_cli.stores.import_common import Record, Source, Vocab, check_boxes, to_f16

logger = logging.getLogger(__name__)

LABEL_DIM = 1601  # UNITER's utils/const.py IMG_LABEL_DIM: 1600 VG classes + background
NUMERIC_KINDS = "fiub"  # float, signed, unsigned, bool: rebuilt from raw bytes, nothing else
KEYS_ENTRY = b"__keys__"


class Refused(Exception):
    """An array that vlp will not decode (its message says why)."""


def _get(d: dict, name: str) -> Any:
    return d.get(name.encode(), d.get(name))  # msgpack_numpy's keys are bytes; accept str too


def _ndarray(obj: dict) -> Any:
    """msgpack object hook: rebuild msgpack_numpy arrays from raw bytes, refusing pickles."""
    nd = _get(obj, "nd")
    if nd is None:
        return obj
    kind, type_ = _get(obj, "kind") or b"", _get(obj, "type")
    if kind in (b"O", "O"):
        raise Refused("a pickled object array (msgpack_numpy kind 'O'); vlp never unpickles")
    if kind in (b"V", "V") or not isinstance(type_, (str, bytes)):
        raise Refused("a structured array; only numeric arrays are read")
    try:
        dtype = np.dtype(type_.decode("ascii") if isinstance(type_, bytes) else type_)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise Refused(f"an unknown dtype {type_!r}") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
        raise Refused(f"dtype {dtype.str!r} (kind {dtype.kind!r}); only numeric arrays are read")
    data = _get(obj, "data")
    if not isinstance(data, bytes):
        raise Refused("array data that is not bytes")
    if nd is not True:  # a numpy scalar
        if len(data) != dtype.itemsize:
            raise Refused("a scalar of the wrong size")
        return np.frombuffer(data, dtype)[0]
    shape = _get(obj, "shape")
    if not isinstance(shape, (list, tuple)) or not all(type(s) is int and s >= 0 for s in shape):
        raise Refused(f"a bad shape {shape!r}")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise Refused(f"shape {tuple(shape)} x {dtype.itemsize} bytes != {len(data)} data bytes")
    return np.frombuffer(data, dtype).reshape(shape).copy()


def decode_msgpack(buf: bytes, where: str) -> dict[str, np.ndarray]:
    """One convert_imgdir.py msgpack value: {name: array}."""
    try:
        obj = msgpack.unpackb(buf, raw=False, object_hook=_ndarray)
    except Refused as exc:
        raise VlpError(f"{where}: refused {exc}") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise VlpError(f"{where}: not a msgpack value UNITER wrote "
                       f"({exc or type(exc).__name__})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray | np.generic)
                                            for v in obj.values()):
        raise VlpError(f"{where}: expected a map of array names to arrays")
    return {(k.decode() if isinstance(k, bytes) else str(k)): np.asarray(v)
            for k, v in obj.items()}


def decode_npz(data: bytes | Path, where: str) -> dict[str, np.ndarray]:
    """An npz (file or bytes) with allow_pickle=False: object arrays are refused, not loaded."""
    try:
        z = np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise VlpError(f"{where}: a single .npy array, not an npz of named arrays")
        with z:
            out = {}
            for name in z.files:
                try:
                    out[name] = z[name]
                except ValueError as exc:
                    if "pickle" not in str(exc):
                        raise
                    raise VlpError(f"{where}: refused array {name!r}: an object array, which "
                                   "needs pickle to load; vlp never unpickles") from None
            return out
    except VlpError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        if "pickle" in str(exc):  # numpy's own message suggests loading it unsafely: no
            raise VlpError(f"{where}: refused: pickled data, not an npz; vlp never "
                           "unpickles") from None
        raise VlpError(f"{where}: not a readable npz ({exc or type(exc).__name__})") from None


def _array(arrays: dict, name: str, ndim: int, where: str) -> np.ndarray:
    a = arrays.get(name)
    if a is None:
        raise VlpError(f"{where}: no {name!r} array (has {', '.join(sorted(arrays)) or 'none'})")
    if a.ndim != ndim or a.dtype.kind not in "fiu":
        raise VlpError(f"{where}: {name!r} must be a {ndim}-d numeric array, got {a.dtype} "
                       f"{a.shape}")
    return a


def to_record(key: str, arrays: dict[str, np.ndarray], where: str, vocab: Vocab,
              size: tuple[int, int] | None, feature_dim: int | None) -> Record:
    """UNITER's arrays of one image as vlp regions."""
    feats = _array(arrays, "features", 2, where)
    k = feats.shape[0]
    if feature_dim is not None and feats.shape[1] != feature_dim:
        raise VlpError(f"{where}: {feats.shape[1]}-d features, --feature-dim says {feature_dim}")
    bb = _array(arrays, "norm_bb", 2, where)
    if bb.shape[0] != k or bb.shape[1] < 4:
        raise VlpError(f"{where}: norm_bb is {bb.shape}, expected [{k}, 6]")
    conf = _array(arrays, "conf", 1, where) if "conf" in arrays else np.ones(k, np.float32)
    if conf.shape != (k,):
        raise VlpError(f"{where}: conf has {conf.shape[0]} entries for {k} boxes")
    if size is None and "image_h" in arrays and "image_w" in arrays:  # some npz writers add it
        hw = [np.ravel(arrays[n]) for n in ("image_h", "image_w")]
        if any(a.size != 1 or a.dtype.kind not in "fiu" or not a[0] > 0 for a in hw):
            raise VlpError(f"{where}: image_h and image_w must be single positive numbers")
        size = (int(hw[0][0]), int(hw[1][0]))
    h, w = size or (1, 1)
    boxes = bb[:, :4].astype(np.float32) * np.array([w, h, w, h], np.float32)
    cls, probs = np.full(k, -1, np.int32), None
    if "soft_labels" in arrays:
        soft = _array(arrays, "soft_labels", 2, where).astype(np.float32)
        if soft.shape[0] != k:
            raise VlpError(f"{where}: soft_labels has {soft.shape[0]} rows for {k} boxes")
        if not vocab.names and not vocab.fixed:  # numeric names, background column excluded
            if soft.shape[1] != LABEL_DIM:
                logger.warning("%s: soft_labels have %d columns, not UNITER's %d; column 0 is "
                               "taken as background (pass --labels to say otherwise)", where,
                               soft.shape[1], LABEL_DIM)
            for i in range(soft.shape[1] - 1):
                vocab.id(str(i), where)
        c = len(vocab.names)
        if soft.shape[1] not in (c, c + 1):
            raise VlpError(f"{where}: soft_labels have {soft.shape[1]} columns for {c} tag names "
                           f"(expected {c} + 1 with background at column 0, or {c})")
        p = soft[:, soft.shape[1] - c:]  # drop the background column when there is one
        if not np.isfinite(p).all() or (p < 0).any():
            raise VlpError(f"{where}: soft_labels must be finite and non-negative")
        total = p.sum(axis=1, keepdims=True)
        probs = np.where(total > 0, p / np.maximum(total, 1e-12), 0).astype(np.float16)
        cls = np.where(total[:, 0] > 0, p.argmax(axis=1), -1).astype(np.int32) if c else cls
    regions = Regions(to_f16(feats, where), check_boxes(boxes, where), cls,
                      conf.astype(np.float32), w, h, class_probs=probs)
    return Record(key, regions, where, size is not None)


def _size_for(key: str, sizes: dict[str, tuple[int, int]] | None) -> tuple[int, int] | None:
    if not sizes:
        return None
    return sizes.get(key) or sizes.get(key.removesuffix(".npz"))


def open_npz_dir(src: Path, vocab: Vocab, sizes: dict[str, tuple[int, int]] | None = None,
                 feature_dim: int | None = None) -> Source:
    """A folder of `<name>.npz` (not recursive, as convert_imgdir.py's glob); key = file name."""
    if not src.is_dir():
        raise VlpError(f"{src} is not a folder of .npz files")
    files = sorted(src.glob("*.npz"))

    def records() -> Iterator[Record]:
        for f in files:
            yield to_record(f.name, decode_npz(f, str(f)), str(f), vocab,
                            _size_for(f.name, sizes), feature_dim)

    return Source("uniter-npz", src, records(), vocab, {"npz_dir": str(src.resolve())},
                  total=len(files), notes=_notes())


def _lmdb_dir(src: Path) -> Path:
    """The LMDB itself, or the one LMDB inside an img_db split folder."""
    if (src / "data.mdb").is_file():
        return src
    found = sorted(p for p in src.iterdir() if (p / "data.mdb").is_file()) if src.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise VlpError(f"{src} is not an LMDB (no data.mdb)" + (
        f"; it holds several, pass one of: {', '.join(p.name for p in found)}" if found else ""))


def open_lmdb(src: Path, vocab: Vocab, sizes: dict[str, tuple[int, int]] | None = None,
              feature_dim: int | None = None) -> Source:
    """UNITER's image LMDB (msgpack or compressed-npz values, detected per value)."""
    path = _lmdb_dir(src)

    def opened() -> lmdb.Environment:
        try:
            return lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
        except lmdb.Error as exc:
            raise VlpError(f"{path}: cannot open the LMDB ({exc})") from None

    env = opened()  # only to count; reopened when read, so an unread source holds nothing open
    with env.begin() as txn:
        total = env.stat()["entries"] - (txn.get(KEYS_ENTRY) is not None)
    env.close()

    def records() -> Iterator[Record]:
        env = opened()
        try:
            with env.begin(buffers=False) as txn:
                for raw_key, value in txn.cursor():
                    if raw_key == KEYS_ENTRY:
                        continue
                    try:
                        key = raw_key.decode("utf-8")
                    except UnicodeDecodeError:
                        raise VlpError(f"{path}: key {raw_key[:60]!r} is not UTF-8") from None
                    where = f"{path} key {key!r}"
                    # savez_compressed bytes are a zip archive; everything else is msgpack.
                    arrays = (decode_npz(value, where) if value[:4] == b"PK\x03\x04"
                              else decode_msgpack(value, where))
                    yield to_record(key, arrays, where, vocab, _size_for(key, sizes),
                                    feature_dim)
        finally:
            env.close()

    return Source("uniter-lmdb", src, records(), vocab, {"lmdb": str(path.resolve())},
                  total=total, notes=_notes())


def _notes() -> dict[str, str]:
    return {"class_ids": "argmax of soft_labels over the classes (background column excluded)",
            "class_probs": "soft_labels without the background column, renormalised to sum 1"}
