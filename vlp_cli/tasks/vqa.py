"""VQA: question + tags + regions -> a classifier over an answer vocabulary (soft BCE targets).

Recipe section `vqa` (config.VqaCfg). The answer vocabulary is this task's state: the most
frequent normalised answers of the train and val questions (`vqa.max_answers`), computed when
fine-tuning starts and kept in the checkpoint. Corpus examples of kind "vqa" carry the
annotators' answers as their label.

Answer normalisation and soft accuracy reproduce the official evaluation script
(GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, current master),
including its quirks, so that accuracies are comparable with published numbers.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.data.examples import ExampleBuilder, ImageInput, TaskDataset
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import (Context, Stats, Task, encode, longs, mean_stat, sharded_map,
                                split_indices)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vlp_cli.model import HeadSpec, VLPModel

logger = logging.getLogger(__name__)

KIND = "vqa"  # the corpus kind of questions
RESULTS_FILE = "vqa_results.json"  # evaluate's results file, the evaluation server's format

# -- the official evaluation ---------------------------------------------------------------------

# Data tables of the official VQA evaluation script (master, after the 2016 apostrophe fix and
# the 2021 "processing answers" fix). They are reproduced verbatim, oddities included: the keys
# with capitals ("Im", "Ive", ...) can never match because answers are lower-cased first, and
# "somebody'd" maps to "somebodyd". Changing them would change accuracies.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Neither the apostrophe nor the colon is in the official list (they were in the 2015 beta
# script), so "don't" survives punctuation processing and can match the contractions table.
_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# The official pattern is kept character for character. "(?!<=\d)" was meant as a look-behind
# but is a look-ahead that can never fail in front of a ".", so in effect every period that is
# not followed by a digit is deleted ("yes." -> "yes", "3.5" stays, "5." -> "5").
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in the ``count``
# slot, so at most re.UNICODE (== 32) periods are removed. Reproduced for exactness.
_PERIOD_STRIP_MAX = int(re.UNICODE)


def _clean_whitespace(text: str) -> str:
    """Apply the official pre-cleaning: newlines and tabs to spaces, then strip.

    Args:
        text: A raw answer.

    Returns:
        The answer with newlines and tabs turned into spaces and outer whitespace removed.
    """
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """Reproduce ``VQAEval.processPunctuation``.

    Args:
        text: An answer after whitespace cleaning.

    Returns:
        The answer with punctuation removed or replaced by spaces, exactly as officially done.
    """
    # A digit-comma-digit anywhere ("1,000") makes *every* listed punctuation mark vanish
    # rather than become a space, and each mark's fate is decided on the input text, not on
    # the partially processed one: both are quirks of the official loop.
    delete_all = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in _PUNCT:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_MAX)


def _process_digit_article(text: str) -> str:
    """Reproduce ``VQAEval.processDigitArticle``.

    Args:
        text: An answer after punctuation processing.

    Returns:
        Lower-cased words with number words as digits, articles dropped, contractions fixed.
    """
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(ans: str) -> str:
    """Normalise an answer the way the official VQA evaluation does when it normalises.

    Whitespace cleaning, then ``processPunctuation``, then ``processDigitArticle``. Note that
    :func:`vqa_accuracy` does not always normalise (see there); this function always does, which
    is what training targets and answer vocabularies need.

    Args:
        ans: A raw answer string.

    Returns:
        The normalised answer, e.g. ``"Two dogs."`` -> ``"2 dogs"``, ``"dont"`` -> ``"don't"``.
        It can be empty (``"the"`` -> ``""``).
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(ans)))


def _leave_one_out_accuracy(matches: int, num_answers: int) -> float:
    """Average of min(1, matches among the others / 3) over the leave-one-out subsets.

    Leaving out one of the ``matches`` agreeing humans leaves ``matches - 1`` agreeing; leaving
    out one of the others leaves ``matches``. Summing both groups gives the official average
    without looping (with ten answers: 0, 0.3, 0.6, 0.9, then 1.0 from four matches on).

    Args:
        matches: How many human answers equal the prediction.
        num_answers: How many human answers there are (at least 2).

    Returns:
        The soft accuracy in [0, 1].
    """
    if matches == 0:
        return 0.0
    left_out_match = matches * min(1.0, (matches - 1) / 3.0)
    left_out_other = (num_answers - matches) * min(1.0, matches / 3.0)
    return (left_out_match + left_out_other) / num_answers


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Score one predicted answer against the human answers, as the official evaluation does.

    With several human answers (VQA v2 has ten) this is the official soft accuracy: the mean,
    over the leave-one-out subsets, of ``min(1, #matches / 3)``. Exactly as in the official
    script, the answers *and the prediction* are normalised only when the human answers are not
    all identical (after whitespace cleaning); when they are all identical the prediction must
    equal them verbatim, so ten ``"yes"`` against ``"Yes"`` scores 0 here as it does on the
    evaluation server.

    With exactly one answer (easy-VQA, GQA) the leave-one-out average is undefined (it would
    always be 0), so the score is exact match after normalising both sides.

    Args:
        prediction: The model's answer.
        answers: The ground-truth answers for the question.

    Returns:
        The accuracy in [0, 1].

    Raises:
        ValueError: If ``answers`` is empty.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    if len(answers) == 1:
        return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answers[0]))
    pred = _clean_whitespace(prediction)
    gts = [_clean_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [_process_digit_article(_process_punctuation(a)) for a in gts]
        pred = _process_digit_article(_process_punctuation(pred))
    matches = sum(gt == pred for gt in gts)
    return _leave_one_out_accuracy(matches, len(gts))


def vqa_target_scores(answers: list[str]) -> dict[str, float]:
    """Soft training targets for one question: the accuracy each distinct answer would earn.

    Answers are normalised first (as the bottom-up-attention, Oscar and UNITER preprocessing
    does); each distinct normalised answer gets the official leave-one-out accuracy for its
    count, i.e. 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >=4 occurrences among ten answers. A
    question with a single answer gets ``{answer: 1.0}``. Answers that normalise to the empty
    string (e.g. ``"the"``) are dropped; they still count in the denominator.

    Args:
        answers: The ground-truth answers for the question.

    Returns:
        Mapping from normalised answer to target score in (0, 1].

    Raises:
        ValueError: If ``answers`` is empty.
    """
    if not answers:
        raise ValueError("vqa_target_scores needs at least one ground-truth answer")
    normalised = [normalize_vqa_answer(a) for a in answers]
    if len(normalised) == 1:
        return {normalised[0]: 1.0} if normalised[0] else {}
    counts = Counter(a for a in normalised if a)
    return {
        answer: _leave_one_out_accuracy(count, len(normalised))
        for answer, count in sorted(counts.items())
    }


def build_answer_vocab(
    answer_lists: Iterable[list[str]], max_size: int | None, min_count: int = 1
) -> list[str]:
    """Build the answer classifier's vocabulary from the training answers.

    An answer's frequency is the number of questions in which it occurs (after normalisation),
    so one question's ten identical "yes" count once. Passing one-element lists holding each
    question's ``multiple_choice_answer`` with ``min_count=9`` follows the bottom-up-attention
    recipe behind the usual VQA v2 vocabulary of 3,129 answers; ``max_size=3129`` keeps the
    3,129 most frequent instead.

    Args:
        answer_lists: For each training question, its ground-truth answers.
        max_size: Keep at most this many answers (``None`` for no limit).
        min_count: Drop answers occurring in fewer questions than this.

    Returns:
        Normalised answers, most frequent first, ties in alphabetical order (deterministic).

    Raises:
        ValueError: If ``max_size`` is negative or ``min_count`` is below 1.
    """
    if max_size is not None and max_size < 0:
        raise ValueError(f"max_size must be >= 0 or None, got {max_size}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts: Counter[str] = Counter()
    for answers in answer_lists:
        counts.update({a for a in (normalize_vqa_answer(x) for x in answers) if a})
    ranked = sorted(
        (item for item in counts.items() if item[1] >= min_count),
        key=lambda item: (-item[1], item[0]),
    )
    vocab = [answer for answer, _ in ranked]
    return vocab if max_size is None else vocab[:max_size]



# -- the task ------------------------------------------------------------------------------------


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
                 max_text_len: int, answers: list[str], seed: int = 0):
        super().__init__(corpus, builder, indices, seed)
        self.max_text_len = max_text_len
        self.answer_index = {a: i for i, a in enumerate(answers)}

    def __getitem__(self, i: int) -> dict:
        ex = self.corpus.get(int(self.indices[i]))
        img = self.builder.regions(ex["images"][0])
        text = self.builder.text(ex["segments"][0], self.builder.tag_ids(img.tag_classes),
                                 self.max_text_len)
        kept = [(self.answer_index[a], s) for a, s in vqa_target_scores(ex["label"]).items()
                if a in self.answer_index]
        return self.item(text, img, vqa_labels=[a for a, _ in kept],
                         vqa_scores=[s for _, s in kept], index=int(self.indices[i]))


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
                                         max_size=self.recipe.vqa.max_answers)
        warn_unscorable(c, answers, "test")
        return {"answers": answers}

    def state_from_meta(self, meta: dict) -> dict:
        state = super().state_from_meta(meta)
        if not state and "answers" in meta:  # checkpoints of vlp <= 0.2
            state = {"answers": meta["answers"]}
        return state

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        return [HeadSpec(self.name, self.recipe.vqa.classifier, len(self.state["answers"]))]

    def legacy_heads(self, config: dict) -> list[tuple[str, HeadSpec]]:
        from vlp_cli.model import HeadSpec

        n = int(config.get("num_answers", 0))
        return [("vqa_head", HeadSpec(self.name, config.get("vqa_classifier", "mlp"), n))] \
            if n > 0 else []

    def dataset(self, ctx: Context, split: str, seed: int) -> VqaDataset:
        idx = split_indices(ctx.corpus, KIND, split)
        return VqaDataset(ctx.corpus, ctx.builder, idx, self.recipe.vqa.max_text_len,
                          self.state["answers"], seed)

    def collate(self, items: list[dict], batch: dict) -> None:
        import torch

        target = torch.zeros((len(items), len(self.state["answers"])), dtype=torch.float32)
        for i, x in enumerate(items):
            for a, s in zip(x["vqa_labels"], x["vqa_scores"]):
                target[i, a] = s
        batch["vqa_targets"] = target
        batch["index"] = longs(items, "index")

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        import torch

        hidden = encode(model, batch)
        logits = model.cls_logits(self.name, hidden)
        loss = vqa_bce(logits, batch["vqa_targets"])
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
                          lambda b: model.cls_logits(self.name, encode(model, b)).argmax(-1),
                          self.recipe.vqa.train.batch_size * 2, "vqa eval")
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
        items = [TaskDataset.item(builder.text(tokenizer(q, add_special_tokens=False).input_ids,
                                               builder.tag_ids(img.tag_classes),
                                               self.recipe.vqa.max_text_len), img)
                 for img, q in zip(images, questions)]
        model.eval()
        with torch.no_grad():
            batch = {k: v.to(device) for k, v in Collator(builder.pad_id)(items).items()}
            probs = model.cls_logits(self.name, encode(model, batch)).float().sigmoid()
            scores, idx = probs.topk(min(top, len(answers)), dim=-1)
        return [[(answers[i], float(s)) for s, i in zip(srow, irow)]
                for srow, irow in zip(scores.tolist(), idx.tolist())]


def _int_id(qid: Any) -> int | None:
    if isinstance(qid, int):
        return qid
    return int(qid) if isinstance(qid, str) and qid.isdigit() else None


TASK = Vqa()
