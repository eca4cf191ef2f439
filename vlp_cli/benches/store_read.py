"""The `store-read` benchmark: random reads/s of vlp's feature store / UNITER's LMDB format.

`bench_store_read` reads the feature store as the training loader does (record checksum,
selection, float32 batch slot) and divides by the same reads of the same records stored
UNITER's way (msgpack of msgpack_numpy arrays in LMDB, `uniter_style.py`), and reports the
same against a numpy memmap of fixed-size arrays (an upper bound: no format at all), plus
what the checksum alone costs per record.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlp_cli.benches.common import combine, interleave, ratio_summary
from vlp_cli.data.datasets import rows_into
from vlp_cli.stores.features import Regions, position_features, select_count


@dataclass(frozen=True)
class ReadScale:
    """The shape of the records of one store-read case."""

    regions: int  # boxes stored per image
    dim: int  # feature dimension
    classes: int  # columns of the class distribution


# (a) the embedded backbone with the embedded COCO detector; (b) BUTD features as in the papers
# (2048-d, 1600 Visual Genome classes + background).
READ_SCALES = {"36x1280": ReadScale(36, 1280, 80), "50x2048": ReadScale(50, 2048, 1601)}
# UNITER's read-time policy (conf_th 0.2, min 10, max 100 boxes).
SELECTION = (0.2, 10, 100)
# Distinct feature matrices drawn; records cycle through them. LMDB does not compress, so
# repeated contents read exactly as fresh ones, and drawing 2048-d features for thousands of
# records would take longer than reading them.
FEATURE_POOL = 16


def synthetic_records(n: int, scale: ReadScale, seed: int = 0,
                      ) -> list[tuple[str, Regions]]:
    """n records of the given scale: boxes sorted by confidence, confidences in [0.05, 1).

    Confidences are exact in float16 so that an UNITER-style copy (float16) selects the same
    boxes as vlp's float32 ones.
    """
    rng = np.random.default_rng(seed)
    k, d, c = scale.regions, scale.dim, scale.classes
    pool = [rng.standard_normal((k, d), dtype=np.float32).astype(np.float16)
            for _ in range(min(FEATURE_POOL, n))]
    probs_pool = [rng.dirichlet(np.ones(c), size=k).astype(np.float16)
                  for _ in range(min(FEATURE_POOL, n))]
    out = []
    for i in range(n):
        w, h = int(rng.integers(300, 800)), int(rng.integers(300, 800))
        xy = rng.uniform(0, 0.6, size=(k, 2))
        wh = rng.uniform(0.05, 0.4, size=(k, 2))
        boxes = (np.concatenate([xy, xy + wh], 1) * [w, h, w, h]).astype(np.float32)
        conf = np.sort(rng.uniform(0.05, 1.0, size=k))[::-1]
        conf = conf.astype(np.float16).astype(np.float32)
        probs = probs_pool[i % len(probs_pool)]
        out.append((f"images/{i:07d}.jpg", Regions(
            features=pool[i % len(pool)], boxes=boxes,
            class_ids=probs.argmax(axis=1).astype(np.int32), confidences=conf,
            width=w, height=h, class_probs=probs)))
    return out


def uniter_arrays(r: Regions) -> dict[str, np.ndarray]:
    """One vlp record as UNITER's arrays: features, norm_bb (x1, y1, x2, y2, w, h), conf,
    soft_labels (the class distribution)."""
    wh = np.array([r.width, r.height, r.width, r.height], np.float32)
    nb = r.boxes / wh
    norm_bb = np.concatenate([nb, nb[:, 2:] - nb[:, :2]], axis=1)
    return {"features": r.features, "norm_bb": norm_bb, "conf": r.confidences,
            "soft_labels": r.class_probs}


class MemmapStore:
    """The same records as fixed-size numpy memmaps: [N, K, ...] per array (an upper bound).

    No header, no parsing: row i of each array is image i. Reading applies the same
    selection and copies the same rows as `FeatureStore.get_selected`.
    """

    NAMES = ("features", "boxes", "class_ids", "confidences", "class_probs")

    def __init__(self, folder: Path, records: list[tuple[str, Regions]]) -> None:
        """Write `records` (all of one shape) into `folder` and map them read-only."""
        folder.mkdir(parents=True, exist_ok=True)
        first = records[0][1]
        self.index = {key: i for i, (key, _) in enumerate(records)}
        self.sizes = np.array([[r.width, r.height] for _, r in records], np.int64)
        self.arrays: dict[str, np.ndarray] = {}
        for name in self.NAMES:
            a0 = getattr(first, name)
            path = folder / f"{name}.npy"
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=a0.dtype,
                                           shape=(len(records), *a0.shape))
            for i, (_, r) in enumerate(records):
                mm[i] = getattr(r, name)
            mm.flush()
            del mm
            # A plain ndarray over the mapping: np.memmap's subclass hooks would add their
            # own cost to every slice, which no store needs to pay.
            self.arrays[name] = np.asarray(np.load(path, mmap_mode="r"))

    def get_selected(self, key: str, conf_th: float, min_boxes: int, max_boxes: int,
                     ) -> Regions:
        """The selected regions of one image (copies)."""
        i = self.index[key]
        a = self.arrays
        n = select_count(a["confidences"][i], conf_th, min_boxes, max_boxes)
        w, h = self.sizes[i]
        return Regions(a["features"][i, :n].copy(), a["boxes"][i, :n].copy(),
                       a["class_ids"][i, :n].copy(), a["confidences"][i, :n].copy(),
                       int(w), int(h), a["class_probs"][i, :n].copy())


def _read_part(tmp: Path, scale: ReadScale, records: int, reads: int, reps: int,
               target: float, seed: int) -> dict:
    """The store-read ratios at one record scale."""
    from vlp_cli.stores.features import FeatureStore, FeatureStoreWriter
    from vlp_cli.stores.lmdb_env import LazyReader
    from vlp_cli.stores.records import record_checksum
    from vlp_cli.benches.uniter_style import UniterStyleReader, UniterStyleWriter

    recs = synthetic_records(records, scale, seed)
    meta = {"extractor": {"name": "bench"}, "feature_dim": scale.dim,
            "labels": [str(i) for i in range(scale.classes)]}
    writer = FeatureStoreWriter(tmp / "vlp", meta, commit_every=500)
    uniter = UniterStyleWriter(tmp / "uniter", commit_every=500)
    for key, r in recs:
        writer.put(key, r)
        uniter.put(key, uniter_arrays(r))
    writer.close()
    uniter.close()
    mm = MemmapStore(tmp / "memmap", recs)
    store_bytes = {name: sum(f.stat().st_size for f in (tmp / name).iterdir())
                   for name in ("vlp", "uniter", "memmap")}
    del recs  # the stores hold them now
    keys = [f"images/{i:07d}.jpg" for i in range(records)]
    order = [keys[i] for i in np.random.default_rng(seed + 1).integers(0, records, reads)]

    store = FeatureStore(tmp / "vlp")
    reader = UniterStyleReader(tmp / "uniter", *SELECTION)
    # One batch slot, as the collator fills it: float32 features and 7-d positions.
    slot_feats = torch.zeros(scale.regions, scale.dim)
    slot_pos = torch.zeros(scale.regions, 7)

    def timed(get: Callable[[str], Any]) -> Callable[[], float]:
        def arm() -> float:
            start = time.perf_counter()
            for key in order:
                get(key)
            return len(order) / (time.perf_counter() - start)
        return arm

    def vlp_loader(k: str) -> None:
        # What training does per image: views into the store, selected at read time, then
        # features converted into the batch in one pass and the positions (normalised at
        # extraction) copied. The class distribution is neither read nor verified: only
        # MRC-kl reads it (`vlp_probs` below).
        r = store.get_selected(k, *SELECTION, copy=False, probs=False)
        n = len(r)
        rows_into(slot_feats[:n], r.features)
        rows_into(slot_pos[:n], r.positions)

    def vlp_probs_loader(k: str) -> None:
        # The same read for MRC-kl: the class distribution verified and copied out too.
        r = store.get_selected(k, *SELECTION, copy=False)
        n = len(r)
        rows_into(slot_feats[:n], r.features)
        rows_into(slot_pos[:n], r.positions)
        probs = r.class_probs.copy()
        del probs

    def uniter_loader(k: str) -> None:
        # UNITER's format read the best way: the same consumer after msgpack's unpack (which
        # copies every array of the record, soft labels included, out of the map).
        a = reader.get(k, copy=False)
        n = len(a["conf"])
        rows_into(slot_feats[:n], a["features"])
        rows_into(slot_pos[:n, :6], a["norm_bb"])
        torch.mul(slot_pos[:n, 4], slot_pos[:n, 5], out=slot_pos[:n, 6])

    def uniter_code(k: str) -> None:
        # UNITER's data.py as written, then pad_tensors' copy into the batch.
        feats, pos = reader.read_like_uniter(k)
        slot_feats[: len(feats)] = feats
        slot_pos[: len(pos)] = pos

    # The checksum alone, over the records' bytes where they lie in the map (the same random
    # order, so mostly out of cache, as the read arms meet them).
    views = [LazyReader(tmp / "vlp").view(k.encode()) for k in order]

    def checksums() -> float:
        start = time.perf_counter()
        for v in views:
            record_checksum(v)
        return len(views) / (time.perf_counter() - start)

    def memmap_loader(k: str) -> None:
        i = mm.index[k]
        n = select_count(mm.arrays["confidences"][i], *SELECTION)
        w, h = mm.sizes[i]
        rows_into(slot_feats[:n], mm.arrays["features"][i, :n])
        rows_into(slot_pos[:n], position_features(mm.arrays["boxes"][i, :n], int(w), int(h)))

    rates = interleave({
        "vlp": timed(vlp_loader),
        "vlp_probs": timed(vlp_probs_loader),
        "uniter": timed(uniter_loader),
        "uniter_code": timed(uniter_code),
        "memmap": timed(memmap_loader),
        "vlp_copy": timed(lambda k: store.get_selected(k, *SELECTION)),
        "uniter_copy": timed(reader.get),
        "memmap_copy": timed(lambda k: mm.get_selected(k, *SELECTION)),
        "checksum": checksums,
    }, reps)
    checksum_us = 1e6 / statistics.median(rates.pop("checksum"))
    record_bytes = statistics.mean(len(v) for v in views)
    del views
    reader.close()
    store.close()
    result = ratio_summary(rates, "vlp", "uniter", target)

    def ratio(num: str, den: str) -> dict:
        r = ratio_summary(rates, num, den, 0.0)
        return {"ratio": r["ratio"], "ratios": r["ratios"]}

    result.update(
        over_uniter_code=ratio("vlp", "uniter_code"),
        # Reading the class distribution too (MRC-kl), against the same UNITER arm.
        with_probs_over_uniter=ratio("vlp_probs", "uniter"),
        over_memmap=ratio("vlp", "memmap"),
        memmap_over_uniter=ratio("memmap", "uniter"),
        # Each store's own read returning compact copies of the selected rows (no consumer).
        copy_path={"over_uniter": ratio("vlp_copy", "uniter_copy"),
                   "over_memmap": ratio("vlp_copy", "memmap_copy")},
        per_s={name: round(statistics.median(v), 1) for name, v in rates.items()},
        # Included in every vlp read above; here alone, per record and as a share of a read.
        checksum={"us_per_record": round(checksum_us, 2),
                  "record_kib": round(record_bytes / 1024, 1),
                  "share_of_vlp_read": round(
                      checksum_us * statistics.median(rates["vlp"]) / 1e6, 3)},
        records=records, reads_per_rep=reads, regions=scale.regions, dim=scale.dim,
        classes=scale.classes,
        store_mib={k: round(v / 2**20, 1) for k, v in store_bytes.items()})
    return result


def bench_store_read(reps: int, records: int = 2000, reads: int = 4000, target: float = 1.5,
                     scales: dict[str, ReadScale] | None = None) -> dict:
    """Random reads/s of vlp's feature store / the same records in UNITER's LMDB format.

    A read is what training does per image: look the record up, apply UNITER's read-time
    selection (conf_th 0.2, min 10, max 100 boxes) and put the selected regions into a batch
    slot as float32 features and 7-d positions. vlp reads views into the memory map and
    converts the features into the slot in one pass (`rows_into`, the collator's own code);
    the UNITER arm unpacks the msgpack value (a copy of every array of the record), then
    fills the slot with the same code. vlp's read checks the record's xxh3 checksum (every
    byte it reads is hashed; the class distribution, which training reads only for MRC-kl,
    has its own checksum and is skipped); UNITER's format has none. Each part also reports:

    * `with_probs_over_uniter`: vlp reading (and verifying) the class distribution too;
    * `over_uniter_code`: against UNITER's data.py as written (`torch.tensor(..).float()`, the
      area appended by `torch.cat`, then copied into the batch);
    * `over_memmap` and `memmap_over_uniter`: against the same bytes as fixed-size numpy
      memmaps (no format at all; an upper bound);
    * `copy_path`: each store's own read returning compact copies of the selected rows,
      with no consumer;
    * `checksum`: the main checksum alone (all but the class distribution), in microseconds
      per record and as a share of vlp's read.

    The page cache is warm (the stores were just written): this measures what each format
    costs the CPU, not the disk.

    Args:
        reps: measured repetitions (after one warm-up).
        records: images per store.
        reads: random reads per repetition and arm.
        target: the vlp/UNITER ratio to reach.
        scales: record shapes by name (default: 36 x 1280 and 50 x 2048 fp16 regions).
    """
    parts = {}
    for i, (name, scale) in enumerate((scales or READ_SCALES).items()):
        with tempfile.TemporaryDirectory() as tmp:
            parts[name] = _read_part(Path(tmp), scale, records, reads, reps, target, seed=i)
    result = combine(parts, target)
    result["what"] = ("random reads/s, vlp's record checksum, read-time box selection and "
                      "float32 batch slot included: vlp feature store / UNITER-style msgpack "
                      "LMDB read with the same consumer (parts also give UNITER's code as "
                      "written, a numpy memmap, the copy-only path and the checksum's cost)")
    return result
