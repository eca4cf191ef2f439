"""vlp extract-features: an image folder into a feature store."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlp_cli import VlpError
from vlp_cli.config import ExtractCfg, Recipe, save_recipe
from vlp_cli.console import progress
from vlp_cli.extractors.backbone import Backbone, grid_boxes, load_backbone
from vlp_cli.extractors.images import (
    Decoded,
    GivenBoxes,
    ImageFolder,
    collate_decoded,
    list_images,
    read_boxes_jsonl,
)
from vlp_cli.stores.features import FeatureStoreWriter, Regions, fingerprint

logger = logging.getLogger(__name__)
FAILURES = "failures.jsonl"


def extractor_meta(cfg: ExtractCfg, backbone: Backbone, given: GivenBoxes | None) -> dict:
    """The extractor's identity: enough to reproduce the extraction on new images, or refuse."""
    boxes = ({"source": "given", "file_sha256": given.sha256} if given is not None
             else {"source": "grid", "grid": cfg.fallback_grid})
    return {
        "name": f"vlp-roi/{backbone.info.name}",
        "backbone": vars(backbone.info),
        "config": {"min_size": cfg.min_size, "max_size": cfg.max_size,
                   "roi_output": cfg.roi_output},
        "boxes": boxes,
        # Given boxes come from outside: new images need a boxes file of their own.
        "reproducible": given is None,
    }


def _regions_for(item: Decoded, fmap: torch.Tensor, backbone: Backbone, cfg: ExtractCfg,
                 given: GivenBoxes | None, label_ids: dict[str, int]) -> Regions:
    w, h = item.width, item.height
    if given is not None:
        boxes, labels, scores = given.boxes.get(item.key, (np.zeros((0, 4), np.float32), [],
                                                           np.zeros(0, np.float32)))
        boxes = boxes.copy()
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        cls = np.asarray([label_ids[x] for x in labels], np.int32)
    else:
        boxes = grid_boxes(w, h, cfg.fallback_grid)
        cls = np.full(len(boxes), -1, np.int32)  # grid cells carry no tag
        scores = np.ones(len(boxes), np.float32)
    # Boxes are in original pixels; the map was computed on the resized image.
    rh, rw = item.image.shape[1], item.image.shape[2]  # type: ignore[union-attr]
    scale = torch.tensor([rw / w, rh / h, rw / w, rh / h], dtype=torch.float32)
    all_boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), boxes], 0)
    pooled = backbone.pool(fmap, torch.from_numpy(all_boxes) * scale, cfg.roi_output)
    feats = pooled.numpy().astype(np.float16)
    return Regions(features=feats[1:], boxes=boxes, class_ids=cls, confidences=scores,
                   width=w, height=h, image_feature=feats[0])


def _batch_tensor(items: list[Decoded]) -> torch.Tensor:
    """Pad a batch of differently sized images (right/bottom) into one tensor."""
    hh = max(x.image.shape[1] for x in items)  # type: ignore[union-attr]
    ww = max(x.image.shape[2] for x in items)  # type: ignore[union-attr]
    out = torch.zeros((len(items), 3, hh, ww))
    for i, x in enumerate(items):
        out[i, :, : x.image.shape[1], : x.image.shape[2]] = x.image  # type: ignore[union-attr]
    return out


def extract_batches(files: list[tuple[str, Path]], cfg: ExtractCfg, backbone: Backbone,
                    given: GivenBoxes | None, label_ids: dict[str, int],
                    ) -> Iterator[list[tuple[str, Regions | None, str | None]]]:
    """Decode (in DataLoader workers), run the backbone, pool: per batch, (key, regions, error)."""
    loader = DataLoader(ImageFolder(files, cfg.min_size, cfg.max_size), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, collate_fn=collate_decoded)
    with torch.inference_mode():
        for batch in loader:
            good = [x for x in batch if x.error is None]
            fmaps = backbone(_batch_tensor(good)) if good else []
            pooled = {x.key: _regions_for(x, fm, backbone, cfg, given, label_ids)
                      for x, fm in zip(good, fmaps)}
            yield [(x.key, pooled.get(x.key), x.error) for x in batch]


def run(images: str, out: Path, recipe: Recipe, boxes: Path | None = None,
        limit: int | None = None, strict: bool = False) -> Path:
    """Extract region features for every image under `images` into the store `out`.

    Args:
        images: an image folder, or `easy-vqa` for the embedded data set (whose boxes and
            shape tags are derived from the pixels when no --boxes is given).
        out: the feature store directory; an existing store of the same configuration is
            resumed (keys already there are skipped).
        recipe: its `extract` section configures the run.
        boxes: a JSONL file of given boxes and labels per image key.
        limit: extract at most this many images (in key order).
        strict: make any image failure the exit status.
    """
    cfg = recipe.extract
    out = Path(out)
    derived: Path | None = None
    if images == "easy-vqa":
        from vlp_cli.assets import easy_vqa_root
        from vlp_cli.data import easyvqa

        root = easy_vqa_root()
        if boxes is None:
            # Kept beside the store once it is open, for anyone who wants to see them.
            derived = Path(tempfile.mkdtemp()) / "easy-vqa-boxes.jsonl"
            anns = easyvqa.derive_annotations("train") + easyvqa.derive_annotations("test")
            boxes = easyvqa.write_boxes_jsonl(anns, derived)
    else:
        root = Path(images)
    files = list_images(root)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise VlpError(f"no images ({', '.join(sorted({'.jpg', '.png', '.webp', '.bmp'}))}) "
                       f"under {root}")
    given = read_boxes_jsonl(boxes) if boxes is not None else None
    if given is not None:
        missing = sum(1 for k, _ in files if k not in given.boxes)
        if missing:
            logger.warning("%d of %d images have no entry in %s: they get the whole-image "
                           "region only", missing, len(files), boxes)
    label_ids = {x: i for i, x in enumerate(given.labels)} if given is not None else {}

    backbone = load_backbone(cfg.backbone)
    ext = extractor_meta(cfg, backbone, given)
    # The fingerprint names the feature space (backbone and pooling), not the boxes: features
    # of the same space from different box sources can be mixed and compared.
    space = {k: v for k, v in ext.items() if k not in ("boxes", "reproducible")}
    meta = {"extractor": ext, "fingerprint": fingerprint(space),
            "feature_dim": backbone.info.feature_dim,
            "labels": given.labels if given is not None else [],
            "source": str(root)}
    writer = FeatureStoreWriter(out, meta, commit_every=cfg.commit_every)
    if derived is not None:
        shutil.move(str(derived), out / derived.name)
        logger.info("easy-VQA boxes and shape tags derived from the pixels: %s",
                    out / derived.name)
    todo = [(k, p) for k, p in files if k not in writer]
    if len(todo) < len(files):
        logger.info("resuming %s: %d of %d images already there", out, len(files) - len(todo),
                    len(files))
    failures = 0
    start = time.time()
    with progress() as bar, (out / FAILURES).open("a", encoding="utf-8") as report:
        task = bar.add_task("extract", total=len(todo))
        for batch in extract_batches(todo, cfg, backbone, given, label_ids):
            for key, regions, error in batch:
                if error is not None:
                    failures += 1
                    report.write(json.dumps({"image": key, "error": error}) + "\n")
                else:
                    writer.put(key, regions)
            writer.flush()  # one transaction per batch: a kill loses at most this batch
            bar.advance(task, len(batch))
    final = writer.close(failures_total=failures)
    save_recipe(recipe, out)
    rate = len(todo) / max(time.time() - start, 1e-9)
    logger.info("%s: %d images (%d new, %.1f images/s), %d failed%s", out, final["images"],
                len(todo) - failures, rate, failures,
                f" (see {out / FAILURES})" if failures else "")
    if strict and failures:
        raise VlpError(f"{failures} images failed to decode (--strict); see {out / FAILURES}")
    return out
