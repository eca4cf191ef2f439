"""vlp caption: a captioning checkpoint + images or features -> captions (JSONL)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from vlp_cli import VlpError
from vlp_cli.checkpoint import load_checkpoint, quiet_transformers
from vlp_cli.config import ExtractCfg, Recipe
from vlp_cli.data.datasets import CaptionDataset
from vlp_cli.data.examples import ExampleBuilder, ImageInput
from vlp_cli.decoding import greedy_captions
from vlp_cli.stages.common import check_features
from vlp_cli.stages.evaluate import device
from vlp_cli.stores.corpus import Corpus
from vlp_cli.stores.features import FeatureStore, select_count

logger = logging.getLogger(__name__)


def regions_from_images(images: Path, boxes: Path | None, meta: dict, builder: ExampleBuilder,
                        limit: int | None) -> tuple[list[str], list[ImageInput]]:
    """Extract features from raw images exactly as the checkpoint's feature store was made."""
    from vlp_cli.extractors.backbone import load_backbone
    from vlp_cli.extractors.images import list_images, read_boxes_jsonl
    from vlp_cli.stages.extract import extract_batches

    ext = meta["features"].get("extractor") or {}
    if not ext.get("name", "").startswith("vlp-roi/"):
        raise VlpError(f"the checkpoint's features came from {ext.get('name')!r}, which vlp "
                       "cannot reproduce from raw images: pass --features instead")
    if ext.get("boxes", {}).get("source") == "given" and boxes is None:
        raise VlpError("the checkpoint was trained on features of given boxes: pass --boxes "
                       "FILE.jsonl for these images (or --features)")
    backbone = load_backbone(ext["backbone"]["name"])
    if backbone.info.weights_sha256 != ext["backbone"].get("weights_sha256"):
        raise VlpError("the installed backbone weights differ from the ones the checkpoint's "
                       "features were extracted with")
    cfg = ExtractCfg(backbone=ext["backbone"]["name"], **ext["config"],
                     fallback_grid=ext.get("boxes", {}).get("grid", 3))
    labels = meta["features"].get("labels", [])
    given = read_boxes_jsonl(boxes) if boxes is not None else None
    if given is not None:
        unknown = sorted(set(given.labels) - set(labels))
        if unknown:
            raise VlpError(f"{boxes}: labels {unknown[:5]} are not in the checkpoint's tag "
                           "vocabulary")
    label_ids = {x: i for i, x in enumerate(labels)}
    files = list_images(images)[:limit]
    keys: list[str] = []
    out: list[ImageInput] = []
    d = builder.cfg
    for batch in extract_batches(files, cfg, backbone, given, label_ids):
        for key, r, error in batch:
            if r is None:
                logger.warning("skipped %s: %s", key, error)
                continue
            n = select_count(r.confidences, d.conf_th, d.min_boxes, d.max_boxes)
            keys.append(key)
            out.append(builder.image_input(r.take(n)))
    return keys, out


def run(checkpoint: Path, out: Path, recipe: Recipe, features: Path | None = None,
        images: Path | None = None, boxes: Path | None = None, corpus: Path | None = None,
        split: str = "test", limit: int | None = None) -> Path:
    """Caption images given as a feature store (optionally with a corpus for references) or
    as an image folder, greedy decoding; one JSON line per image."""
    if (features is None) == (images is None):
        raise VlpError("pass either --features DIR or --images DIR")
    quiet_transformers()
    model, tok, meta = load_checkpoint(checkpoint)
    if meta.get("task") != "captioning":
        # A pre-trained checkpoint "captions" with garbage; refuse instead of pretending.
        raise VlpError(f"{checkpoint} is a '{meta.get('task')}' checkpoint: captions need one "
                       "from `vlp finetune captioning`")
    model.to(device()).eval()
    refs: dict[str, list[str]] = {}
    if features is not None:
        store = FeatureStore(features)
        check_features(meta, store, checkpoint)
        builder = ExampleBuilder(tok, store, recipe.data)
        if corpus is not None:
            c = Corpus(corpus)
            for i in c.require("caption", split):
                ex = c.get(int(i))
                refs.setdefault(ex["image"], []).append(ex["text"])
            keys = sorted(refs)
        else:
            keys = store.keys()
        keys = keys[:limit]
        inputs = [builder.regions(k) for k in keys]
    else:
        builder = ExampleBuilder(tok, None, recipe.data, labels=meta["features"].get("labels"))
        keys, inputs = regions_from_images(Path(images), boxes, meta, builder, limit)
    ds = CaptionDataset(None, builder, np.zeros(0), recipe.captioning,  # type: ignore[arg-type]
                        recipe.data.max_text_len + recipe.captioning.max_caption_len, 0)
    captions = greedy_captions(model, ds, inputs, tok, device=device())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for k, cap in zip(keys, captions):
            rec = {"image": k, "caption": cap}
            if k in refs:
                rec["references"] = refs[k]
            f.write(json.dumps(rec) + "\n")
    logger.info("%d captions -> %s", len(captions), out)
    return out
