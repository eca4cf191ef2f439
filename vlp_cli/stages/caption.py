"""vlp caption: a captioning checkpoint + images or features -> captions (JSONL)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path


from vlp_cli import VlpError
from vlp_cli.checkpoint import load_checkpoint, quiet_transformers
from vlp_cli.config import Recipe
from vlp_cli.data.examples import ExampleBuilder
from vlp_cli.outputs import check_writable
from vlp_cli.stages.common import check_features, device
from vlp_cli.stores.corpus import Corpus
from vlp_cli.stores.features import FeatureStore

logger = logging.getLogger(__name__)


def output_path(out: str | Path) -> Path:
    """The JSONL file to write: `out`, or `out/captions.jsonl` when `out` is an existing folder
    or ends with a slash."""
    if str(out).endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / "captions.jsonl"
    return Path(out)


def run(checkpoint: Path, out: str | Path, recipe: Recipe, features: Path | None = None,
        images: Path | None = None, boxes: Path | None = None, corpus: Path | None = None,
        split: str = "test", limit: int | None = None, allow_incomplete: bool = False,
        beam: int | None = None, constrain_tags: bool = False, draw: Path | None = None
        ) -> Path:
    """Caption images given as a feature store (optionally with a corpus for references) or
    as an image folder, greedy or beam decoding (`beam`, else the recipe's), optionally
    constrained to hold the images' tags; one JSON line per image.

    `out` is the JSONL file, or a folder (existing, or written with a trailing slash) that
    gets `captions.jsonl`.
    """
    if (features is None) == (images is None):
        raise VlpError("pass either --features DIR or --images DIR")
    if draw is not None and images is None:
        raise VlpError("--draw needs the pixels: caption --images DIR (a feature store keeps "
                       "none)")
    drawer = None
    out = check_writable(output_path(out), file=True)
    quiet_transformers()
    from vlp_cli import tasks as registry

    model, tok, meta = load_checkpoint(checkpoint)
    task = registry.TASKS.get(meta.get("task") or "")
    if task is None or not hasattr(task, "caption"):
        writers = [n for n, t in registry.TASKS.items() if hasattr(t, "caption")]
        # A pre-trained checkpoint "captions" with garbage; refuse instead of pretending.
        raise VlpError(f"{checkpoint} is a '{meta.get('task')}' checkpoint: captions need one "
                       f"from `vlp finetune {' or '.join(writers)}`")
    task = task.bind(recipe, task.state_from_meta(meta))
    model.to(device()).eval()
    refs: dict[str, list[str]] = {}
    if features is not None:
        store = FeatureStore(features, allow_incomplete=allow_incomplete)
        check_features(meta, store, checkpoint)
        builder = ExampleBuilder(tok, store, recipe.data)
        if corpus is not None:
            c = Corpus(corpus)
            for kind in task.kinds:
                for i in c.require(kind, split):
                    ex = c.get(int(i))
                    refs.setdefault(ex["images"][0], []).append(ex["texts"][0])
            keys = sorted(refs)
        else:
            keys = store.keys()
        keys = keys[:limit]
        inputs = [builder.regions(k) for k in keys]
    else:
        from vlp_cli.infer import regions_from_images

        keys, inputs, builder, drawer = regions_from_images(Path(images), boxes, meta, tok,
                                                            recipe.data, limit, draw=draw)
    captions = task.caption(model, builder, inputs, tok, device(), beam=beam,
                            constrain_tags=constrain_tags)
    if drawer is not None:
        drawer.write(dict(zip(keys, captions)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for k, cap in zip(keys, captions):
            rec = {"image": k, "caption": cap}
            if k in refs:
                rec["references"] = refs[k]
            f.write(json.dumps(rec) + "\n")
    logger.info("%d captions -> %s", len(captions), out)
    return out
