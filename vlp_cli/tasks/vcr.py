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

The results file `vcr_results.json` holds each question's answer and rationale probabilities
(the rationale's given the right answer); VCR's leaderboard wants rationale probabilities
given each of the four answers, which this file does not have.
"""

from __future__ import annotations

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

KIND = "vcr"
CHOICES = 4
RESULTS_FILE = "vcr_results.json"
STAGES = ("q_a", "qa_r")


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

        ds = self.dataset(ctx, split, 0)
        ds.indices = ctx.corpus.require(KIND, split)[:limit]
        unlabelled = [int(i) for i in ds.indices if ctx.corpus.get(int(i))["label"]["answer"] < 0]
        if unlabelled:
            raise VlpError(f"corpus {ctx.corpus.path}: {len(unlabelled)} '{split}' questions "
                           "have no labels (VCR's test file): evaluate the val split; QA->R "
                           "needs the right answer")
        probs = sharded_map(accelerator, ds, Collator(ctx.builder.pad_id, self.collate),
                            lambda b: self.choice_scores(model, b)[1].softmax(-1),
                            self.recipe.vcr.train.batch_size, "vcr eval").numpy()
        rows = []
        for k, i in enumerate(ds.indices.tolist()):
            ex = ctx.corpus.get(i)
            a, r = probs[2 * k], probs[2 * k + 1]
            rows.append({"annot_id": ex["id"], "answer_probs": a.tolist(),
                         "rationale_probs": r.tolist(), "answer_pred": int(a.argmax()),
                         "rationale_pred": int(r.argmax()), **ex["label"]})
        return vcr_metrics(rows), rows

    def result_files(self, predictions: list[dict]) -> dict[str, Any]:
        return {RESULTS_FILE: [{k: p[k] for k in ("annot_id", "answer_probs",
                                                  "rationale_probs")} for p in predictions]}

    def score_files(self, predictions: Path, references: Path) -> tuple[dict, list[dict]]:
        from vlp_cli.readers import vcr
        from vlp_cli.readers.files import load_json

        data = load_json(predictions, "--predictions")
        ok = isinstance(data, list) and all(
            isinstance(d, dict) and "annot_id" in d and all(
                isinstance(d.get(k), list) and len(d[k]) == CHOICES
                for k in ("answer_probs", "rationale_probs")) for d in data)
        if not ok:
            raise VlpError(f"--predictions {predictions}: expected a list of {{\"annot_id\", "
                           f"\"answer_probs\": [{CHOICES}], \"rationale_probs\": [{CHOICES}]}}")
        preds = {d["annot_id"]: d for d in data}
        rows = []
        for e in vcr.read(str(references), references.parent):
            if min(e["label"].values()) < 0:
                raise VlpError(f"--references {references}: question {e['id']} has no labels "
                               "(VCR's test file): score against the val file")
            d = preds.get(e["id"])
            if d is None:
                raise VlpError(f"--predictions {predictions}: no probabilities for "
                               f"{e['id']!r} of {references}; answer every question")
            rows.append({"annot_id": e["id"], "answer_pred": int(np.argmax(d["answer_probs"])),
                         "rationale_pred": int(np.argmax(d["rationale_probs"])), **e["label"]})
        return vcr_metrics(rows), rows


TASK = Vcr()
