"""SNLI-VE: does an image entail, contradict, or say nothing about a hypothesis? 3-way.

Recipe section `snli_ve` (config.SnliVeCfg). Reads corpus kind "snli-ve" (readers/snli_ve.py).
UNITER's visual-entailment model is its VQA model with three answers: the classifier on
[CLS] (Linear(H, 2H), GELU, LayerNorm, Linear(2H, 3)) trained with the VQA loss on one-hot
targets (binary cross-entropy x 3), which we follow; the metric is accuracy.

SNLI-VE has no evaluation server; the results file is `snli_ve_results.json`, [{"pairID",
"gold_label": the prediction}], the lines' own field names, and `vlp evaluate snli-ve
--predictions F --references snli_ve_test.jsonl` scores such a file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.tasks.base import (Context, Stats, Task, classified, TextImageDataset, encode, longs,
                                predict, split_indices)
from vlp_cli.tasks.vqa import vqa_bce

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vlp_cli.model import HeadSpec, VLPModel

KIND = "snli-ve"
LABELS = ("entailment", "neutral", "contradiction")
RESULTS_FILE = "snli_ve_results.json"


def _label(ex: dict, img: Any) -> dict:
    return {"label": LABELS.index(ex["label"])}


def accuracy_rows(rows: list[dict]) -> dict:
    metrics: dict[str, Any] = {"accuracy": 100 * float(np.mean([r["correct"] for r in rows])),
                               "hypotheses": len(rows)}
    for label in LABELS:
        mine = [r["correct"] for r in rows if r["label"] == label]
        metrics[label] = 100 * float(np.mean(mine)) if mine else None
    return metrics


class SnliVe(Task):
    name = "snli-ve"
    help = "SNLI-VE visual entailment: 3-way accuracy"
    kinds = (KIND,)
    metrics = ("accuracy", "hypotheses")
    report = ("accuracy", *LABELS, "hypotheses")
    headline = "accuracy"
    select = "acc"

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        return [HeadSpec(self.name, "mlp", len(LABELS))]

    def dataset(self, ctx: Context, split: str, seed: int) -> TextImageDataset:
        return TextImageDataset(ctx.corpus, ctx.builder, split_indices(ctx.corpus, KIND, split),
                                self.recipe.snli_ve.max_text_len,
                                _label, seed)

    def collate(self, items: list[dict], batch: dict) -> None:
        batch["labels"] = longs(items, "label")
        batch["index"] = longs(items, "index")

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        import torch.nn.functional as F

        logits = model.cls_logits(self.name, encode(model, batch))
        return classified(vqa_bce(logits, F.one_hot(batch["labels"], len(LABELS)).float()),
                          logits, batch["labels"])

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        rows = []
        for ex, p in predict(self, ctx, split, limit, accelerator,
                             lambda b: model.cls_logits(self.name, encode(model, b)).argmax(-1)):
            rows.append({"pairID": ex["id"], "image": ex["images"][0],
                         "hypothesis": ex["texts"][0], "prediction": LABELS[p],
                         "label": ex["label"], "correct": LABELS[p] == ex["label"]})
        return accuracy_rows(rows), rows

    def result_files(self, predictions: list[dict]) -> dict[str, Any]:
        return {RESULTS_FILE: [{"pairID": p["pairID"], "gold_label": p["prediction"]}
                               for p in predictions]}

    def score_files(self, predictions: Path, references: Path) -> tuple[dict, list[dict]]:
        from vlp_cli.readers.files import load_json
        from vlp_cli.readers.jsonl_lines import iter_jsonl

        data = load_json(predictions, "--predictions")
        if not (isinstance(data, list) and all(isinstance(d, dict) and "pairID" in d
                                               and d.get("gold_label") in LABELS
                                               for d in data)):
            raise VlpError(f"--predictions {predictions}: expected a list of {{\"pairID\", "
                           f"\"gold_label\"}} with labels among {', '.join(LABELS)}")
        preds = {d["pairID"]: d["gold_label"] for d in data}
        rows = []
        for where, rec in iter_jsonl(references, "--references", require="pairID"):
            if rec.get("gold_label") not in LABELS:
                continue  # SNLI's "-": no gold label, not scored (as in training)
            pid = rec["pairID"]
            if pid not in preds:
                raise VlpError(f"--predictions {predictions}: no label for pairID {pid!r} of "
                               f"{references}; answer every hypothesis of the file")
            rows.append({"pairID": pid, "prediction": preds[pid], "label": rec["gold_label"],
                         "correct": preds[pid] == rec["gold_label"]})
        if not rows:
            raise VlpError(f"--references {references}: no labelled hypotheses in it")
        return accuracy_rows(rows), rows


TASK = SnliVe()
