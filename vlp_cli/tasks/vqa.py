"""VQA: question + tags + regions -> a classifier over an answer vocabulary (soft BCE targets).

Recipe section `vqa` (config.VqaCfg). The answer vocabulary is this task's state: the most
frequent normalised answers of the train and val questions (`vqa.max_answers`), computed when
fine-tuning starts and kept in the checkpoint. Corpus examples of kind "vqa" carry the
annotators' answers as their label.

Answer normalisation and soft accuracy (vqa_eval.py) reproduce the official evaluation script,
including its quirks, so that accuracies are comparable with published numbers.

Two ways to answer (`vqa.classifier`): Oscar's and UNITER's, a fresh classifier on the pooled
[CLS] ("mlp", "linear"), trained with BCE against the soft scores; or "masked_tokens" (not in
the papers; prompt-style answering as later work does it): a [MASK] follows the question and
the pre-training's own masked-token head scores each answer at it, an answer being the mean of
its word pieces' output embeddings, trained with cross-entropy against the soft scores
normalised to sum 1 (the head was pre-trained with a softmax). The circuit that pre-training
built for filling a caption's word from the tags and regions then answers from the first step;
the [CLS] classifier has to grow its own, which the scene set's questions do not give it in a
few minutes (README, "Does every task learn?").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.data.examples import ExampleBuilder, ImageInput, TaskDataset, truncate_pair
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import (Context, Stats, Task, encode, longs, mean_stat, sharded_map,
                                split_indices)
from vlp_cli.tasks.vqa_eval import (build_answer_vocab, normalize_vqa_answer, vqa_accuracy,
                                    vqa_target_scores)

__all__ = ["Vqa", "VqaDataset", "TASK", "build_answer_vocab", "normalize_vqa_answer",
           "vqa_accuracy", "vqa_target_scores"]

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vlp_cli.model import HeadSpec, VLPModel

logger = logging.getLogger(__name__)

KIND = "vqa"  # the corpus kind of questions
MLM_HEAD = "mlm"  # the masked-token head of pre-training (tasks/mlm.py, tasks/oscar.py)
RESULTS_FILE = "vqa_results.json"  # evaluate's results file, the evaluation server's format

# -- the task ------------------------------------------------------------------------------------


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the soft scores normalised to sum 1, averaged over the questions
    that have a scored answer (one with none teaches nothing)."""
    import torch

    mass = targets.sum(-1)
    has = mass > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    p = targets[has] / mass[has, None]
    return -(p * torch.log_softmax(logits[has].float(), -1)).sum(-1).mean()


def question_text(builder: ExampleBuilder, words: list[int], tags: list[int], max_len: int,
                  mask: bool) -> tuple[Any, int]:
    """`[CLS] question [MASK]? [SEP] tags [SEP]` within max_len, the [MASK] kept whatever is
    cut; returns the text and the [MASK]'s position (0, [CLS], without one)."""
    if not mask:
        return builder.text(words, tags, max_len), 0
    a, b = truncate_pair(words, tags, max_len - 4) if tags else (words[: max_len - 3], [])
    text = builder.text([*a, builder.mask_id], b, max_len)
    return text, 1 + len(a)


def vqa_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    """BCE against soft answer scores, summed over answers and averaged over questions.

    This is the bottom-up-attention `instance_bce_with_logits` that Oscar and UNITER use (mean
    over all entries times the number of answers), so learning rates transfer.
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="mean")
    return loss * targets.size(1)


class VqaDataset(TaskDataset):
    """Question + tags + regions; soft answer scores as targets (BCE)."""

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 max_text_len: int, answers: list[str], seed: int = 0, mask: bool = False):
        super().__init__(corpus, builder, indices, seed)
        self.max_text_len = max_text_len
        self.answer_index = {a: i for i, a in enumerate(answers)}
        self.mask = mask

    def __getitem__(self, i: int) -> dict:
        ex = self.corpus.get(int(self.indices[i]))
        img = self.builder.regions(ex["images"][0])
        text, at = question_text(self.builder, list(ex["segments"][0]),
                                 self.builder.tag_ids(img.tag_classes), self.max_text_len,
                                 self.mask)
        kept = [(self.answer_index[a], s) for a, s in vqa_target_scores(ex["label"]).items()
                if a in self.answer_index]
        return self.item(text, img, vqa_labels=[a for a, _ in kept],
                         vqa_scores=[s for _, s in kept], index=int(self.indices[i]),
                         answer_pos=at)


def answer_balanced(corpus: Corpus, idx: np.ndarray, power: float, seed: int) -> np.ndarray:
    """`idx` resampled (as many, with replacement, fixed by `seed`) so that a question whose most
    common answer is `a` comes with weight count(a)^-power: an epoch of the usual length whose
    answers are flattened. Fixed by the seed, so a resumed run draws the same epoch."""
    from collections import Counter

    top = {}
    for i in idx.tolist():
        scores = vqa_target_scores(corpus.get(i)["label"])
        top[i] = max(scores, key=scores.get) if scores else ""
    count = Counter(top.values())
    w = np.array([count[top[i]] ** -power for i in idx.tolist()], dtype=np.float64)
    out = np.random.default_rng(seed).choice(idx, size=len(idx), replace=True, p=w / w.sum())
    drawn = Counter(top[i] for i in out.tolist()).most_common(4)
    logger.info("answer_balance %.2f: %d train questions resampled; most drawn: %s", power,
                len(out), ", ".join(f"{a} {100 * n / len(out):.1f}%" for a, n in drawn))
    return out


def warn_unscorable(corpus: Corpus, answers: list[str], split: str) -> int:
    """Count (and log) questions of `split` none of whose answers is in the vocabulary:
    whatever the model answers, they score 0."""
    vocab = set(answers)
    exs = [corpus.get(int(i)) for i in corpus.indices(KIND, split)]
    lost = [e for e in exs if not vocab.intersection(normalize_vqa_answer(a) for a in e["label"])]
    if lost:
        logger.warning("%d of %d %s questions have no answer in the %d-answer vocabulary: they "
                       "score 0 whatever the model answers", len(lost), len(exs), split,
                       len(answers))
    return len(lost)


class Vqa(Task):
    name = "vqa"
    help = "visual question answering: accuracy (the official soft VQA score)"
    kinds = (KIND,)
    metrics = ("vqa_accuracy", "questions")
    report = ("vqa_accuracy", "yes/no", "other", "questions")
    headline = "vqa_accuracy"
    select = "vqa_score"
    _pieces: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def masked(self) -> bool:
        """Answers read at a [MASK] by the masked-token head: as the checkpoint was trained
        (its state keeps the answers' pieces), else as `vqa.classifier` asks."""
        state = getattr(self, "state", None)
        if state and "answers" in state:
            return "answer_pieces" in state
        recipe = getattr(self, "recipe", None)
        return recipe is not None and self.section(recipe).classifier == "masked_tokens"

    @property
    def uses_pooler(self) -> bool:  # type: ignore[override]
        return not self.masked

    @property
    def pretrained_heads(self) -> tuple[str, ...]:  # type: ignore[override]
        return (MLM_HEAD,) if self.masked else ()

    def prepare(self, ctx: Context) -> dict:
        c = ctx.corpus
        idx = np.concatenate([c.indices(KIND, "train"), c.indices(KIND, "val")])
        if len(idx) == 0:
            raise VlpError(f"corpus {c.path} has no questions (kind '{KIND}') in train or val: "
                           "build it from questions")
        stored = c.meta.get("answers")
        if c.schema < 3 and stored:
            # A corpus of vlp <= 0.2 carries the vocabulary its build chose: keep it.
            logger.info("%s: using the %d-answer vocabulary stored by vlp 0.2", c.path,
                        len(stored))
            answers = list(stored)
        else:
            answers = build_answer_vocab((c.get(int(i))["label"] for i in idx),
                                         max_size=self.section(self.recipe).max_answers)
        warn_unscorable(c, answers, "test")
        if not self.masked:
            return {"answers": answers}
        unk = int(ctx.tokenizer.unk_token_id)
        pieces = [ctx.tokenizer(a, add_special_tokens=False).input_ids or [unk] for a in answers]
        return {"answers": answers, "answer_pieces": pieces}

    def state_from_meta(self, meta: dict) -> dict:
        state = super().state_from_meta(meta)
        if not state and "answers" in meta:  # checkpoints of vlp <= 0.2
            state = {"answers": meta["answers"]}
        return state

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        if self.masked:  # the pre-training's own (tasks/mlm.py declares the same spec)
            return [HeadSpec(MLM_HEAD, "masked_tokens", init="bert_mlm")]
        return [HeadSpec(self.name, self.section(self.recipe).classifier,
                         len(self.state["answers"]))]

    def logits(self, model: VLPModel, batch: dict, hidden: torch.Tensor) -> torch.Tensor:
        """One score per answer: [B, answers]."""
        if not self.masked:
            return model.cls_logits(self.name, hidden)
        import torch

        if self._pieces is None or self._pieces[0].device != hidden.device:
            rows = self.state["answer_pieces"]
            k = max(len(r) for r in rows)
            pieces = torch.zeros((len(rows), k), dtype=torch.long)
            weights = torch.zeros((len(rows), k), dtype=torch.float32)
            for i, r in enumerate(rows):
                pieces[i, :len(r)] = torch.as_tensor(r)
                weights[i, :len(r)] = 1.0 / len(r)
            self._pieces = (pieces.to(hidden.device), weights.to(hidden.device))
        at = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["answer_pos"]]
        return model.word_choice_logits(MLM_HEAD, at, *self._pieces)

    def bind(self, recipe: Any, state: dict | None = None) -> Vqa:
        self._pieces = None  # the answers' pieces as tensors, made on first use
        return super().bind(recipe, state)

    def legacy_heads(self, config: dict) -> list[tuple[str, HeadSpec]]:
        from vlp_cli.model import HeadSpec

        n = int(config.get("num_answers", 0))
        return [("vqa_head", HeadSpec(self.name, config.get("vqa_classifier", "mlp"), n))] \
            if n > 0 else []

    def dataset(self, ctx: Context, split: str, seed: int) -> VqaDataset:
        idx = split_indices(ctx.corpus, KIND, split)
        power = self.section(self.recipe).answer_balance
        if split == "train" and power > 0:
            idx = answer_balanced(ctx.corpus, idx, power, seed)
        return VqaDataset(ctx.corpus, ctx.builder, idx, self.section(self.recipe).max_text_len,
                          self.state["answers"], seed, mask=self.masked)

    def collate(self, items: list[dict], batch: dict) -> None:
        import torch

        target = torch.zeros((len(items), len(self.state["answers"])), dtype=torch.float32)
        for i, x in enumerate(items):
            for a, s in zip(x["vqa_labels"], x["vqa_scores"]):
                target[i, a] = s
        batch["vqa_targets"] = target
        batch["index"] = longs(items, "index")
        batch["answer_pos"] = longs(items, "answer_pos")

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        import torch

        hidden = encode(model, batch)
        logits = self.logits(model, batch, hidden)
        loss = (soft_cross_entropy if self.masked else vqa_bce)(logits, batch["vqa_targets"])
        b = logits.shape[0]
        # The score the top answer earns: exact VQA accuracy when targets are the official scores.
        top = batch["vqa_targets"].gather(1, logits.argmax(-1, keepdim=True)).sum()
        n = torch.as_tensor(float(b), device=logits.device)
        return loss, {"loss": mean_stat(loss, b), "vqa_score": (top.detach().float(), n)}

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        from vlp_cli.data.datasets import Collator

        answers = self.state["answers"]
        warn_unscorable(ctx.corpus, answers, split)
        ds = self.dataset(ctx, split, 0)
        ds.indices = ctx.corpus.require(KIND, split)[:limit]
        top = sharded_map(accelerator, ds, Collator(ctx.builder.pad_id, self.collate),
                          lambda b: self.logits(model, b, encode(model, b)).argmax(-1),
                          self.section(self.recipe).train.batch_size * 2, "vqa eval")
        preds: list[dict] = []
        for i, a in zip(ds.indices.tolist(), top.tolist()):
            ex = ctx.corpus.get(i)
            preds.append({"qid": ex["id"], "image": ex["images"][0], "question": ex["texts"][0],
                          "prediction": answers[a], "answers": ex["label"],
                          "accuracy": vqa_accuracy(answers[a], ex["label"])})
        acc = [p["accuracy"] for p in preds]
        yes_no = [p["accuracy"] for p in preds if p["answers"][0].lower() in ("yes", "no")]
        other = [p["accuracy"] for p in preds if p["answers"][0].lower() not in ("yes", "no")]
        metrics = {"vqa_accuracy": 100 * float(np.mean(acc)), "questions": len(preds),
                   "yes/no": 100 * float(np.mean(yes_no)) if yes_no else None,
                   "other": 100 * float(np.mean(other)) if other else None}
        return metrics, preds

    def result_files(self, predictions: list[dict]) -> dict[str, Any]:
        """The evaluation server's format, [{"question_id", "answer"}]: written when every
        question id is an integer (VQA v2's; easy-VQA's ids are strings)."""
        if not predictions or not all(_int_id(p["qid"]) is not None for p in predictions):
            return {}
        return {RESULTS_FILE: [{"question_id": _int_id(p["qid"]), "answer": p["prediction"]}
                               for p in predictions]}

    def score_files(self, predictions: Path, references: Path) -> tuple[dict, list[dict]]:
        """Another system's VQA results file against the official annotations: accuracy
        overall and per answer type, as the official evaluation computes them (each question's
        soft accuracy; the means x 100)."""
        from vlp_cli import VlpError
        from vlp_cli.readers.vqa_v2 import read_annotations, read_results

        preds, anns = read_results(predictions), read_annotations(references)
        if not preds:
            raise VlpError(f"--predictions {predictions}: no answers in it")
        missing = [q for q in preds if q not in anns]
        if missing:
            raise VlpError(f"--predictions {predictions}: {len(missing)} of {len(preds)} "
                           f"questions are not in {references} (first: {missing[0]}); score "
                           "against the annotations of the same split")
        if len(preds) < len(anns):  # the official evaluation refuses partial results too
            unanswered = sorted(set(anns) - set(preds))
            raise VlpError(f"--predictions {predictions}: {len(unanswered)} questions of "
                           f"{references} have no answer (first: {unanswered[0]}); answer "
                           "every question of the split")
        rows = []
        for q in sorted(preds):
            a = anns[q]
            rows.append({"qid": q, "prediction": preds[q], "answers": a["answers"],
                         "answer_type": a["answer_type"],
                         "accuracy": vqa_accuracy(preds[q], a["answers"])})
        metrics: dict[str, Any] = {"vqa_accuracy": 100 * float(np.mean(
            [r["accuracy"] for r in rows])), "questions": len(rows)}
        for kind in sorted({str(r["answer_type"]) for r in rows if r["answer_type"]}):
            metrics[kind] = 100 * float(np.mean([r["accuracy"] for r in rows
                                                 if r["answer_type"] == kind]))
        return metrics, rows

    def answer(self, model: VLPModel, builder: ExampleBuilder, images: list[ImageInput],
               questions: list[str], tokenizer: Any, device: torch.device,
               top: int = 5) -> list[list[tuple[str, float]]]:
        """The `top` answers to each (image, question) pair with their scores: the head's
        sigmoid, an estimate of the VQA soft score the answer would earn (vlp answer)."""
        import torch

        from vlp_cli.data.datasets import Collator

        answers = self.state["answers"]
        items = []
        for img, q in zip(images, questions):
            text, at = question_text(builder, tokenizer(q, add_special_tokens=False).input_ids,
                                     builder.tag_ids(img.tag_classes),
                                     self.section(self.recipe).max_text_len, self.masked)
            items.append(TaskDataset.item(text, img, answer_pos=at))
        model.eval()
        with torch.no_grad():
            batch = Collator(builder.pad_id)(items)
            batch["answer_pos"] = longs(items, "answer_pos")
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = self.logits(model, batch, encode(model, batch)).float()
            # the head's sigmoid estimates the soft score; the masked head's softmax shares
            # one unit among the answers
            probs = logits.softmax(-1) if self.masked else logits.sigmoid()
            scores, idx = probs.topk(min(top, len(answers)), dim=-1)
        return [[(answers[i], float(s)) for s, i in zip(srow, irow)]
                for srow, irow in zip(scores.tolist(), idx.tolist())]


def _int_id(qid: Any) -> int | None:
    if isinstance(qid, int):
        return qid
    return int(qid) if isinstance(qid, str) and qid.isdigit() else None


TASK = Vqa()
