"""vlp import-features / export-features: the feature files Oscar, VinVL and UNITER users hold.

The readers and writers live in `vlp_cli.stores` (importers, formats_oscar, formats_uniter);
this stage opens the input, draws the progress bar and reports what happened.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlp_cli.console import progress
from vlp_cli.stores.features import FeatureStore
from vlp_cli.stores.importers import EXPORT_FORMATS, IMPORT_FORMATS, export_store, open_source, \
    write_store

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "IMPORT_FORMATS", "export_features", "import_features"]


def import_features(fmt: str, src: Path, out: Path, labels: Path | None = None,
                    tags: Path | None = None, hw: Path | None = None,
                    feature_dim: int | None = None) -> Path:
    """Import region features in another toolkit's format into a new feature store.

    Args:
        fmt: `oscar`, `vinvl`, `uniter-npz` or `uniter-lmdb`.
        src: Oscar's features.tsv (or its folder), VinVL's predictions.tsv, a folder of UNITER
            npz files, or a UNITER image LMDB (or the img_db folder holding exactly one).
        out: the new store's directory; it must not exist (written aside, then renamed).
        labels: class names, one per line (e.g. Visual Genome's objects_vocab.txt): fixes the
            tag vocabulary (UNITER: names the soft_labels columns; otherwise numeric names).
        tags: Oscar only: the tags file (default: predictions.tsv, label.tsv or
            predictions_gt.tsv beside features.tsv, if one exists).
        hw: image sizes, VinVL's `hw.tsv` layout (`key <TAB> [{"height", "width"}]`); VinVL
            needs it, Oscar and UNITER use it to turn normalised boxes into pixels.
        feature_dim: the expected feature width (default: taken from the first image).

    Returns:
        `out`.
    """
    out = Path(out)
    source = open_source(fmt, Path(src), labels=labels, tags=tags, hw=hw,
                         feature_dim=feature_dim)
    with progress() as bar:
        task = bar.add_task(f"import {fmt}", total=source.total)
        meta = write_store(source, out, advance=lambda n: bar.advance(task, n))
    stats = meta.get("import_stats", {})
    logger.info("%s: %d images, %d-d features, %d tag names, boxes: %s", out, meta["images"],
                meta["feature_dim"], len(meta.get("labels", [])), meta["boxes_unit"])
    if stats.get("tags_unaligned"):
        logger.warning("%d tags could not be matched to a region (no bbox_id, no image size to "
                       "compare boxes, and a different count): they were left out",
                       stats["tags_unaligned"])
    if stats.get("rows_not_in_imageid2idx"):
        logger.warning("%d rows of features.tsv are not listed in imageid2idx.json (Oscar "
                       "cannot reach them): skipped", stats["rows_not_in_imageid2idx"])
    return out


def export_features(store: Path, fmt: str, out: Path) -> Path:
    """Write a feature store in another toolkit's layout into the new directory `out`.

    Args:
        store: a vlp feature store.
        fmt: `oscar-tsv`: features.tsv (+ features.lineidx, imageid2idx.json) and, when the
            store has tags, predictions.tsv (+ predictions.lineidx), as Oscar's run_retrieval
            and pre-training read them; use `--img_feature_dim` = feature_dim + 6 in Oscar.
        out: the new directory; it must not exist (written aside, then renamed).

    Returns:
        `out`.
    """
    out = Path(out)
    fs = FeatureStore(store)
    with progress() as bar:
        task = bar.add_task(f"export {fmt}", total=len(fs))
        info = export_store(fs, fmt, out, advance=lambda n: bar.advance(task, n))
    logger.info("%s: %d images in Oscar's layout (%s); Oscar's --img_feature_dim is %d", out,
                info["images"], ", ".join(info["files"]), info["img_feature_dim"])
    return out


def export_scenes(spec: str, out: Path) -> Path:
    """The scene set `spec` written in the standard data sets' formats into the new directory
    `out` (readers/scenes_formats.py): written aside, then renamed, so a kill leaves no half set."""
    import shutil

    from vlp_cli import VlpError
    from vlp_cli.readers import scenes as scene_reader
    from vlp_cli.readers import scenes_formats as formats

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise VlpError(f"--out {out} already exists and is not empty; give a new folder")
    counts = scene_reader.counts(spec)
    work = out.with_name(f".{out.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    logger.info("writing %d train + %d test scenes in six data sets' formats", counts["train"],
                counts["test"])
    sources = formats.write(spec, work)
    if out.exists():
        out.rmdir()
    work.rename(out)
    text = json.dumps(sources).replace(str(work), str(out))
    (out / "sources.json").write_text(text)
    logger.info("%s: %s; build-corpus sources and references per data set in sources.json",
                out, ", ".join(sources))
    return out
