"""vlp build-corpus: data-set files + a feature store -> a tokenised corpus store.

Each source is read by the reader that claims it (readers/); this stage checks the images
against the feature store, carves a val split when none is given (logged with the key that
does it) and tokenises every text segment. Readers drop blank texts (counted), never trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vlp_cli import VlpError
from vlp_cli.checkpoint import load_tokenizer, tokenizer_identity
from vlp_cli.config import CorpusCfg, Recipe, save_recipe
from vlp_cli.console import progress
from vlp_cli.readers import reader_for
from vlp_cli.readers.files import store_key
from vlp_cli.stores.corpus import CorpusWriter
from vlp_cli.stores.features import FeatureStore

logger = logging.getLogger(__name__)


def carve_val(examples: list[dict], cfg: CorpusCfg) -> tuple[int, int]:
    """When no example is in 'val', move a fraction of the train images (all their examples)
    there: held-out numbers never see a training image. Returns (images, examples) moved."""
    if any(e["split"] == "val" for e in examples) or cfg.val_fraction <= 0:
        return 0, 0
    train_images = sorted({e["images"][0] for e in examples if e["split"] == "train"})
    rng = np.random.default_rng(cfg.seed)
    n = int(round(len(train_images) * cfg.val_fraction))
    val = set(rng.choice(train_images, size=n, replace=False).tolist()) if n else set()
    moved = 0
    for e in examples:
        if e["split"] == "train" and e["images"][0] in val:
            e["split"] = "val"
            moved += 1
    if n:
        logger.info("no 'val' split given: moved %d of %d train images (%d examples) to val "
                    "(corpus.val_fraction=%g; set it to 0 to keep them in train)", n,
                    len(train_images), moved, cfg.val_fraction)
    return n, moved


def excluded_images(specs: list[str], workdir: Path) -> set[str]:
    """The image keys of every example in these sources (evaluation splits, e.g.
    `test=dataset_coco.json`), read by the readers that claim them."""
    keys: set[str] = set()
    for spec in specs:
        for e in reader_for(spec).read(spec, workdir):
            keys.update(e["images"])
    return keys


def run(sources: list[str], features: Path, out: Path, recipe: Recipe,
        skip_missing: bool = False, allow_incomplete: bool = False,
        exclude: list[str] | None = None) -> Path:
    """Build a corpus from `sources` (any number; each read by the reader that claims it).

    A feature store whose extraction has not finished is refused unless `allow_incomplete`.
    `exclude`: sources whose images must not be in this corpus (UNITER cleaned its
    pre-training data of every image in the downstream evaluation splits): every example
    naming one of them is dropped; the counts are logged and recorded in the corpus meta.
    """
    cfg = recipe.corpus
    store = FeatureStore(features, allow_incomplete=allow_incomplete)
    tok = load_tokenizer(cfg.tokenizer)
    writer = CorpusWriter(out, {})
    try:
        return _build(sources, store, tok, writer, features, out, recipe, skip_missing,
                      exclude or [])
    except BaseException:
        writer.abort()
        raise


def _build(sources: list[str], store: FeatureStore, tok: object, writer: CorpusWriter,
           features: Path, out: Path, recipe: Recipe, skip_missing: bool,
           exclude: list[str]) -> Path:
    cfg = recipe.corpus
    examples: list[dict] = []
    for spec in sources:
        examples += reader_for(spec).read(spec, writer.workdir)
    if not examples:
        raise VlpError("no examples in the given sources")
    excluded = None
    if exclude:
        banned = excluded_images(exclude, writer.workdir)
        kept = [e for e in examples if not banned.intersection(e["images"])]
        dropped_images = {k for e in examples for k in e["images"]} & banned
        excluded = {"sources": exclude, "images": len(dropped_images),
                    "examples": len(examples) - len(kept)}
        logger.warning("--exclude: dropped %d examples of %d images that appear in %s",
                       excluded["examples"], excluded["images"], ", ".join(exclude))
        examples = kept
        if not examples:
            raise VlpError("--exclude dropped every example: the sources hold only images of "
                           "the excluded splits")
    if cfg.image_keys != "{key}":  # stores imported from released features name images so
        for e in examples:
            where = e.get("where", e.get("source", "source"))
            e["images"] = [store_key(k, cfg.image_keys, where) for k in e["images"]]
    keys = set(store.keys())
    missing = [e for e in examples if any(k not in keys for k in e["images"])]
    if missing:
        first = missing[0]
        image = next(k for k in first["images"] if k not in keys)
        msg = (f"{len(missing)} examples name images absent from {features}; first: "
               f"{first.get('where', first.get('source', ''))} image {image!r}"
               + ("" if cfg.image_keys != "{key}" else
                  " (a store imported from released features may name images otherwise: "
                  "see corpus.image_keys)"))
        if not skip_missing:
            raise VlpError(msg + " (extract their features, or pass --skip-missing)")
        logger.warning(msg + "; skipped")
        examples = [e for e in examples if all(k in keys for k in e["images"])]
    carve_val(examples, cfg)
    with progress() as bar:
        task = bar.add_task("tokenise", total=len(examples))
        for start in range(0, len(examples), 1024):
            chunk = examples[start: start + 1024]
            texts = [t for e in chunk for t in e["texts"]]
            ids = iter(tok(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
            for e in chunk:
                e.pop("where", None)
                e["segments"] = [next(ids) for _ in e["texts"]]
                writer.add(e)
            bar.advance(task, len(chunk))
    save_recipe(recipe, writer.workdir)
    meta = writer.close(
        sources=sources, tokenizer=tokenizer_identity(tok),
        features={"path": str(Path(features).resolve()), "fingerprint": store.fingerprint,
                  "feature_dim": store.feature_dim},
        **({"excluded": excluded} if excluded is not None else {}),
    )
    logger.info("%s: %d examples (%s)", out, meta["examples"],
                ", ".join(f"{k} {v}" for k, v in meta["counts"].items()))
    return Path(out)
