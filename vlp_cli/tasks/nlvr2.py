"""NLVR2: is a statement true of a pair of images? UNITER's three settings, accuracy and the
official consistency.

Recipe section `nlvr2` (config.Nlvr2Cfg). Reads corpus kind "nlvr2" (readers/nlvr2.py: two
images, the statement, label "True" / "False").

Settings (`nlvr2.setting`, UNITER's appendix; kept in the checkpoint, so evaluation uses the
one trained):

- "pair": the statement with each image is one sequence; the two pooled [CLS] side by side
  go through Linear(2H, 2).
- "pair-biattn" (UNITER's best, its released config's "paired-attn"): the same two
  sequences; each attends to the other, is attention-pooled, and the two pools are
  classified (model.PairAttnHead).
- "triplet": one sequence, the statement then both images' regions; Linear(H, 2) on [CLS].

In every setting the second image's regions take token type 2 (a new type embedding copied
from the image type), as UNITER's code does (its `use_img_type`, on by default): a sequence of
a pair then knows which image it holds. `nlvr2.image_types: false` gives both images type 1 in
the pair settings (checkpoints fine-tuned before the option read so, and still do). In the
triplet setting each image's tags follow in order, each image's cut to data.max_tag_len,
the second's of type 2 as its regions (a triplet checkpoint from before, without
"tag_types" in its state, reads both images' tags as one list of type 1).

Metrics, as the official evaluation (nlvr2/eval/metrics.py) computes them: accuracy, and
consistency, the share of statements (an identifier without its image-pair part) whose every
pair is right. The results file is the official CSV, `identifier,prediction`.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.data.examples import ExampleBuilder, ImageInput, TaskDataset, TextInput
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import (Context, Stats, Task, classified, encode, longs, predict,
                                split_indices)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vlp_cli.model import HeadSpec, VLPModel

logger = logging.getLogger(__name__)

KIND = "nlvr2"
RESULTS_FILE = "nlvr2_predictions.csv"
HEAD_KIND = {"pair": "pair", "pair-biattn": "pair_attn", "triplet": "linear"}


def statement_of(identifier: str) -> str:
    """The statement an identifier belongs to (`dev-850-0-0` -> `dev-850--0`): the official
    evaluation's consistency groups by it."""
    parts = identifier.split("-")
    if len(parts) > 2:
        parts[2] = ""
    return "-".join(parts)


def nlvr2_metrics(rows: list[dict]) -> dict:
    """Accuracy and consistency (x 100) of rows with "identifier" and "correct"."""
    groups: dict[str, bool] = {}
    for r in rows:
        key = statement_of(r["identifier"])
        groups[key] = groups.get(key, True) and bool(r["correct"])
    return {"accuracy": 100 * float(np.mean([r["correct"] for r in rows])),
            "consistency": 100 * float(np.mean(list(groups.values()))),
            "pairs": len(rows), "statements": len(groups)}


def join_images(a: ImageInput, b: ImageInput) -> ImageInput:
    """Both images' regions as one list (the triplet setting)."""
    return ImageInput(np.concatenate([a.feats, b.feats]), np.concatenate([a.pos, b.pos]),
                      a.tag_classes + b.tag_classes)


class Nlvr2Dataset(TaskDataset):
    """One statement: two sequences (pair settings) or one (triplet); label 1 = true."""

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 max_text_len: int, setting: str, seed: int = 0, image_types: bool = True,
                 tag_types: bool = False):
        super().__init__(corpus, builder, indices, seed)
        self.max_text_len = max_text_len
        self.setting = setting
        self.image_types = image_types or setting == "triplet"
        self.tag_types = tag_types and setting == "triplet"

    def triplet_text(self, words: list[int], left: ImageInput, right: ImageInput) -> TextInput:
        """The triplet's text: both images' tags, the second's of type 2 when typed."""
        if not self.tag_types:  # a triplet checkpoint from before: one list, cut as one
            tags = self.builder.tag_ids(left.tag_classes + right.tag_classes)
            return self.builder.text(words, tags, self.max_text_len)
        first = self.builder.tag_ids(left.tag_classes)
        text = self.builder.text(words, first + self.builder.tag_ids(right.tag_classes),
                                 self.max_text_len)
        start, end = text.b_span
        return replace(text, types=[2 if start + len(first) <= p < end else t
                                    for p, t in enumerate(text.types)])

    def __getitem__(self, i: int) -> dict | list[dict]:
        idx = int(self.indices[i])
        ex = self.corpus.get(idx)
        left, right = (self.builder.regions(k) for k in ex["images"][:2])
        words, label = ex["segments"][0], int(ex["label"] == "True")
        if self.setting == "triplet":
            return self.item(self.triplet_text(words, left, right),
                             join_images(left, right), label=label, index=idx,
                             img_types=[1] * len(left.feats) + [2] * len(right.feats))
        return [self.item(self.builder.text(words, self.builder.tag_ids(img.tag_classes),
                                            self.max_text_len), img, label=label, index=idx,
                          img_types=[side + 1 if self.image_types else 1] * len(img.feats))
                for side, img in enumerate((left, right))]

    def units(self) -> np.ndarray:
        words = self.corpus.lengths[self.indices]
        exs = [self.corpus.get(int(i))["images"] for i in self.indices]
        r0, t0 = self.builder.image_sizes([e[0] for e in exs])
        r1, t1 = self.builder.image_sizes([e[1] for e in exs])
        if not self.builder.cfg.use_tags:
            t0, t1 = np.zeros_like(t0), np.zeros_like(t1)
        size = self.builder.text_lengths
        if self.setting == "triplet":
            # typed, each image's tags were cut on their own; else both together
            tags = t0 + t1 if self.tag_types else np.minimum(t0 + t1, self.builder.cfg.max_tag_len)
            return np.stack([size(words, tags, self.max_text_len), r0 + r1], 1)
        # Two sequences, each padded to the batch's longest text and region list.
        text = np.maximum(size(words, t0, self.max_text_len), size(words, t1, self.max_text_len))
        return 2 * np.stack([text, np.maximum(r0, r1)], 1)


class Nlvr2(Task):
    name = "nlvr2"
    help = "NLVR2: a statement about two images, true or false: accuracy and consistency"
    kinds = (KIND,)
    metrics = ("accuracy", "consistency", "pairs")
    report = ("accuracy", "consistency", "pairs", "statements")
    headline = "accuracy"
    select = "acc"

    @property
    def uses_pooler(self) -> bool:  # type: ignore[override]
        """The paired-attention head reads every state, not the pooled [CLS]."""
        state = getattr(self, "state", None) or {}
        return state.get("setting") != "pair-biattn"

    def prepare(self, ctx: Context) -> dict:
        cfg = self.recipe.nlvr2
        state: dict[str, Any] = {"setting": cfg.setting}
        if cfg.image_types and cfg.setting != "triplet":
            state["image_types"] = True  # absent: a checkpoint of the pair settings from before
        if cfg.setting == "triplet":
            state["tag_types"] = True  # absent: a triplet checkpoint from before
        return state

    def _typed(self) -> bool:
        return self.state["setting"] == "triplet" or bool(self.state.get("image_types"))

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        return [HeadSpec(self.name, HEAD_KIND[self.state["setting"]], 2)]

    def adapt_model(self, model: VLPModel) -> None:
        if self._typed():
            model.grow_type_vocab(3)

    def dataset(self, ctx: Context, split: str, seed: int) -> Nlvr2Dataset:
        return Nlvr2Dataset(ctx.corpus, ctx.builder, split_indices(ctx.corpus, KIND, split),
                            self.recipe.nlvr2.max_text_len, self.state["setting"], seed,
                            image_types=self._typed(),
                            tag_types=bool(self.state.get("tag_types")))

    def collate(self, items: list[dict], batch: dict) -> None:
        import torch

        if self._typed():
            types = torch.ones(batch["img_mask"].shape, dtype=torch.long)
            for i, x in enumerate(items):
                types[i, :len(x["img_types"])] = torch.as_tensor(x["img_types"])
            batch["img_type_ids"] = types
        if self.state["setting"] != "triplet":
            items = items[::2]  # the pair's two sequences carry the same label
        batch["labels"] = longs(items, "label")
        batch["index"] = longs(items, "index")

    def logits(self, model: VLPModel, batch: dict) -> torch.Tensor:
        import torch

        hidden = encode(model, batch)
        if self.state["setting"] == "triplet":
            return model.cls_logits(self.name, hidden)
        valid = torch.cat([batch["text_mask"], batch["img_mask"]], 1).bool()
        return model.pair_logits(self.name, hidden, valid)

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        from vlp_cli.losses import classification_loss

        logits = self.logits(model, batch)
        return classified(classification_loss(logits, batch["labels"]), logits,
                          batch["labels"])

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        if self.recipe.nlvr2.setting != self.state["setting"]:
            logger.warning("nlvr2.setting %s is not this checkpoint's: it was fine-tuned as %s, "
                           "and is evaluated so", self.recipe.nlvr2.setting,
                           self.state["setting"])
        rows = []
        for ex, p in predict(self, ctx, split, limit, accelerator,
                             lambda b: self.logits(model, b).argmax(-1)):
            pred = "True" if p == 1 else "False"
            rows.append({"identifier": ex["id"], "sentence": ex["texts"][0], "prediction": pred,
                         "label": ex["label"], "correct": pred == ex["label"]})
        return nlvr2_metrics(rows), rows

    def result_files(self, predictions: list[dict]) -> dict[str, Any]:
        return {RESULTS_FILE: "".join(f"{p['identifier']},{p['prediction']}\n"
                                      for p in predictions)}

    def score_files(self, predictions: Path, references: Path) -> tuple[dict, list[dict]]:
        """The official CSV (`identifier,prediction`) against a released JSON-lines file:
        every statement of the file must be answered, as the official script requires."""
        from vlp_cli.readers.jsonl_lines import iter_jsonl

        try:
            text = predictions.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise VlpError(f"--predictions {predictions}: cannot be read ({exc})") from None
        if text.lstrip()[:1] in ("[", "{"):
            raise VlpError(f"--predictions {predictions}: a JSON file; NLVR2 results are the "
                           "official CSV, one 'identifier,True|False' per line")
        preds = {}
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if not row:
                continue
            if len(row) < 2 or row[1].strip().lower() not in ("true", "false"):
                raise VlpError(f"--predictions {predictions} line {n}: expected "
                               "'identifier,True' or 'identifier,False'")
            preds[row[0].strip()] = row[1].strip()
        rows = []
        for where, rec in iter_jsonl(references, "--references", require="identifier"):
            ident = rec["identifier"]
            if rec.get("label") not in ("True", "False"):
                raise VlpError(f"{where}: no 'label' True / False (an unlabelled file cannot be "
                               "scored)")
            if ident not in preds:
                raise VlpError(f"--predictions {predictions}: no prediction for {ident!r} of "
                               f"{references}; answer every statement of the file")
            rows.append({"identifier": ident, "prediction": preds[ident],
                         "label": rec.get("label"),
                         "correct": preds[ident].lower() == str(rec.get("label")).lower()})
        if not rows:
            raise VlpError(f"--references {references}: no statements in it")
        return nlvr2_metrics(rows), rows


TASK = Nlvr2()
