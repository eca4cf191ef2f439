"""vlp extract-features: an image folder into a feature store.

Streaming and restartable: images are decoded in DataLoader workers and written one LMDB
transaction per batch, so memory stays flat however large the folder, a killed run loses at
most the batch in flight, and a rerun into the same store skips the keys already there,
unless their image file changed since (size or content hash): those are extracted again. A
store belongs to one source folder; extracting another folder into it is refused.
Under `accelerate launch` (or torchrun) each of N processes takes every N-th image and writes
its own shard `shard-RRRRR-of-NNNNN/`; readers take the folder of shards as one store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.config import Recipe, save_recipe
from vlp_cli.console import progress
from vlp_cli.extractors.given import read_boxes_jsonl
from vlp_cli.extractors.images import list_images
from vlp_cli.extractors.pipeline import Extractor, extract_batches
from vlp_cli.stores.features import FeatureStoreWriter, shard_name, store_parts
from vlp_cli.stores.integrity import file_signature
from vlp_cli.stores.lmdb_env import LazyReader

logger = logging.getLogger(__name__)
FAILURES = "failures.jsonl"


def _rank() -> tuple[int, int]:
    """(rank, world size) under accelerate launch / torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _existing_keys(out: Path, own: Path, world: int) -> set[str]:
    """Keys already in shards of `out` from a run with another process count.

    The shards of this run's own process count are skipped: their images are disjoint from
    this process's, and the other processes may be creating them at this very moment.
    """
    keys: set[str] = set()
    for part in store_parts(out) if out.exists() else []:
        if part.resolve() != own.resolve() and not part.name.endswith(f"-of-{world:05d}"):
            keys.update(bytes(k).decode() for k in LazyReader(part).keys())
    return keys


def _signature(path: Path) -> bytes | None:
    """The file's (size, content hash), or None when it cannot be read (decoding reports it)."""
    try:
        return file_signature(path)
    except OSError:
        return None


def _changed(files: list[tuple[str, Path]], writer: FeatureStoreWriter,
             ) -> dict[str, bytes | None]:
    """Stored keys whose image file is no longer the one extracted, with its new signature."""
    stored = [(k, p) for k, p in files if k in writer]
    if stored:
        logger.info("checking %d stored images against their files", len(stored))
    out = {}
    for key, path in stored:
        sig = _signature(path)
        if sig is None or writer.changed(key, sig):
            out[key] = sig
    return out


def run(images: str, out: Path, recipe: Recipe, boxes: Path | None = None,
        limit: int | None = None, strict: bool = False, draw: Path | None = None) -> Path:
    """Extract region features for every image under `images` into the store `out`.

    Args:
        images: an image folder, or the name of a data set a reader provides (readers/; its
            reader may also derive boxes and tags when no --boxes is given).
        out: the feature store directory; an existing store of the same configuration is
            resumed (keys already there are skipped).
        recipe: its `extract` section configures the run.
        boxes: a JSONL file of given boxes and labels per image key (the detector is off).
        limit: extract at most this many images (in key order).
        strict: make any image failure the exit status.
        draw: write each image with its boxes and tags drawn into this folder.
    """
    from vlp_cli.readers import image_source

    if image_source(images) is None:  # a folder of images: nothing to render
        return _extract(images, Path(out), recipe, boxes, limit, strict, draw, None)
    # A named data set may render its images here: they exist while extracting only (made only
    # then, so that a killed run over a folder leaves no empty scratch folder behind).
    scratch = Path(tempfile.mkdtemp(prefix="vlp-extract-"))
    try:
        return _extract(images, Path(out), recipe, boxes, limit, strict, draw, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _extract(images: str, out: Path, recipe: Recipe, boxes: Path | None, limit: int | None,
             strict: bool, draw: Path | None, scratch: Path | None) -> Path:
    cfg = recipe.extract
    derived: Path | None = None
    from vlp_cli.readers import image_source

    named = image_source(images)
    if named is not None and scratch is not None:
        # a data set vlp knows by name: its images, and boxes it derives
        root, given_boxes = named.image_source(images, scratch)
        if boxes is None and given_boxes is not None:
            # Kept beside the store once it is open, for anyone who wants to see them.
            boxes = derived = given_boxes
    else:
        root = Path(images)
    files = list_images(root)[:limit]
    if not files:
        raise VlpError(f"no images (.jpg, .jpeg, .png, .webp, .bmp) under {root}")
    rank, world = _rank()
    # A folder that already holds shards stays sharded, whatever the process count now.
    sharded = world > 1 or (out.is_dir() and any(out.glob("shard-*")))
    if sharded and (out / "data.mdb").is_file():
        raise VlpError(f"{out} holds a single-process store: extend it with one process, or "
                       "choose a new --out for a multi-process run")
    target = out / shard_name(rank, world) if sharded else out
    files = files[rank::world]
    given = read_boxes_jsonl(boxes) if boxes is not None else None
    if given is not None:
        missing = sum(1 for k, _ in files if k not in given.boxes)
        if missing:
            logger.warning("%d of %d images have no entry in %s: they get the whole-image "
                           "region only", missing, len(files), boxes)
    extractor = Extractor(cfg, given)
    # Images rendered afresh each run have no lasting folder: the data set's name is their
    # source (a rerun into the same store then resumes it).
    transient = scratch is not None and root.resolve().is_relative_to(scratch.resolve())
    meta = {**extractor.meta(), "source": images if transient else str(root.resolve())}
    skip = _existing_keys(out, target, world) if sharded else set()
    writer = FeatureStoreWriter(target, meta, commit_every=cfg.commit_every, planned=len(files))
    if derived is not None:
        shutil.move(str(derived), target / derived.name)
        logger.info("boxes and tags derived by the %s reader: %s", images,
                    target / derived.name)
    changed = _changed(files, writer)
    if limit is None and not sharded:
        gone = len(set(writer.done) - {k.encode() for k, _ in files})
        if gone:
            # Kept: a store is never pruned behind its user's back, but they should know.
            logger.warning("%d images in %s are no longer in %s: their features stay in the "
                           "store (extract into a new --out to drop them)", gone, target, root)
    todo = [(k, p) for k, p in files if (k not in writer or k in changed) and k not in skip]
    if len(todo) < len(files) or changed:
        logger.info("resuming %s: %d of %d images already there%s", target,
                    len(files) - len(todo) + len(changed), len(files),
                    f", {len(changed)} of them changed since: extracting those again"
                    if changed else "")
    if draw is not None:
        from vlp_cli.extractors.draw import draw_regions

        draw.mkdir(parents=True, exist_ok=True)
    failures = 0
    paths = dict(todo)
    start = time.time()
    with progress() as bar, (target / FAILURES).open("a", encoding="utf-8") as report:
        task = bar.add_task("extract", total=len(todo))
        for batch in extract_batches(todo, extractor, cfg.batch_size, cfg.num_workers,
                                     keep_rgb=draw is not None):
            for key, regions, error, decoded in batch:
                if error is not None:
                    failures += 1
                    report.write(json.dumps({"image": key, "error": error}) + "\n")
                    if key in changed:  # its old features describe an image that is gone
                        writer.remove(key)
                    continue
                sig = changed.get(key) or _signature(paths[key])
                writer.put(key, regions, source=sig, replace=key in changed)
                if draw is not None:
                    # The key's own name plus .jpg: cat.png and cat.jpg stay two drawings.
                    draw_regions(decoded, regions, extractor.labels, draw / f"{key}.jpg",
                                 recipe.data)
            writer.flush()  # one transaction per batch: a kill loses at most this batch
            report.flush()
            bar.advance(task, len(batch))
    final = writer.close(failures_total=failures)
    save_recipe(recipe, target)
    rate = (len(todo) - failures) / max(time.time() - start, 1e-9)
    logger.info("%s: %d images in the store (%d new, %.1f images/s); %d failed%s", target,
                final["images"], len(todo) - failures, rate, failures,
                f", listed in {target / FAILURES}" if failures else "")
    if strict and failures:
        raise VlpError(f"{failures} images failed (--strict); see {target / FAILURES}")
    return out
