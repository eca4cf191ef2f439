"""Answers, match scores and captions for new images from a fine-tuned checkpoint, loaded once.

    from vlp_cli.infer import Predictor

    answers = Predictor("runs/vqa-model")              # a fine-tuned VQA checkpoint
    answers.answer("photos/dog.jpg", "what is this?")  # {"dog.jpg": [("dog", 0.93), ...]}
    Predictor("runs/retrieval").score("photos/", ["a dog", "a cat"])  # one row per image
    Predictor("runs/captioning").caption("photos/", beam=5)

Images are a file or a folder; their features are extracted the way the checkpoint's were
(the extractor recorded in its lineage). A checkpoint whose features came from given boxes
needs `boxes` (a boxes JSONL) for new images, or falls back to the embedded detector with a
warning. `vlp answer`, `vlp score` and `vlp caption --images` are these functions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.data.examples import ExampleBuilder, ImageInput
from vlp_cli.stores.features import select_count

logger = logging.getLogger(__name__)


def image_files(images: Path) -> list[tuple[str, Path]]:
    """(key, path) of one image file (its name as key) or of every image under a folder."""
    from vlp_cli.extractors.images import EXTENSIONS, list_images

    images = Path(images)
    if images.is_file():
        if images.suffix.lower() not in EXTENSIONS:
            raise VlpError(f"{images}: not an image file ({', '.join(sorted(EXTENSIONS))})")
        return [(images.name, images)]
    if not images.is_dir():
        raise VlpError(f"{images}: no such image file or folder")
    files = list_images(images)
    if not files:
        raise VlpError(f"{images}: no image files in it")
    return files


def regions_from_images(images: Path, boxes: Path | None, meta: dict, tokenizer: Any,
                        data_cfg: Any, limit: int | None = None,
                        fallback_detector: bool = True,
                        ) -> tuple[list[str], list[ImageInput], ExampleBuilder]:
    """Features of raw images extracted exactly as the checkpoint's feature store was made,
    and the builder that reads their tags (the detector's labels when it stood in for the
    given boxes the checkpoint was trained on)."""
    from vlp_cli.extractors.given import read_boxes_jsonl
    from vlp_cli.extractors.pipeline import Extractor, extract_batches

    given = read_boxes_jsonl(boxes) if boxes is not None else None
    extractor = Extractor.from_meta(meta["features"], given, fallback_detector)
    builder = ExampleBuilder(tokenizer, None, data_cfg, labels=extractor.labels)
    keys: list[str] = []
    out: list[ImageInput] = []
    for batch in extract_batches(image_files(images)[:limit], extractor,
                                 extractor.cfg.batch_size, 0):
        for key, r, error, _ in batch:
            if r is None:
                logger.warning("skipped %s: %s", key, error)
                continue
            n = select_count(r.confidences, data_cfg.conf_th, data_cfg.min_boxes,
                             data_cfg.max_boxes)
            keys.append(key)
            out.append(builder.image_input(r.take(n)))
    if not out:
        raise VlpError(f"{images}: no image could be read (see the warnings above)")
    return keys, out, builder


class Predictor:
    """A fine-tuned checkpoint, loaded once, with the recipe it was made with."""

    def __init__(self, checkpoint: str | Path, boxes: str | Path | None = None,
                 recipe: Any = None):
        from vlp_cli import tasks as registry
        from vlp_cli.checkpoint import load_checkpoint, quiet_transformers
        from vlp_cli.stages.common import checkpoint_recipe, device

        quiet_transformers()
        self.checkpoint = Path(checkpoint)
        self.model, self.tokenizer, self.meta = load_checkpoint(self.checkpoint)
        recipe = recipe if recipe is not None else checkpoint_recipe(self.checkpoint, None, [])
        self.recipe = recipe
        self.boxes = Path(boxes) if boxes is not None else None
        task = registry.TASKS.get(self.meta.get("task") or "")
        self.task = task.bind(recipe, task.state_from_meta(self.meta)) if task else None
        self.device = device()
        self.model.to(self.device).eval()

    def _need(self, method: str, what: str) -> Any:
        """The bound task if it can do `method`, else one line naming what to fine-tune."""
        from vlp_cli import tasks as registry

        if self.task is None or not hasattr(self.task, method):
            able = [n for n, t in registry.TASKS.items() if hasattr(t, method)]
            raise VlpError(f"{self.checkpoint} is a '{self.meta.get('task')}' checkpoint: "
                           f"{what} need one from `vlp finetune {' or '.join(able)}`")
        return self.task

    def images(self, images: str | Path, limit: int | None = None,
               ) -> tuple[list[str], list[ImageInput], ExampleBuilder]:
        return regions_from_images(Path(images), self.boxes, self.meta, self.tokenizer,
                                   self.recipe.data, limit)

    def answer(self, images: str | Path, question: str, top: int = 5,
               ) -> dict[str, list[tuple[str, float]]]:
        """Image key -> the top answers to `question` with their scores."""
        task = self._need("answer", "answers")
        keys, inputs, builder = self.images(images)
        out = task.answer(self.model, builder, inputs, [question] * len(inputs),
                          self.tokenizer, self.device, top)
        return dict(zip(keys, out))

    def score(self, images: str | Path, texts: list[str]) -> dict[str, list[float]]:
        """Image key -> the match score of each text (in the texts' order)."""
        task = self._need("match_scores", "match scores")
        if not texts:
            raise VlpError("give at least one text to score")
        keys, inputs, builder = self.images(images)
        scores = np.asarray(task.match_scores(self.model, builder, inputs, texts,
                                              self.tokenizer, self.device))
        return {k: [float(x) for x in row] for k, row in zip(keys, scores)}

    def caption(self, images: str | Path, beam: int | None = None,
                constrain_tags: bool = False) -> dict[str, str]:
        """Image key -> caption."""
        task = self._need("caption", "captions")
        keys, inputs, builder = self.images(images)
        return dict(zip(keys, task.caption(self.model, builder, inputs, self.tokenizer,
                                           self.device, beam=beam,
                                           constrain_tags=constrain_tags)))
