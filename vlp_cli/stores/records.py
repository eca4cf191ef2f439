"""One feature-store record: the regions of one image in a 40-byte header + aligned arrays.

    header  <4sHHIIIIIIQ  magic b"VLPR", record version (2), flags, K, D, C, width, height,
                          probs checksum, checksum
    feats   float16 [K, D]   region features, boxes sorted by confidence (descending)
    boxes   float32 [K, 4]   x1, y1, x2, y2 in pixels of the original image
    cls     int32   [K]      class id into the store's label vocabulary, -1 for none
    conf    float32 [K]      detector confidence (1.0 for given boxes)
    pos     float32 [K, 7]   boxes normalised by image size: x1, y1, x2, y2, w, h, w*h
    image   float16 [D]      whole-image feature (flag 2), outside the box budget, no tag
    probs   float16 [K, C]   class distribution (flag 1), for UNITER's MRC-kl

Every array starts on an 8-byte boundary and is read in place with `np.ndarray(buffer=...)`.
The checksum is xxh3-64 of everything after the header up to `probs`, seeded with xxh3-64 of
the header's first 32 bytes: one pass over the bytes where they lie, and a flipped bit
anywhere (header fields included) fails the read. `probs`, the largest part of a BUTD record
(45% at 50 x 2048 with 1601 classes) and read by one objective only, has its own checksum
(the low 32 bits of its xxh3-64) in the header, so it is verified when, and only when, it is
read; the main checksum covers that field too. The positions are computed once, here, not on
every read (they cost a read as much as the checksum does).

Records written by vlp 0.2.0 lack flag 4 (`FLAG_POS`): no `pos`, `probs` before `image`, one
checksum over everything after the header. Version-1 records (vlp 0.1 stores) have a 32-byte
header and no checksum. Both are still read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from vlp_cli.stores.integrity import DamagedRecord

MAGIC = b"VLPR"
RECORD_VERSION = 2
HEADER = struct.Struct("<4sHHIIIIIIQ")  # version 2: 40 bytes, the checksum last
HEADER_V1 = struct.Struct("<4sHHIIIIII")  # version 1: 32 bytes, no checksum
_SEEDED = HEADER_V1.size  # the header bytes that seed the checksum (all but the checksum)
FLAG_PROBS = 1
FLAG_IMAGE = 2
FLAG_POS = 4  # the layout above (positions stored, probs last under their own checksum)
POS_DIM = 7
_UNPACK = HEADER.unpack_from
_XXH3 = xxhash.xxh3_64_intdigest


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
    positions: np.ndarray | None = None  # [K, 7] float32, as `position_features` (read only)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def take(self, n: int) -> Regions:
        """The first n regions (the n most confident)."""
        return Regions(
            self.features[:n], self.boxes[:n], self.class_ids[:n], self.confidences[:n],
            self.width, self.height,
            None if self.class_probs is None else self.class_probs[:n], self.image_feature,
            None if self.positions is None else self.positions[:n],
        )


def record_checksum(buf: bytes | bytearray | memoryview) -> int:
    """The (main) checksum a version-2 record should carry (computed over its bytes in place)."""
    mv = memoryview(buf)  # slicing a view copies nothing; slicing bytes would
    end = len(mv)
    if len(mv) >= HEADER.size:
        _, _, flags, k, d, c, *_ = HEADER.unpack_from(mv)
        if flags & FLAG_POS:
            end = _layout(k, d, c, flags, HEADER.size)[4]
    return _XXH3(mv[HEADER.size:end], _XXH3(mv[:_SEEDED]))


def probs_checksum(mv: memoryview) -> int:
    """The 32-bit checksum of a record's class distribution (the bytes from `probs` on)."""
    return _XXH3(mv) & 0xFFFFFFFF


def stored_checksum(buf: bytes | memoryview) -> int:
    """The checksum a version-2 record carries in its header (not recomputed)."""
    return struct.unpack_from("<Q", buf, _SEEDED)[0]


def encode_regions(r: Regions) -> bytes:
    """Serialise one record (sorting boxes by confidence first)."""
    order = np.argsort(-np.asarray(r.confidences, dtype=np.float32), kind="stable")
    k = int(len(order))
    feats = np.ascontiguousarray(np.asarray(r.features, dtype=np.float16)[order])
    if feats.ndim != 2 or feats.shape[0] != k:
        raise ValueError(f"features must be [K, D] with K={k}, got {feats.shape}")
    d = int(feats.shape[1])
    flags, c = FLAG_POS, 0
    boxes = np.asarray(r.boxes, dtype=np.float32).reshape(k, 4)[order]
    parts = [
        feats.tobytes(),
        boxes.tobytes(),
        np.asarray(r.class_ids, dtype=np.int32).reshape(k)[order].tobytes(),
        np.asarray(r.confidences, dtype=np.float32).reshape(k)[order].tobytes(),
        position_features(boxes, r.width, r.height).tobytes(),
    ]
    if r.image_feature is not None:
        parts.append(np.asarray(r.image_feature, dtype=np.float16).reshape(d).tobytes())
        flags |= FLAG_IMAGE
    if r.class_probs is not None:
        probs = np.asarray(r.class_probs, dtype=np.float16)
        c = int(probs.shape[1])
        parts.append(probs.reshape(k, c)[order].tobytes())
        flags |= FLAG_PROBS
    out = bytearray(HEADER.pack(MAGIC, RECORD_VERSION, flags, k, d, c, r.width, r.height, 0, 0))
    for p in parts:
        out += p
        out += b"\0" * (_pad8(len(p)) - len(p))
    lay = _layout(k, d, c, flags, HEADER.size)
    if flags & FLAG_PROBS:  # first: the main checksum covers the field it goes into
        struct.pack_into("<I", out, _SEEDED - 4, probs_checksum(memoryview(out)[lay[4]:]))
    struct.pack_into("<Q", out, _SEEDED, record_checksum(out))
    return bytes(out)


# Byte offsets of (feats, boxes, cls, conf, probs, image, end, pos) by (K, D, C, flags,
# header size): a store holds few distinct shapes, and a read then costs one header unpack,
# one checksum and one view per array. `pos` is -1 in 0.2.0 records (none stored).
_LAYOUTS: dict[tuple[int, int, int, int, int], tuple[int, ...]] = {}


def _layout(k: int, d: int, c: int, flags: int, header: int) -> tuple[int, ...]:
    found = _LAYOUTS.get((k, d, c, flags, header))
    if found is None:
        feats = header
        boxes = feats + _pad8(k * d * 2)
        cls = boxes + _pad8(k * 16)
        conf = cls + _pad8(k * 4)
        image_bytes = _pad8(d * 2) if flags & FLAG_IMAGE else 0
        probs_bytes = _pad8(k * c * 2) if flags & FLAG_PROBS else 0
        if flags & FLAG_POS:
            pos = conf + _pad8(k * 4)
            image = pos + _pad8(k * POS_DIM * 4)
            probs = image + image_bytes
            end = probs + probs_bytes
        else:
            pos = -1
            probs = conf + _pad8(k * 4)
            image = probs + probs_bytes
            end = image + image_bytes
        found = (feats, boxes, cls, conf, probs, image, end, pos)
        if len(_LAYOUTS) < 4096:
            _LAYOUTS[(k, d, c, flags, header)] = found
    return found


def _unpack(buf: bytes | memoryview, version: int, probs: bool = True) -> tuple:
    """(flags, K, D, C, width, height, layout) of a record, after checking its integrity
    (of its class distribution too when `probs`)."""
    head = HEADER if version == RECORD_VERSION else HEADER_V1
    if len(buf) < head.size:
        raise DamagedRecord(f"{len(buf)} bytes, shorter than a record header")
    magic, got, flags, k, d, c, width, height, *rest = head.unpack_from(buf, 0)
    if magic != MAGIC:
        raise DamagedRecord("not a vlp feature record (bad magic)")
    if got != version:
        raise DamagedRecord(f"record version {got} in a store of version {version}")
    lay = _layout(k, d, c, flags, head.size)
    if lay[6] != len(buf):  # what a version-1 record has instead of a checksum
        raise DamagedRecord(f"{len(buf)} bytes where its header says {lay[6]}")
    if version == RECORD_VERSION and record_checksum(buf) != rest[1]:
        raise DamagedRecord("checksum mismatch")
    if version == RECORD_VERSION and probs and flags & FLAG_POS and flags & FLAG_PROBS and \
            probs_checksum(memoryview(buf)[lay[4]:]) != rest[0]:
        raise DamagedRecord("checksum mismatch in the class distribution")
    return flags, k, d, c, width, height, lay


def check_record(buf: bytes | memoryview, version: int = RECORD_VERSION) -> str | None:
    """Why a record is damaged, or None when it is whole."""
    try:
        _unpack(buf, version)
    except DamagedRecord as exc:
        return exc.why
    return None


def decode_regions(buf: bytes | memoryview, limit: int | None = None, copy: bool = True,
                   select: tuple[float, int, int] | None = None,
                   version: int = RECORD_VERSION, probs: bool = True) -> Regions:
    """Parse one record, after checking its checksum.

    Args:
        buf: the record's bytes (or a view into the store's memory map).
        limit: keep only the first `limit` regions (the most confident).
        copy: copy the arrays out of `buf`; otherwise they are read-only views over it.
        select: (conf_th, min_boxes, max_boxes): keep what `select_count` keeps.
        version: the record version of the store it comes from (1 has no checksum).
        probs: read (and verify) the class distribution; without it `class_probs` is None.

    Raises:
        DamagedRecord: the checksum does not match or the record does not parse.
    """
    if version == RECORD_VERSION and len(buf) >= HEADER.size:
        # The data loader's hot path, inlined: one header unpack, the checksum over the bytes
        # where they lie (the map), one layout lookup; `_unpack` only to name a failure.
        magic, got, flags, k, d, c, width, height, want_probs, want = _UNPACK(buf)
        lay = _LAYOUTS.get((k, d, c, flags, HEADER.size)) or _layout(k, d, c, flags,
                                                                     HEADER.size)
        mv = memoryview(buf)
        split = flags & FLAG_POS
        if magic != MAGIC or got != RECORD_VERSION or lay[6] != len(buf) or _XXH3(
                mv[HEADER.size:lay[4] if split else None], _XXH3(mv[:_SEEDED])) != want or (
                probs and split and flags & FLAG_PROBS and
                _XXH3(mv[lay[4]:]) & 0xFFFFFFFF != want_probs):
            _unpack(buf, version, probs)  # names the failure
    else:
        flags, k, d, c, width, height, lay = _unpack(buf, version, probs)
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
    cp = np.ndarray((n, c), np.float16, buf, lay[4]) if probs and flags & FLAG_PROBS else None
    image = np.ndarray((d,), np.float16, buf, lay[5]) if flags & FLAG_IMAGE else None
    pos = np.ndarray((n, POS_DIM), np.float32, buf, lay[7]) if flags & FLAG_POS else None
    if copy:  # LMDB buffers die with their transaction
        return Regions(feats.copy(), boxes.copy(), cls.copy(), conf.copy(), width, height,
                       None if cp is None else cp.copy(),
                       None if image is None else image.copy(),
                       None if pos is None else pos.copy())
    return Regions(feats, boxes, cls, conf, width, height, cp, image, pos)


def select_count(confidences: np.ndarray, conf_th: float, min_boxes: int, max_boxes: int) -> int:
    """How many of the (sorted) boxes UNITER's read-time policy keeps."""
    above = int(np.count_nonzero(confidences >= conf_th))
    return int(min(len(confidences), max(min_boxes, min(above, max_boxes))))


_SIZES: dict[tuple[int, int], np.ndarray] = {}


def position_features(boxes: np.ndarray, width: int, height: int,
                      kind: str = "uniter7") -> np.ndarray:
    """Box geometry normalised by image size.

    oscar6:  x1/W, y1/H, x2/W, y2/H, w/W, h/H (Oscar's 6 numbers after the 2048-d feature).
    uniter7: the same plus the normalised area w*h (UNITER's 7-d position).
    """
    if kind not in ("oscar6", "uniter7"):
        raise ValueError(f"unknown position kind {kind!r}")
    b = boxes if isinstance(boxes, np.ndarray) and boxes.dtype == np.float32 and \
        boxes.ndim == 2 else np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = np.empty((len(b), 7 if kind == "uniter7" else 6), np.float32)
    # Written in place, column blocks at once: a read calls this per image (float32 throughout).
    size = _SIZES.get((width, height))
    if size is None:  # a store holds few image sizes: one small array each, made once
        size = np.array([max(width, 1), max(height, 1)] * 2, np.float32)
        if len(_SIZES) < 4096:
            _SIZES[(width, height)] = size
    np.divide(b, size, out=out[:, :4])
    np.subtract(out[:, 2:4], out[:, :2], out=out[:, 4:6])
    if kind == "uniter7":
        np.multiply(out[:, 4], out[:, 5], out=out[:, 6])
    return out
