"""GQA: the VQA model (a classifier on [CLS] over an answer vocabulary) on GQA's questions,
scored as GQA's own evaluation scores accuracy, with its results format.

Recipe section `gqa` (config.GqaCfg, the fields of `vqa`). Reads the questions the GQA reader
writes (corpus kind "vqa", one answer each: exact match). Oscar and UNITER fine-tune GQA as
VQA; what differs is the report and the files:

- results file `gqa_results.json`, the submission format [{"questionId", "prediction"}];
- `vlp evaluate gqa --predictions F --references val_balanced_questions.json` scores such a
  file: accuracy (the prediction equal to the answer, as GQA's eval.py compares them) overall
  and per structural type (query, verify, logical, choose, compare). GQA's other measures
  (consistency, validity, plausibility, grounding, distribution) need its scene graphs and
  choices files and are not computed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.tasks.vqa import Vqa

if TYPE_CHECKING:
    from pathlib import Path

    from vlp_cli.model import VLPModel
    from vlp_cli.tasks.base import Context

RESULTS_FILE = "gqa_results.json"


class Gqa(Vqa):
    name = "gqa"
    help = "GQA question answering: accuracy (exact match), GQA's results format"
    metrics = ("accuracy", "questions")
    report = ("accuracy", "questions")
    headline = "accuracy"

    def legacy_heads(self, config: dict) -> list:
        return []  # vlp <= 0.2 had no GQA task

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        metrics, preds = super().evaluate(ctx, model, split, limit, accelerator)
        return {"accuracy": metrics["vqa_accuracy"], "questions": metrics["questions"]}, preds

    def result_files(self, predictions: list[dict]) -> dict[str, Any]:
        return {RESULTS_FILE: [{"questionId": str(p["qid"]), "prediction": p["prediction"]}
                               for p in predictions]}

    def score_files(self, predictions: Path, references: Path) -> tuple[dict, list[dict]]:
        from vlp_cli.readers.files import load_json

        data = load_json(predictions, "--predictions")
        if not (isinstance(data, list) and all(
                isinstance(d, dict) and isinstance(d.get("prediction"), str)
                and "questionId" in d for d in data)):
            raise VlpError(f"--predictions {predictions}: expected GQA's format, a list of "
                           "{\"questionId\", \"prediction\"}")
        preds = {str(d["questionId"]): d["prediction"] for d in data}
        questions = load_json(references, "--references")
        if not isinstance(questions, dict):
            raise VlpError(f"--references {references}: GQA questions are one object keyed "
                           "by question id")
        rows = []
        for qid, q in questions.items():
            if not isinstance(q, dict) or not isinstance(q.get("answer"), str):
                raise VlpError(f"--references {references} question {qid!r}: has no "
                               "'answer'; score against the train, val or testdev file")
            if qid not in preds:
                raise VlpError(f"--predictions {predictions}: no prediction for question "
                               f"{qid!r} of {references}; answer every question of the file")
            types = q.get("types") if isinstance(q.get("types"), dict) else {}
            rows.append({"qid": qid, "prediction": preds[qid], "answer": q["answer"],
                         "structural": types.get("structural"),
                         "correct": preds[qid] == q["answer"]})
        metrics: dict[str, Any] = {"accuracy": 100 * float(np.mean([r["correct"] for r in rows])),
                                   "questions": len(rows)}
        for kind in sorted({r["structural"] for r in rows if r["structural"]}):
            metrics[kind] = 100 * float(np.mean([r["correct"] for r in rows
                                                 if r["structural"] == kind]))
        return metrics, rows


TASK = Gqa()
