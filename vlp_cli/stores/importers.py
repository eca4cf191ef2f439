"""Bringing the region features Oscar, VinVL and UNITER users already hold into a feature store.

Formats (each reader lives in its own module; the layouts are documented there; what they
share is in `import_common`):

    oscar        Oscar's `features.tsv` (+ `imageid2idx.json`, tags from `predictions.tsv`)
    vinvl        VinVL's detector output `predictions.tsv` with a base64 feature per object
    uniter-npz   a folder of per-image `.npz` files, as UNITER's image LMDB is built from
    uniter-lmdb  UNITER's image LMDB (`scripts/convert_imgdir.py`: msgpack or compressed npz)

and back: `oscar-tsv` writes a store in Oscar's layout (`formats_oscar.export_oscar_tsv`).

Reading never executes anything from the input: TSV rows are JSON and base64 of raw float32,
arrays are rebuilt from raw bytes with an allow-list of numeric dtypes, and anything that would
need pickle (object arrays) is refused. A malformed input stops the import with a `VlpError`
naming the file and line (or LMDB key, or npz file); the store is written under a temporary
name and renamed only once complete, so a failed import leaves nothing under `--out`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlp_cli import VlpError
from vlp_cli.stores.features import FeatureStore, FeatureStoreWriter
from vlp_cli.stores.import_common import Source, Vocab, tsv_rows

logger = logging.getLogger(__name__)

IMPORT_FORMATS = ("oscar", "vinvl", "uniter-npz", "uniter-lmdb")
EXPORT_FORMATS = ("oscar-tsv",)


def read_label_names(path: Path) -> list[str]:
    """Class names, one per line (e.g. Visual Genome's `objects_vocab.txt`).

    Such vocabularies list synonyms on one line separated by commas: the first is the name.
    """
    path = Path(path)
    if not path.is_file():
        raise VlpError(f"labels file {path} not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for n, line in enumerate(lines, 1):
        name = line.split(",")[0].strip()
        if not name:
            raise VlpError(f"{path} line {n}: empty class name (one name per line; line n is "
                           "class n-1)")
        names.append(name)
    return names


def read_hw(path: Path) -> dict[str, tuple[int, int]]:
    """Image sizes from a VinVL/TSV-dataset `hw.tsv`: key -> (height, width).

    Rows are `key \\t [{"height": h, "width": w}]`, `key \\t {"height", "width"}` or
    `key \\t "h w"` (scene_graph_benchmark, maskrcnn_benchmark/data/datasets/tsv_dataset.py).
    """
    out: dict[str, tuple[int, int]] = {}
    for _, where, cols in tsv_rows(path):
        if len(cols) < 2:
            raise VlpError(f"{where}: expected `image_key <TAB> size`")
        val: Any
        try:
            val = json.loads(cols[1])
        except json.JSONDecodeError:
            val = cols[1].split(" ")
        if isinstance(val, list) and val and isinstance(val[0], dict):
            val = val[0]
        try:
            h, w = (val["height"], val["width"]) if isinstance(val, dict) else val
            h, w = int(h), int(w)
        except (KeyError, TypeError, ValueError):
            raise VlpError(f"{where}: expected {{\"height\": h, \"width\": w}} or "
                           "\"h w\"") from None
        if h <= 0 or w <= 0:
            raise VlpError(f"{where}: image size must be positive, got {h}x{w}")
        out[cols[0]] = (h, w)
    return out


def open_source(fmt: str, src: Path, labels: Path | None = None, tags: Path | None = None,
                hw: Path | None = None, feature_dim: int | None = None) -> Source:
    """Open `src` in format `fmt` for reading (nothing is read beyond indexes yet)."""
    src = Path(src)
    if not src.exists():
        raise VlpError(f"{src} does not exist")
    vocab = (Vocab(read_label_names(labels), str(labels)) if labels is not None else Vocab())
    sizes = read_hw(hw) if hw is not None else None
    if fmt in ("oscar", "vinvl"):
        from vlp_cli.stores import formats_oscar

        opener = formats_oscar.open_oscar if fmt == "oscar" else formats_oscar.open_vinvl
        source = opener(src, vocab, tags=tags, sizes=sizes, feature_dim=feature_dim)
    elif fmt in ("uniter-npz", "uniter-lmdb"):
        from vlp_cli.stores import formats_uniter

        if tags is not None:
            raise VlpError("--tags is for Oscar's TSVs; UNITER's tags come from its soft_labels")
        opener = (formats_uniter.open_npz_dir if fmt == "uniter-npz"
                  else formats_uniter.open_lmdb)
        source = opener(src, vocab, sizes=sizes, feature_dim=feature_dim)
    else:
        raise VlpError(f"unknown format {fmt!r}: choose one of {', '.join(IMPORT_FORMATS)}")
    if hw is not None:
        source.files["hw"] = str(Path(hw).resolve())
    if labels is not None:
        source.files["labels"] = str(Path(labels).resolve())
    return source


def write_store(source: Source, out: Path, advance: Callable[[int], None] | None = None,
                commit_every: int = 256) -> dict:
    """Write every record of `source` into a new feature store at `out`, atomically."""
    out = Path(out)
    if out.exists():
        raise VlpError(f"{out} exists: choose a new --out (an import never overwrites)")
    tmp = out.with_name(f".{out.name}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    writer: FeatureStoreWriter | None = None
    known = unknown = 0
    try:
        records = iter(source.records)
        first = next(records, None)
        if first is None:
            raise VlpError(f"{source.path}: no images found")
        dim = int(first.regions.features.shape[1])
        extractor = {"name": f"import/{source.fmt}", "format": source.fmt,
                     "source": str(source.path.resolve()), "files": source.files,
                     # vlp's extractor cannot recompute these features from raw images.
                     "reproducible": False}
        meta = {"extractor": extractor, "feature_dim": dim, "labels": source.vocab.names,
                "source": str(source.path)}
        writer = FeatureStoreWriter(tmp, meta, commit_every=commit_every)
        for rec in itertools.chain([first], records):
            d = int(rec.regions.features.shape[1])
            if d != dim:
                raise VlpError(f"{rec.where}: {d}-d features, but the first image's are {dim}-d")
            if rec.key in writer:
                raise VlpError(f"{rec.where}: image id {rec.key!r} appears a second time")
            writer.put(rec.key, rec.regions)
            known, unknown = known + rec.size_known, unknown + (not rec.size_known)
            if advance is not None:
                advance(1)
        # Position features are computed at read time from boxes / image size; with the size
        # unknown (UNITER) width = height = 1 and boxes stay normalised: the same numbers.
        unit = "pixels" if not unknown else "normalised" if not known else "mixed"
        final = writer.close(labels=source.vocab.names, boxes_unit=unit,
                             import_stats={"images_with_size": known,
                                           "images_without_size": unknown, **source.stats},
                             import_notes=source.notes)
        writer = None
        tmp.rename(out)
    except BaseException as exc:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # the store is being discarded anyway
                logger.debug("closing the partial store failed", exc_info=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, VlpError):
            raise VlpError(f"{exc}; nothing was written to {out}") from None
        raise
    return final


def export_store(store: FeatureStore, fmt: str, out: Path,
                 advance: Callable[[int], None] | None = None) -> dict:
    """Write `store` into a new directory `out` in format `fmt`; returns what was written."""
    if fmt not in EXPORT_FORMATS:
        raise VlpError(f"unknown export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    from vlp_cli.stores import formats_oscar

    return formats_oscar.export_oscar_tsv(store, Path(out), advance)
