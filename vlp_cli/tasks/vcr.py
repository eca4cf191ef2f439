"""VCR: multiple choice on movie frames, Q->A (pick the answer) and QA->R (pick the rationale,
given the question and the right answer); Q->AR counts a question right when both are.

Recipe section `vcr` (config.VcrCfg). Reads corpus kind "vcr" (readers/vcr.py: texts
[second-stage text, question, 4 answers, 4 rationales], label {"answer", "rationale"}).

UNITER's model, which we follow: every (question, choice) is one sequence, `[CLS] question
[SEP] choice [SEP] tags [SEP]` + regions (QA->R: the question and the right answer, then the
rationale), scored by a 2-way classifier on [CLS] (Linear(H, 2H), GELU, LayerNorm,
Linear(2H, 2)) trained with cross-entropy on right / wrong; the choice with the highest
"right" logit is the prediction. Each question gives two training items, one per stage.
UNITER also gives the question and the choice token types of their own; here they keep
BERT's two (words 0, tags 1).

Second-stage pre-training (UNITER): `vlp pretrain` on a VCR corpus with the objectives reading
kind "vcr" (`--set mlm.text=[vcr] mrfr.text=[vcr] mrckl.text=[vcr]`), whose first text is
the question with its right answer and rationale.

Evaluation scores the rationales given each of the four answers (20 sequences a question), as
VCR's leaderboard wants them, so an unlabelled split (VCR's test file) is predicted too:
`vcr_leaderboard.csv` is the leaderboard's submission, `annot_id, answer_0..3,
rationale_conditioned_on_a{i}_{j}`; `vcr_results.json` keeps each question's answer
probabilities and the rationale's given the right answer (given the predicted one in an
unlabelled split). QA->R is read as the leaderboard reads it: the rationale argmax given the
right answer. `vlp evaluate vcr --predictions` scores either file.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.data.examples import ExampleBuilder, TaskDataset
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import (Context, Stats, Task, count_stat, encode, mean_stat,
                                sharded_map, split_indices)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vlp_cli.model import HeadSpec, VLPModel

logger = logging.getLogger(__name__)

KIND = "vcr"
CHOICES = 4
RESULTS_FILE = "vcr_results.json"
LEADERBOARD_FILE = "vcr_leaderboard.csv"
STAGES = ("q_a", "qa_r")
# The leaderboard's columns (r2c's models/README.md, "Submitting to the leaderboard").
LEADERBOARD_COLUMNS = ["annot_id", *(f"answer_{j}" for j in range(CHOICES)),
                       *(f"rationale_conditioned_on_a{i}_{j}" for i in range(CHOICES)
                         for j in range(CHOICES))]


class VcrDataset(TaskDataset):
    """Item 2k + s: question k at stage s (0: Q->A, 1: QA->R), its four sequences."""

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 max_text_len: int, seed: int = 0):
        super().__init__(corpus, builder, indices, seed)
        self.max_text_len = max_text_len

    def __len__(self) -> int:
        return 2 * len(self.indices)

    def __getitem__(self, i: int) -> list[dict]:
        idx = int(self.indices[i // 2])
        stage = i % 2
        ex = self.corpus.get(idx)
        seg, label = ex["segments"], ex["label"]
        right = label["rationale"] if stage else label["answer"]
        if stage == 1 and label["answer"] < 0:
            raise VlpError(f"{self.corpus.path}: VCR question {ex['id']} has no answer label; "
                           "QA->R needs the right answer (score the labelled val split)")
        context = seg[1] if stage == 0 else [*seg[1], *seg[2 + label["answer"]]]
        choices = seg[2:2 + CHOICES] if stage == 0 else seg[2 + CHOICES:2 + 2 * CHOICES]
        img = self.builder.regions(ex["images"][0])
        tags = self.builder.tag_ids(img.tag_classes)
        return [self.item(self.builder.text([*context, self.builder.sep_id, *c], tags,
                                            self.max_text_len), img,
                          label=int(j == right), right=right, index=idx, stage=stage)
                for j, c in enumerate(choices)]

    def units(self) -> np.ndarray:
        # Four sequences per item, each padded to the longest: Q->A the question and the
        # longest answer; QA->R the question, the right answer and the longest rationale.
        exs = [self.corpus.get(int(i)) for i in self.indices]
        regions, tags = self.builder.image_sizes([e["images"][0] for e in exs])
        if not self.builder.cfg.use_tags:
            tags = np.zeros_like(tags)
        out = np.zeros((2 * len(exs), 2), np.int64)
        for stage in (0, 1):
            words = np.array([_words(e["segments"], e["label"]["answer"], stage) for e in exs],
                             np.int64)
            text = self.builder.text_lengths(words, tags, self.max_text_len)
            out[stage::2] = CHOICES * np.stack([text, regions], 1)
        return out


class VcrEvalDataset(VcrDataset):
    """Item 5k + g: question k, group g: 0 its four answers (Q->A), 1 + a its four rationales
    given answer a (QA->R given each answer, as the leaderboard scores them); labels unused."""

    def __len__(self) -> int:
        return (1 + CHOICES) * len(self.indices)

    def __getitem__(self, i: int) -> list[dict]:
        idx = int(self.indices[i // (1 + CHOICES)])
        g = i % (1 + CHOICES)
        ex = self.corpus.get(idx)
        seg = ex["segments"]
        context = seg[1] if g == 0 else [*seg[1], *seg[2 + g - 1]]
        choices = seg[2:2 + CHOICES] if g == 0 else seg[2 + CHOICES:2 + 2 * CHOICES]
        img = self.builder.regions(ex["images"][0])
        tags = self.builder.tag_ids(img.tag_classes)
        return [self.item(self.builder.text([*context, self.builder.sep_id, *c], tags,
                                            self.max_text_len), img,
                          label=0, right=0, index=idx, stage=int(g > 0))
                for c in choices]


def _words(seg: list[list[int]], answer: int, stage: int) -> int:
    """The longest word count of a question's four sequences at a stage (with the [SEP])."""
    if stage == 0:
        return len(seg[1]) + 1 + max(len(s) for s in seg[2:2 + CHOICES])
    a = len(seg[2 + answer]) if answer >= 0 else max(len(s) for s in seg[2:2 + CHOICES])
    return len(seg[1]) + a + 1 + max(len(s) for s in seg[2 + CHOICES:])


def vcr_metrics(rows: list[dict]) -> dict:
    labelled = [r for r in rows if r["answer"] >= 0 and r["rationale"] >= 0]
    if not labelled:
        return {"q_a": None, "qa_r": None, "q_ar": None, "questions": len(rows)}
    qa = [r["answer_pred"] == r["answer"] for r in labelled]
    qar = [r["rationale_pred"] == r["rationale"] for r in labelled]
    return {"q_a": 100 * float(np.mean(qa)), "qa_r": 100 * float(np.mean(qar)),
            "q_ar": 100 * float(np.mean(np.logical_and(qa, qar))), "questions": len(rows)}


class Vcr(Task):
    name = "vcr"
    help = "VCR multiple choice: Q->A, QA->R and Q->AR accuracy"
    kinds = (KIND,)
    metrics = ("q_a", "qa_r", "q_ar", "questions")
    report = ("q_a", "qa_r", "q_ar", "questions")
    headline = "q_ar"
    select = "acc"

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        return [HeadSpec(self.name, "mlp", 2)]

    def dataset(self, ctx: Context, split: str, seed: int) -> VcrDataset:
        return VcrDataset(ctx.corpus, ctx.builder, split_indices(ctx.corpus, KIND, split),
                          self.recipe.vcr.max_text_len, seed)

    def collate(self, items: list[dict], batch: dict) -> None:
        import torch

        batch["labels"] = torch.as_tensor([x["label"] for x in items], dtype=torch.long)
        batch["right"] = torch.as_tensor([x["right"] for x in items[::CHOICES]],
                                         dtype=torch.long)

    def choice_scores(self, model: VLPModel,
                      batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of every sequence [4B, 2] (the loss) and the "right" logit of each
        choice, [B, 4]."""
        logits = model.cls_logits(self.name, encode(model, batch)).float()
        return logits, logits[:, 1].view(-1, CHOICES)

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        import torch.nn.functional as F

        logits, scores = self.choice_scores(model, batch)
        loss = F.cross_entropy(logits, batch["labels"])
        b = scores.shape[0]
        acc = (scores.argmax(-1) == batch["right"]).sum()
        return loss, {"loss": mean_stat(loss, logits.shape[0]), "acc": count_stat(acc, b)}

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        from vlp_cli.data.datasets import Collator

        ds = VcrEvalDataset(ctx.corpus, ctx.builder, ctx.corpus.require(KIND, split)[:limit],
                            self.recipe.vcr.max_text_len)
        probs = sharded_map(accelerator, ds, Collator(ctx.builder.pad_id, self.collate),
                            lambda b: self.choice_scores(model, b)[1].softmax(-1),
                            self.recipe.vcr.train.batch_size, "vcr eval").numpy()
        rows = []
        for k, i in enumerate(ds.indices.tolist()):
            ex = ctx.corpus.get(i)
            group = probs[(1 + CHOICES) * k:(1 + CHOICES) * (k + 1)]
            a, given = group[0], group[1:]  # [4], [4 answers, 4 rationales]
            # the rationale given the right answer (the predicted one when unlabelled)
            r = given[ex["label"]["answer"] if ex["label"]["answer"] >= 0 else int(a.argmax())]
            rows.append({"annot_id": ex["id"], "answer_probs": a.tolist(),
                         "rationale_probs": r.tolist(),
                         "rationale_probs_given": given.tolist(),
                         "answer_pred": int(a.argmax()), "rationale_pred": int(r.argmax()),
                         **ex["label"]})
        unlabelled = sum(min(r["answer"], r["rationale"]) < 0 for r in rows)
        if unlabelled:
            logger.info("%d of %d questions have no labels (VCR's test file): predicted, not "
                        "scored; %s is the leaderboard's submission", unlabelled, len(rows),
                        LEADERBOARD_FILE)
        return vcr_metrics(rows), rows

    def result_files(self, predictions: list[dict]) -> dict[str, Any]:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(LEADERBOARD_COLUMNS)
        for p in predictions:
            w.writerow([p["annot_id"], *p["answer_probs"],
                        *(x for row in p["rationale_probs_given"] for x in row)])
        return {RESULTS_FILE: [{k: p[k] for k in ("annot_id", "answer_probs",
                                                  "rationale_probs")} for p in predictions],
                LEADERBOARD_FILE: buf.getvalue()}

    def score_files(self, predictions: Path, references: Path) -> tuple[dict, list[dict]]:
        from vlp_cli.readers.files import load_json

        if predictions.suffix.lower() == ".csv":
            return self._score_leaderboard(predictions, references)
        data = load_json(predictions, "--predictions")
        ok = isinstance(data, list) and all(
            isinstance(d, dict) and "annot_id" in d and all(
                isinstance(d.get(k), list) and len(d[k]) == CHOICES
                for k in ("answer_probs", "rationale_probs")) for d in data)
        if not ok:
            raise VlpError(f"--predictions {predictions}: expected a list of {{\"annot_id\", "
                           f"\"answer_probs\": [{CHOICES}], \"rationale_probs\": [{CHOICES}]}}")
        preds = {d["annot_id"]: (d["answer_probs"], d["rationale_probs"]) for d in data}
        return _scored(preds, predictions, references)

    def _score_leaderboard(self, predictions: Path, references: Path) -> tuple[dict,
                                                                              list[dict]]:
        """A leaderboard CSV, scored as the leaderboard scores it: the answer argmax, and the
        rationale argmax among the columns conditioned on the right answer."""
        try:
            text = predictions.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise VlpError(f"--predictions {predictions}: cannot be read ({exc})") from None
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in LEADERBOARD_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise VlpError(f"--predictions {predictions}: not VCR's leaderboard CSV, no "
                           f"column {missing[0]!r} (the header is annot_id, answer_0..3, "
                           "rationale_conditioned_on_a{i}_{j})")
        preds: dict[str, Any] = {}
        for n, row in enumerate(reader, 2):
            try:
                v = [float(row[c]) for c in LEADERBOARD_COLUMNS[1:]]
            except (TypeError, ValueError):
                raise VlpError(f"--predictions {predictions} line {n}: every column but "
                               "annot_id is a number") from None
            # the rationales given each answer: the scoring picks the right answer's
            preds[row["annot_id"]] = (v[:CHOICES], [v[CHOICES * (1 + i):CHOICES * (2 + i)]
                                                    for i in range(CHOICES)])
        return _scored(preds, predictions, references)


def _scored(preds: dict[str, tuple], predictions: Path,
            references: Path) -> tuple[dict, list[dict]]:
    """Rows and metrics of predictions {annot_id: (answer probs, rationale probs)} against a
    labelled VCR file; the rationale probs are given the right answer, or a list of them
    given each answer (the leaderboard's), of which the right answer's is read."""
    from vlp_cli.readers import vcr

    rows = []
    for e in vcr.read(str(references), references.parent):
        a = e["label"]["answer"]
        if min(e["label"].values()) < 0:
            raise VlpError(f"--references {references}: question {e['id']} has no labels "
                           "(VCR's test file): score against the val file")
        if e["id"] not in preds:
            raise VlpError(f"--predictions {predictions}: no probabilities for {e['id']!r} "
                           f"of {references}; answer every question")
        answer, rationale = preds[e["id"]]
        if rationale and isinstance(rationale[0], list):
            rationale = rationale[a]
        rows.append({"annot_id": e["id"], "answer_pred": int(np.argmax(answer)),
                     "rationale_pred": int(np.argmax(rationale)), **e["label"]})
    return vcr_metrics(rows), rows


TASK = Vcr()
