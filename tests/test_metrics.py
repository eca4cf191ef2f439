"""Metrics: VQA accuracy (tasks/vqa.py), retrieval recall and caption scores (metrics.py)."""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pytest

from vlp_cli import metrics
from vlp_cli.metrics import CaptionMetrics, caption_metrics, python_ptb_tokenize, retrieval_recall
from vlp_cli.tasks.vqa import (
    build_answer_vocab,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_target_scores,
)

# ---------------------------------------------------------------------------------------------
# VQA normalisation and accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("dont", "don't"),  # contractions table
        ("Doesnt", "doesn't"),
        ("youre right", "you're right"),
        ("two", "2"),  # number words
        ("Ten", "10"),
        ("none", "0"),
        ("a dog", "dog"),  # articles
        ("The Red Car", "red car"),
        ("an apple", "apple"),
        ("yes.", "yes"),  # a period not followed by a digit is deleted
        ("3.5", "3.5"),
        ("5.", "5"),
        ("up!", "up"),  # no neighbouring space: the mark becomes a space, then collapses
        ("red,white", "red white"),
        ("red, white", "red white"),  # ", " present: the comma is deleted outright
        ("black/white", "black white"),
        ("t-shirt", "t shirt"),
        ("1,000", "1000"),  # digit,digit present: every punctuation mark is deleted
        ("1,000 (approx)", "1000 approx"),
        ("don't", "don't"),  # the apostrophe is not in the official punctuation list
        ("it's", "it's"),
        ("Im", "im"),  # the table's capitalised keys never match lower-cased words
        ("  yes\t", "yes"),
        ("what's up?", "what's up"),
        ("the", ""),
    ],
)
def test_normalize_vqa_answer_matches_official_rules(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("matches", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (7, 1.0), (9, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_ten_answers(matches: int, expected: float) -> None:
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_leave_one_out_with_fewer_answers() -> None:
    # Three answers, two agree: leaving out an agreeing one leaves 1 match (1/3), leaving out
    # the other leaves 2 (2/3): mean (1/3 + 1/3 + 2/3) / 3 = 4/9.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)


def test_vqa_accuracy_normalises_when_answers_differ() -> None:
    answers = ["Two", "2", "two.", "2", "3", "three", "2", "two", "2", "2 "]
    # Answers differ, so everything is normalised: eight say "2" -> 1.0; prediction "two" too.
    assert vqa_accuracy("two", answers) == pytest.approx(1.0)
    assert vqa_accuracy("Three!", answers) == pytest.approx(0.6)
    assert vqa_accuracy("a dog", ["dog", "dogs", "dog", "cat"] + ["x"] * 6) == pytest.approx(0.6)


def test_vqa_accuracy_identical_answers_are_not_normalised() -> None:
    # Official rule: with all human answers identical nothing is processed, so the prediction
    # must match verbatim (after whitespace cleaning only).
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    # One differing answer switches normalisation on for everybody.
    assert vqa_accuracy("2", ["two"] * 9 + ["three"]) == pytest.approx(1.0)


def test_vqa_accuracy_single_answer_is_exact_match_after_normalisation() -> None:
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("the red cube", ["red cube"]) == 1.0
    assert vqa_accuracy("red", ["red cube"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_vqa_target_scores() -> None:
    answers = ["yes"] * 5 + ["Yes."] + ["no", "no"] + ["maybe", "the"]
    # "yes" occurs 6 times after normalisation, "no" twice, "maybe" once; "the" -> "" dropped.
    assert vqa_target_scores(answers) == pytest.approx({"yes": 1.0, "no": 0.6, "maybe": 0.3})
    counts = ["w"] * 1 + ["x"] * 2 + ["y"] * 3 + ["z"] * 4
    assert vqa_target_scores(counts) == pytest.approx({"w": 0.3, "x": 0.6, "y": 0.9, "z": 1.0})
    assert vqa_target_scores(["Two"]) == {"2": 1.0}
    # The targets are what vqa_accuracy would award each answer.
    mixed = ["red", "red", "blue", "green", "red", "blue", "red", "pink", "red", "red"]
    for answer, score in vqa_target_scores(mixed).items():
        assert vqa_accuracy(answer, mixed) == pytest.approx(score)


def test_build_answer_vocab() -> None:
    lists = [
        ["yes"] * 10,
        ["Yes", "no"],
        ["no", "two"],
        ["2", "the"],
        ["cat"],
        ["bat"],
    ]
    # Question frequency: yes 2, no 2, 2 2 ("two" and "2" merge), cat 1, bat 1; "" dropped.
    assert build_answer_vocab(lists, max_size=None) == ["2", "no", "yes", "bat", "cat"]
    assert build_answer_vocab(lists, max_size=2) == ["2", "no"]
    assert build_answer_vocab(lists, max_size=None, min_count=2) == ["2", "no", "yes"]
    assert build_answer_vocab(iter(lists), max_size=0) == []
    with pytest.raises(ValueError):
        build_answer_vocab(lists, max_size=None, min_count=0)


# ---------------------------------------------------------------------------------------------
# Retrieval recall
# ---------------------------------------------------------------------------------------------

# Images 0, 1, 2; texts 0 and 1 belong to image 0, text 2 to image 1, texts 3 and 4 to image 2.
_TEXT_TO_IMAGE = np.array([0, 0, 1, 2, 2])
_SCORES = np.array(
    [
        [0.1, 0.9, 0.8, 0.2, 0.3],  # image 0: its text 1 is the best overall -> rank 0
        [0.5, 0.6, 0.4, 0.7, 0.1],  # image 1: texts 0, 1, 3 beat its text 2 -> rank 3
        [0.9, 0.9, 0.9, 0.9, 0.2],  # image 2: text 3 ties with texts 0-2 -> ranked below: 3
    ]
)


def test_retrieval_recall_hand_built() -> None:
    out = retrieval_recall(_SCORES, _TEXT_TO_IMAGE)
    # i2t ranks [0, 3, 3]; t2i ranks [2, 1, 2, 0, 1] (text 1 ties with image 2 -> rank 1).
    assert out["i2t_r1"] == pytest.approx(100 / 3)
    assert out["i2t_r5"] == pytest.approx(100.0)
    assert out["i2t_r10"] == pytest.approx(100.0)
    assert out["t2i_r1"] == pytest.approx(20.0)
    assert out["t2i_r5"] == pytest.approx(100.0)
    assert out["t2i_r10"] == pytest.approx(100.0)
    assert out["rsum"] == pytest.approx(100 / 3 + 100 + 100 + 20 + 100 + 100)
    assert set(out) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}


def test_retrieval_recall_custom_ks() -> None:
    out = retrieval_recall(_SCORES, _TEXT_TO_IMAGE, ks=(1, 2))
    assert out == pytest.approx(
        {"i2t_r1": 100 / 3, "i2t_r2": 100 / 3, "t2i_r1": 20.0, "t2i_r2": 60.0,
         "rsum": 200 / 3 + 80.0}
    )  # fmt: skip


def test_retrieval_recall_perfect_and_ties_do_not_flatter() -> None:
    perfect = np.where(_TEXT_TO_IMAGE[None, :] == np.arange(3)[:, None], 1.0, 0.0)
    out = retrieval_recall(perfect, _TEXT_TO_IMAGE)
    assert all(out[k] == 100.0 for k in out if k != "rsum") and out["rsum"] == 600.0
    # A constant scorer ranks every true item behind every distractor.
    flat = np.zeros((3, 5))
    out = retrieval_recall(flat, _TEXT_TO_IMAGE, ks=(1, 2, 3))
    # i2t: image 0 and 2 have 3 distractor texts, image 1 has 4 -> no hit within 3.
    assert out["i2t_r1"] == out["i2t_r2"] == out["i2t_r3"] == 0.0
    # t2i: every text's image is behind the 2 other images -> rank 2.
    assert out["t2i_r1"] == out["t2i_r2"] == 0.0 and out["t2i_r3"] == 100.0


def test_retrieval_recall_image_without_text_is_only_a_distractor() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.95, 0.0]])  # image 2 has no text
    out = retrieval_recall(scores, np.array([0, 1]), ks=(1, 2))
    assert out["i2t_r1"] == 100.0  # over images 0 and 1 only
    assert out["t2i_r1"] == 50.0 and out["t2i_r2"] == 100.0  # image 2 steals text 0's top slot


def _slow_recall(scores: np.ndarray, t2i: np.ndarray, k: int) -> tuple[float, float]:
    """Loop reference: pessimistic ranks computed one item at a time."""
    num_images, num_texts = scores.shape
    i2t_hits, i2t_total = 0, 0
    for i in range(num_images):
        mine = [j for j in range(num_texts) if t2i[j] == i]
        if not mine:
            continue
        i2t_total += 1
        ranks = []
        for j in mine:
            others = [j2 for j2 in range(num_texts) if t2i[j2] != i]
            ranks.append(sum(scores[i, j2] >= scores[i, j] for j2 in others))
        i2t_hits += min(ranks) < k
    t2i_hits = 0
    for j in range(num_texts):
        g = t2i[j]
        rank = sum(scores[i, j] >= scores[g, j] for i in range(num_images) if i != g)
        t2i_hits += rank < k
    return 100.0 * i2t_hits / i2t_total, 100.0 * t2i_hits / num_texts


def test_retrieval_recall_matches_loop_reference_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(12, 30)).astype(np.float32)  # small range: many ties
    t2i = rng.integers(0, 12, size=30)
    out = retrieval_recall(scores, t2i, ks=(1, 3, 5))
    for k in (1, 3, 5):
        i2t, t2i_r = _slow_recall(scores, t2i, k)
        assert out[f"i2t_r{k}"] == pytest.approx(i2t)
        assert out[f"t2i_r{k}"] == pytest.approx(t2i_r)


def test_retrieval_recall_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        retrieval_recall(_SCORES, _TEXT_TO_IMAGE[:4])
    with pytest.raises(ValueError):
        retrieval_recall(_SCORES, np.array([0, 0, 1, 2, 3]))
    with pytest.raises(ValueError):
        retrieval_recall(np.full((3, 5), np.nan), _TEXT_TO_IMAGE)
    with pytest.raises(ValueError):
        retrieval_recall(_SCORES, _TEXT_TO_IMAGE, ks=(0,))


# ---------------------------------------------------------------------------------------------
# Caption metrics (pure-Python tokenizer path)
# ---------------------------------------------------------------------------------------------

pytest.importorskip("pycocoevalcap.cider.cider")

# Expected strings are what coco-caption's Java PTBTokenizer (CoreNLP 3.4.1) produced for the
# same captions, followed by its punctuation removal.
_PTB_CASES = [
    ("A man riding a horse.", "a man riding a horse"),
    ("Two dogs, playing in the snow!", "two dogs playing in the snow"),
    ("A man's hat doesn't fit; he can't see.", "a man 's hat does n't fit he ca n't see"),
    ("The \"big\" red bus (double-decker) is grey.",
     "the big red bus -lrb- double-decker -rrb- is grey"),
    ("There are 1,000 people at 3.5 p.m. in the U.S. with Mr. Smith",
     "there are 1,000 people at 3.5 p.m. in the u.s. with mr. smith"),
    ("Kids' toys are on the floor.", "kids toys are on the floor"),
    ("A cat sitting on a laptop/keyboard & a mouse.",
     "a cat sitting on a laptop/keyboard & a mouse"),
    ("A dog #1 costs $5 and 50% off", "a dog # 1 costs $ 5 and 50 % off"),
    ("A t-shirt and jeans -- what a look...", "a t-shirt and jeans what a look"),
    ("A bathroom with a toilet,sink and mirror", "a bathroom with a toilet sink and mirror"),
    ("We'll go, they're here, I'm done", "we 'll go they 're here i 'm done"),
    ("A sign that says no.", "a sign that says no"),
    ("wow!! what?", "wow !! what"),
    ("A cannot gonna", "a can not gon na"),
    ("the man\u2019s \u201cquoted\u201d text\u2026", "the man 's quoted text"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), _PTB_CASES)
def test_python_tokenizer_mimics_ptb(raw: str, expected: str) -> None:
    assert python_ptb_tokenize(raw) == expected


def test_removed_tokens_match_pycocoevalcap() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    assert metrics._COCO_REMOVED_TOKENS == frozenset(PUNCTUATIONS)


def _bleu_by_hand(precisions: list[float], cand_len: int, ref_len: int) -> list[float]:
    """BLEU-1..n in percent from clipped n-gram precisions and the brevity penalty."""
    bp = 1.0 if cand_len >= ref_len else math.exp(1 - ref_len / cand_len)
    return [
        100 * bp * math.exp(sum(math.log(p) for p in precisions[:n]) / n)
        for n in range(1, len(precisions) + 1)
    ]


def test_caption_metrics_python_path_values(capsys: pytest.CaptureFixture[str]) -> None:
    out = caption_metrics(
        {"img": "A man riding a horse."}, {"img": ["A man riding a brown horse!"]},
        use_java=False,
    )  # fmt: skip
    assert isinstance(out, CaptionMetrics)
    assert out.tokenizer == "python" and not out.meteor_ran and out.num_images == 1
    assert "meteor" not in out.scores and out.meteor_skipped == "use_java=False"
    # "a man riding a horse" vs "a man riding a brown horse": clipped precisions 5/5, 3/4,
    # 2/3, 1/2; lengths 5 vs 6.
    expected = _bleu_by_hand([1.0, 3 / 4, 2 / 3, 1 / 2], cand_len=5, ref_len=6)
    for n, value in enumerate(expected, start=1):
        assert out.scores[f"bleu{n}"] == pytest.approx(value, abs=1e-4)
    assert out.scores["bleu4"] == pytest.approx(57.89, abs=0.01)
    # ROUGE-L: LCS 5, P = 1, R = 5/6, beta 1.2.
    p, r, b2 = 1.0, 5 / 6, 1.2**2
    assert out.scores["rouge_l"] == pytest.approx(100 * (1 + b2) * p * r / (r + b2 * p))
    # CIDEr-D's idf is log(#images / df) = 0 with a single image: coco-caption reports 0.
    assert out.scores["cider"] == 0.0
    assert capsys.readouterr().out == ""  # the scorers' prints are swallowed
    flat = out.as_dict()
    assert flat["tokenizer"] == "python" and flat["meteor_ran"] is False
    assert flat["bleu4"] == out.scores["bleu4"]


def test_caption_metrics_identical_captions_score_full() -> None:
    caption = "A young man in a red shirt is riding a brown horse along the beach."
    out = caption_metrics({"1": caption}, {"1": [caption]}, use_java=False)
    for n in range(1, 5):
        assert out.scores[f"bleu{n}"] == pytest.approx(100.0, abs=1e-6)
    assert out.scores["rouge_l"] == pytest.approx(100.0)


_TOY_PREDS = {
    "1": "A man riding a horse on the beach.",
    "2": "Two dogs, playing in the snow!",
    "3": "A plate of food with broccoli.",
}
_TOY_REFS = {
    "1": ["A man rides a brown horse.", "A person riding a horse on a beach.",
          "A man on a horse near the ocean."],
    "2": ["Two dogs play in the snow.", "Dogs playing in snow!", "Two dogs running outside."],
    "3": ["A plate of food on a wooden table.", "Broccoli and rice on a plate.",
          "A dish with food and broccoli."],
}  # fmt: skip


def test_caption_metrics_cider_matches_pycocoevalcap_directly() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    out = caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=False)
    res = {k: [python_ptb_tokenize(v)] for k, v in _TOY_PREDS.items()}
    gts = {k: [python_ptb_tokenize(r) for r in v] for k, v in _TOY_REFS.items()}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert out.scores["cider"] == pytest.approx(100 * cider)
    assert out.scores["bleu4"] == pytest.approx(100 * bleu[3])
    assert 50.0 < out.scores["cider"] < 300.0  # a sane, clearly positive CIDEr for this set
    # Evaluation covers the predicted images only; extra references are ignored.
    subset = caption_metrics({"1": _TOY_PREDS["1"]}, _TOY_REFS, use_java=False)
    assert subset.num_images == 1


def test_caption_metrics_errors_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        caption_metrics({}, {}, use_java=False)
    with pytest.raises(ValueError):
        caption_metrics({"x": "a cat"}, {"y": ["a cat"]}, use_java=False)
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    with pytest.raises(RuntimeError, match="java"):
        caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=True)
    auto = caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=None)
    assert auto.tokenizer == "python" and not auto.meteor_ran
    assert auto.meteor_skipped == "no Java"


def test_caption_metrics_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)
    with pytest.raises(ImportError, match=r"pip install --no-deps pycocoevalcap==1\.2"):
        caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=False)


# ---------------------------------------------------------------------------------------------
# Caption metrics through Java (PTB tokenizer + METEOR)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_caption_metrics_java_path(monkeypatch: pytest.MonkeyPatch) -> None:
    if not metrics.java_available():
        pytest.skip("no working java on PATH")
    # The two tokenizers agree on ordinary captions.
    raws = [raw for raw, _ in _PTB_CASES]
    assert metrics._java_ptb_tokenize(raws) == [python_ptb_tokenize(r) for r in raws]

    start = time.perf_counter()
    java = caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=True)
    elapsed = time.perf_counter() - start
    assert java.tokenizer == "ptb-java" and java.meteor_ran and java.meteor_skipped is None
    assert 10.0 < java.scores["meteor"] < 60.0
    assert elapsed < 120.0
    python = caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=False)
    for key, value in python.scores.items():
        assert java.scores[key] == pytest.approx(value)

    # A METEOR that overruns its timeout is killed and reported, not left running.
    from pycocoevalcap.meteor import meteor as meteor_module

    started: list[object] = []

    class RecordingMeteor(meteor_module.Meteor):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(meteor_module, "Meteor", RecordingMeteor)
    with pytest.raises(RuntimeError, match="timed out"):
        caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=True, meteor_timeout_s=0.01)
    auto = caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=None, meteor_timeout_s=0.01)
    assert not auto.meteor_ran and "timed out" in (auto.meteor_skipped or "")
    assert auto.scores["cider"] == pytest.approx(java.scores["cider"])
    assert len(started) == 2
    assert all(m.meteor_p.poll() is not None for m in started)  # type: ignore[attr-defined]


def test_spice_is_reported_skipped_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    python = caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=False)
    assert "spice" not in python.scores and python.spice_skipped == "use_java=False"
    assert python.as_dict()["spice_skipped"] == "use_java=False"
    if not metrics.java_available():
        pytest.skip("no working java on PATH")
    # This machine has Java but not CoreNLP's models (pycocoevalcap would download them).
    why = metrics.spice_missing()
    if why is not None:
        java = caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=True)
        assert "spice" not in java.scores and java.spice_skipped == why
        assert "stanford-corenlp-3.6.0" in why and "downloads" in why
    # With the models present, SPICE's mean F-score joins the scores (x100).
    monkeypatch.setattr(metrics, "spice_missing", lambda: None)
    monkeypatch.setattr(metrics, "_run_spice", lambda gts, res: 0.215)
    java = caption_metrics(_TOY_PREDS, _TOY_REFS, use_java=True)
    assert java.scores["spice"] == pytest.approx(21.5) and java.spice_skipped is None


def test_answer_balance_flattens_the_answers_and_is_fixed_by_the_seed() -> None:
    """vqa.answer_balance: weight count(answer)^-p per question; 1 draws each answer equally
    often, 0.5 by the square root of its count; the same seed draws the same epoch."""
    from collections import Counter

    from vlp_cli.tasks.vqa import answer_balanced

    labels = ["yes"] * 900 + ["red"] * 90 + ["blue"] * 10
    corpus = type("C", (), {"get": lambda self, i: {"label": [labels[i]] * 10}})()
    idx = np.arange(len(labels))
    drawn = answer_balanced(corpus, idx, 1.0, seed=3)
    assert len(drawn) == len(idx) and np.array_equal(drawn, answer_balanced(corpus, idx, 1.0, 3))
    share = Counter(labels[i] for i in drawn)
    assert all(abs(share[a] / len(drawn) - 1 / 3) < 0.05 for a in ("yes", "red", "blue"))
    half = Counter(labels[i] for i in answer_balanced(corpus, idx, 0.5, seed=3))
    # square roots 30 : 9.5 : 3.2 of 42.6
    assert abs(half["yes"] / 1000 - 30 / 42.6) < 0.05 and abs(half["blue"] / 1000 - 3.2 / 42.6) < 0.03
