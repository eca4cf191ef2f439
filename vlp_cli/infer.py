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


class Drawer:
    """Keeps each image's pixels and regions so that its drawing, with the text the model
    gave it, can be written once that text is known (`--draw DIR`)."""

    def __init__(self, folder: Path, labels: list[str], data_cfg: Any):
        self.folder, self.labels, self.data_cfg = Path(folder), labels, data_cfg
        self.kept: dict[str, tuple[Any, Any]] = {}

    def keep(self, key: str, decoded: Any, regions: Any) -> None:
        self.kept[key] = (decoded, regions)

    def write(self, texts: dict[str, str]) -> None:
        from vlp_cli.extractors.draw import draw_regions

        for key, text in texts.items():
            decoded, regions = self.kept[key]
            # The key's own name plus .jpg: cat.png and cat.jpg stay two drawings.
            draw_regions(decoded, regions, self.labels, self.folder / f"{key}.jpg",
                         self.data_cfg, caption=text)
        logger.info("%d drawings -> %s", len(texts), self.folder)


def regions_from_images(images: Path, boxes: Path | None, meta: dict, tokenizer: Any,
                        data_cfg: Any, limit: int | None = None,
                        fallback_detector: bool = True, draw: Path | None = None,
                        ) -> tuple[list[str], list[ImageInput], ExampleBuilder, Drawer | None]:
    """Features of raw images extracted exactly as the checkpoint's feature store was made,
    the builder that reads their tags (the detector's labels when it stood in for the given
    boxes the checkpoint was trained on), and with `draw` a Drawer holding their pixels."""
    from vlp_cli.extractors.given import read_boxes_jsonl
    from vlp_cli.extractors.pipeline import Extractor, extract_batches

    given = read_boxes_jsonl(boxes) if boxes is not None else None
    extractor = Extractor.from_meta(meta["features"], given, fallback_detector)
    builder = ExampleBuilder(tokenizer, None, data_cfg, labels=extractor.labels)
    drawer = Drawer(draw, extractor.labels, data_cfg) if draw is not None else None
    keys: list[str] = []
    out: list[ImageInput] = []
    for batch in extract_batches(image_files(images)[:limit], extractor,
                                 extractor.cfg.batch_size, 0, keep_rgb=draw is not None):
        for key, r, error, decoded in batch:
            if r is None:
                logger.warning("skipped %s: %s", key, error)
                continue
            n = select_count(r.confidences, data_cfg.conf_th, data_cfg.min_boxes,
                             data_cfg.max_boxes)
            keys.append(key)
            out.append(builder.image_input(r.take(n)))
            if drawer is not None:
                drawer.keep(key, decoded, r)
    if not out:
        raise VlpError(f"{images}: no image could be read (see the warnings above)")
    return keys, out, builder, drawer


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

    def images(self, images: str | Path, limit: int | None = None, draw: Path | None = None,
               ) -> tuple[list[str], list[ImageInput], ExampleBuilder, Drawer | None]:
        return regions_from_images(Path(images), self.boxes, self.meta, self.tokenizer,
                                   self.recipe.data, limit, draw=draw)

    def answer(self, images: str | Path, question: str, top: int = 5,
               draw: str | Path | None = None) -> dict[str, list[tuple[str, float]]]:
        """Image key -> the top answers to `question` with their scores; `draw`: a folder
        for each image drawn with its boxes, tags, the question and the best answer."""
        task = self._need("answer", "answers")
        keys, inputs, builder, drawer = self.images(images, draw=_path(draw))
        out = dict(zip(keys, task.answer(self.model, builder, inputs,
                                         [question] * len(inputs), self.tokenizer,
                                         self.device, top)))
        if drawer is not None:
            drawer.write({k: f"{question} -> {v[0][0]} ({v[0][1]:.2f})" for k, v in out.items()})
        return out

    def score(self, images: str | Path, texts: list[str],
              draw: str | Path | None = None) -> dict[str, list[float]]:
        """Image key -> the match score of each text (in the texts' order); `draw`: a folder
        for each image drawn with its boxes, tags and best-matching text."""
        task = self._need("match_scores", "match scores")
        if not texts:
            raise VlpError("give at least one text to score")
        keys, inputs, builder, drawer = self.images(images, draw=_path(draw))
        scores = np.asarray(task.match_scores(self.model, builder, inputs, texts,
                                              self.tokenizer, self.device))
        out = {k: [float(x) for x in row] for k, row in zip(keys, scores)}
        if drawer is not None:
            drawer.write({k: f"{texts[int(np.argmax(v))]} ({max(v):.2f})"
                          for k, v in out.items()})
        return out

    def caption(self, images: str | Path, beam: int | None = None,
                constrain_tags: bool = False, draw: str | Path | None = None,
                limit: int | None = None) -> dict[str, str]:
        """Image key -> caption; `draw`: a folder for each image drawn with its boxes, tags
        and caption."""
        task = self._need("caption", "captions")
        keys, inputs, builder, drawer = self.images(images, limit, draw=_path(draw))
        out = dict(zip(keys, task.caption(self.model, builder, inputs, self.tokenizer,
                                          self.device, beam=beam,
                                          constrain_tags=constrain_tags)))
        if drawer is not None:
            drawer.write(out)
        return out


def _path(p: str | Path | None) -> Path | None:
    return Path(p) if p is not None else None
