"""Evaluation metrics used by ``vlp evaluate``: VQA accuracy, retrieval recall, caption scores.

Everything here is a pure function of its inputs (no model, no torch), so the numbers a run
reports can be recomputed later from its saved predictions.

* VQA: answer normalisation and soft accuracy reproduce the official evaluation script
  (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, current master),
  including its quirks, so that accuracies are comparable with published numbers.
* Retrieval: recall@K for image->text and text->image from a similarity matrix.
* Captioning: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as the COCO caption evaluation reports
  them, computed by the scorer classes of ``pycocoevalcap==1.2``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from vlp_cli import VlpError

logger = logging.getLogger(__name__)

__all__ = [
    "CaptionMetrics",
    "build_answer_vocab",
    "caption_metrics",
    "java_available",
    "normalize_vqa_answer",
    "python_ptb_tokenize",
    "retrieval_recall",
    "vqa_accuracy",
    "vqa_target_scores",
]

# ---------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


def retrieval_recall(
    scores: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K for image->text and text->image retrieval, in percent.

    Image->text: an image is a hit at K when *any* of its texts is ranked within the top K of
    all texts (the Flickr30K / COCO protocol, where each image has about five captions).
    Text->image: a text is a hit at K when its image is within the top K of all images.

    Args:
        scores: ``[num_images, num_texts]`` similarities, higher meaning a better match.
        text_to_image: ``[num_texts]`` integer index of each text's image.
        ks: The cut-offs K.

    Returns:
        ``i2t_r{K}`` and ``t2i_r{K}`` for each K (0..100) and ``rsum``, their sum. Images that
        have no text act only as distractors for text->image and are left out of image->text.

    Raises:
        ValueError: On mismatched shapes, out-of-range indices, NaN scores, K < 1, or when no
            image has a text.
    """
    scores = np.asarray(scores)
    text_to_image = np.asarray(text_to_image)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [images, texts], got shape {scores.shape}")
    num_images, num_texts = scores.shape
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {text_to_image.shape}")
    if num_texts == 0:
        raise ValueError("retrieval_recall needs at least one text")
    if not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integers, got {text_to_image.dtype}")
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image values must lie in [0, {num_images})")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {ks}")

    is_true = text_to_image[None, :] == np.arange(num_images)[:, None]  # [images, texts]

    # Ties must not flatter a model (a constant scorer must not get 100%), so a true item is
    # ranked below every distractor with an equal score: the rank counts distractors >= it.
    # Text->image: distractor images scoring at least the true image's score for this text.
    true_for_text = scores[text_to_image, np.arange(num_texts)]
    t2i_rank = (scores >= true_for_text[None, :]).sum(axis=0) - 1  # minus the true image

    # Image->text: only the image's best-scoring text matters for "any text in the top K", and
    # its rank is the number of non-matching texts scoring at least as high.
    has_text = is_true.any(axis=1)
    if not has_text.any():
        raise ValueError("no image has a text; image->text recall is undefined")
    if not has_text.all():
        logger.debug("%d images without texts left out of i2t recall", int((~has_text).sum()))
    best_true = np.where(is_true, scores, -np.inf).max(axis=1)
    i2t_rank = ((scores >= best_true[:, None]) & ~is_true).sum(axis=1)[has_text]

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(100.0 * np.mean(i2t_rank < k))
    for k in ks:
        out[f"t2i_r{k}"] = float(100.0 * np.mean(t2i_rank < k))
    out["rsum"] = float(sum(out.values()))
    return out


# ---------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------

_PYCOCOEVALCAP_HINT = "caption metrics need pycocoevalcap: pip install --no-deps pycocoevalcap==1.2"


class MissingDependency(VlpError, ImportError):
    """An optional package is missing; the message names the command that installs it."""

# The tokens coco-caption's PTBTokenizer wrapper deletes after tokenising (its PUNCTUATIONS).
# Because the Java tokenizer runs with -lowerCase, "-LRB-" and friends arrive lower-cased and are
# therefore *not* deleted: "(" survives as "-lrb-". Both tokenizer paths keep that behaviour.
_COCO_REMOVED_TOKENS: frozenset[str] = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)  # fmt: skip

_PTB_JAR = "stanford-corenlp-3.4.1.jar"
_PTB_TIMEOUT_S = 300.0

# Characters PTB normalises before tokenising: curly quotes to ASCII, the ellipsis and dashes to
# their ASCII tokens (which are then deleted).
_UNICODE_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u2026": " ... ", "\u2013": " -- ", "\u2014": " -- ",
})  # fmt: skip
_BRACKET_TOKENS: dict[str, str] = {
    "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
}  # fmt: skip
# Abbreviations whose final period PTB keeps attached (checked against the CoreNLP 3.4.1 jar).
_ABBREVIATIONS: frozenset[str] = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "mt", "ft", "vs", "etc", "inc", "co", "corp",
     "ltd", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
     "prof", "gen", "gov", "capt", "lt", "col", "sgt", "rev", "ave", "blvd", "rd", "dept",
     "est", "tel", "univ", "bros", "ph", "sen", "rep", "assn"}
)  # fmt: skip
# Ordered (pattern, replacement) rewrites that put spaces where PTB puts token boundaries.
_PTB_SPLITS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r'["`]'), " "),  # double quotes and backquotes are deleted quote tokens
    (re.compile(r"([()\[\]{}])"), r" \1 "),
    (re.compile(r"\.{3,}"), " "),  # an ellipsis is one deleted token however long
    (re.compile(r"-{2,}"), " "),
    (re.compile(r"([!?]{2,})"), r" \1 "),  # runs like "!!" are one token that is *not* deleted
    (re.compile(r"(?<![!?])[!?](?![!?])"), " "),
    (re.compile(r";"), " "),
    (re.compile(r"(?<!\d),|,(?!\d)"), " "),  # "1,000" stays one token
    (re.compile(r"(?<!\d):|:(?!\d)"), " "),  # "10:30" stays one token
    (re.compile(r"([$%#&*~^_=+])"), r" \1 "),  # symbols become tokens of their own
    (re.compile(r"(?<!\S)/|/(?!\S)"), " / "),  # "w/" splits, "black/white" stays
    (re.compile(r"(?<!\S)-+|-+(?!\S)"), " "),  # hyphens at a word's edge split off
    (re.compile(r"\b(can)(not)\b", re.I), r"\1 \2"),
    (re.compile(r"\b(gon|got|wan)(na|ta)\b", re.I), r"\1 \2"),
    (re.compile(r"\b(lem|gim)(me)\b", re.I), r"\1 \2"),
    (re.compile(r"(?<!\S)('t)(is|was)\b", re.I), r"\1 \2"),
    # An opening single quote is deleted, but not the apostrophe of a free-standing clitic.
    (re.compile(r"(?<!\S)'(?!(?:s|re|ve|ll|d|m|t)\b)(?=[a-z])", re.I), " "),
    (re.compile(r"(\w)(n't)(?![a-z])", re.I), r"\1 \2"),
    (re.compile(r"(\w)('(?:s|re|ve|ll|d|m))(?![a-z])", re.I), r"\1 \2"),
    (re.compile(r"(?<=[a-z])'(?![a-z0-9])", re.I), " "),  # plural possessive "kids'"
    (re.compile(r"(?<!\S)'(?!\S)"), " "),
    (re.compile(r"(?<=[a-z]{2})\.(?=[A-Z])"), " "),  # "board.A" is a sentence boundary to PTB
)
_ACRONYM = re.compile(r"^(?:[a-z]\.)+$")


def python_ptb_tokenize(caption: str) -> str:
    """Tokenise a caption like coco-caption's Java PTBTokenizer, in pure Python.

    Mimics ``PTBTokenizer -preserveLines -lowerCase`` from Stanford CoreNLP 3.4.1 followed by
    coco-caption's removal of punctuation tokens, for ordinary English captions: lower-casing,
    clitics split off (``"don't"`` -> ``"do n't"``, ``"man's"`` -> ``"man 's"``), punctuation
    dropped, numbers such as ``"1,000"`` / ``"3.5"`` kept whole, brackets as ``-lrb-``-style
    tokens. Exotic input (URLs, emoticons, unusual abbreviations) may differ from Java.

    Args:
        caption: One raw caption.

    Returns:
        Space-separated tokens, ready for the pycocoevalcap scorers.
    """
    text = caption.replace("\n", " ").translate(_UNICODE_MAP)
    for pattern, replacement in _PTB_SPLITS:
        text = pattern.sub(replacement, text)
    raw = text.split()
    tokens: list[str] = []
    for i, token in enumerate(raw):
        token = token.lower()
        if not token.strip("."):
            continue  # runs of periods are sentence punctuation, deleted like "."
        if token.endswith("."):
            stem = token.rstrip(".")
            next_is_digit = i + 1 < len(raw) and raw[i + 1][:1].isdigit()
            # PTB keeps the period of abbreviations and of initials and acronyms ("j.", "u.s.");
            # "no." only before a number. Anywhere else it is a sentence period and dropped.
            keep = (
                stem in _ABBREVIATIONS
                or _ACRONYM.match(token) is not None
                or (stem == "no" and next_is_digit)
            )
            token = stem + "." if keep else stem
        token = _BRACKET_TOKENS.get(token, token)
        if token and token not in _COCO_REMOVED_TOKENS:
            tokens.append(token)
    return " ".join(tokens)


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """Whether a working ``java`` is on PATH (cached for the process).

    Returns:
        True if ``java -version`` runs successfully.
    """
    java = shutil.which("java")
    if java is None:
        return False
    try:
        # A stub launcher (macOS without a JDK) exists on PATH but fails here.
        result = subprocess.run([java, "-version"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _ptb_jar_path() -> str:
    """Locate the Stanford CoreNLP jar shipped inside pycocoevalcap.

    Returns:
        The jar's absolute path.

    Raises:
        ImportError: With the install command, if the package is missing.
    """
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError as err:
        raise MissingDependency(_PYCOCOEVALCAP_HINT) from err
    # pycocoevalcap is a namespace package without __init__.py; the module file is reliable.
    return os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), _PTB_JAR)


def _java_ptb_tokenize(sentences: list[str], timeout_s: float = _PTB_TIMEOUT_S) -> list[str]:
    """Tokenise with the Stanford PTBTokenizer jar shipped in pycocoevalcap.

    Runs the same command and punctuation removal as ``pycocoevalcap.tokenizer.PTBTokenizer``
    but writes its temporary file outside the (possibly read-only) site-packages directory,
    bounds the run with a timeout and checks that no line went missing.

    Args:
        sentences: Raw captions.
        timeout_s: Seconds before the Java process is killed.

    Returns:
        One tokenised caption per input sentence.

    Raises:
        RuntimeError: If Java fails, times out or returns the wrong number of lines.
    """
    jar = _ptb_jar_path()
    # One caption per line is the protocol, so any line break inside a caption would shift every
    # later caption onto the wrong image.
    lines_in = [" ".join(s.splitlines()) for s in sentences]
    with tempfile.TemporaryDirectory(prefix="vlp-ptb-") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines_in))
        cmd = [
            "java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines", "-lowerCase", path,
        ]  # fmt: skip
        try:
            result = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"PTB tokenizer timed out after {timeout_s:.0f} s") from err
    if result.returncode != 0:
        stderr = result.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"PTB tokenizer failed (exit {result.returncode}): {stderr[-500:]}")
    lines_out = result.stdout.decode("utf-8", "replace").split("\n")
    if len(lines_out) == len(lines_in) + 1 and lines_out[-1] == "":
        lines_out.pop()
    if len(lines_out) != len(lines_in):
        raise RuntimeError(
            f"PTB tokenizer returned {len(lines_out)} lines for {len(lines_in)} captions"
        )
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in _COCO_REMOVED_TOKENS)
        for line in lines_out
    ]


def _close_meteor(meteor: Any) -> None:
    """Stop a pycocoevalcap ``Meteor`` subprocess for good.

    Args:
        meteor: A ``pycocoevalcap.meteor.meteor.Meteor`` instance.
    """
    proc = meteor.meteor_p
    with contextlib.suppress(Exception):
        proc.stdin.close()
    with contextlib.suppress(Exception):
        proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=30)
    # Meteor.compute_score does not release its lock when it raises, and Meteor.__del__
    # acquires it: a fresh lock keeps garbage collection from blocking forever.
    meteor.lock = threading.Lock()


def _run_meteor(gts: dict[str, list[str]], res: dict[str, list[str]], timeout_s: float) -> float:
    """Corpus METEOR via pycocoevalcap, guarded by a timeout and always cleaned up.

    Args:
        gts: Tokenised references per image.
        res: Tokenised prediction (one-element list) per image.
        timeout_s: Seconds before the Java process is killed.

    Returns:
        The raw METEOR score in [0, 1].

    Raises:
        RuntimeError: If METEOR fails or times out.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    with contextlib.redirect_stdout(io.StringIO()):
        meteor = Meteor()
    proc = meteor.meteor_p
    # Nobody reads the wrapper's stderr pipe; if Java filled it, METEOR would block forever.
    drain = threading.Thread(target=proc.stderr.read, daemon=True)
    drain.start()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["score"] = meteor.compute_score(gts, res)[0]
        except BaseException as err:  # reported to the caller below
            outcome["error"] = err

    worker = threading.Thread(target=work, daemon=True)
    try:
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            raise RuntimeError(f"METEOR timed out after {timeout_s:.0f} s")
    finally:
        # Killing the process also unblocks a worker stuck on a read.
        _close_meteor(meteor)
        worker.join(10)
    if "error" in outcome:
        raise RuntimeError(f"METEOR failed: {outcome['error']!r}") from outcome["error"]
    if "score" not in outcome:
        raise RuntimeError("METEOR returned no score")
    return float(outcome["score"])


@dataclass(frozen=True)
class CaptionMetrics:
    """Caption scores on the scale papers report, and how they were obtained.

    Attributes:
        scores: ``bleu1``..``bleu4``, ``rouge_l``, ``cider`` and, if it ran, ``meteor``.
            BLEU, METEOR and ROUGE-L are x100 (0..100); CIDEr is CIDEr-D x100 (a raw 1.376 is
            reported as 137.6).
        tokenizer: ``"ptb-java"`` (coco-caption's Stanford PTBTokenizer, the official path) or
            ``"python"`` (the pure-Python approximation).
        meteor_ran: Whether METEOR was computed (it needs Java).
        num_images: How many images were scored.
        meteor_skipped: Why METEOR is missing, or ``None`` if it ran.
    """

    scores: dict[str, float]
    tokenizer: Literal["ptb-java", "python"]
    meteor_ran: bool
    num_images: int
    meteor_skipped: str | None = None

    def as_dict(self) -> dict[str, float | str | bool | int | None]:
        """Flatten into one JSON-ready mapping.

        Returns:
            The scores plus ``tokenizer``, ``meteor_ran``, ``num_images`` and
            ``meteor_skipped``.
        """
        return {
            **self.scores,
            "tokenizer": self.tokenizer,
            "meteor_ran": self.meteor_ran,
            "num_images": self.num_images,
            "meteor_skipped": self.meteor_skipped,
        }


def caption_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, list[str]],
    use_java: bool | None = None,
    meteor_timeout_s: float = 900.0,
) -> CaptionMetrics:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as the COCO caption evaluation reports them.

    Scoring is done by pycocoevalcap 1.2's own scorer classes on the images that have a
    prediction (CIDEr's document frequencies therefore come from those images' references, as
    in coco-caption). With Java, captions are tokenised by coco-caption's Stanford PTBTokenizer
    and METEOR runs; without it, :func:`python_ptb_tokenize` is used and METEOR is omitted.

    Scale: BLEU-n, METEOR and ROUGE-L are multiplied by 100 (0..100) and CIDEr-D is multiplied
    by 100 as papers print it (137.6 means a raw CIDEr of 1.376).

    Args:
        predictions: Image id -> generated caption.
        references: Image id -> reference captions (must cover every predicted image).
        use_java: ``True`` to require Java (errors are raised), ``False`` for the pure-Python
            path, ``None`` to use Java when it works (a METEOR failure is then logged and
            METEOR left out).
        meteor_timeout_s: Seconds METEOR may take before its Java process is killed.

    Returns:
        The scores and how they were computed.

    Raises:
        ImportError: If pycocoevalcap is not installed.
        ValueError: If there is no prediction or an image lacks references.
        RuntimeError: If ``use_java=True`` and Java is missing or a Java step fails.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:
        raise MissingDependency(_PYCOCOEVALCAP_HINT) from err

    if not predictions:
        raise ValueError("caption_metrics needs at least one prediction")
    keys = list(predictions)
    missing = [k for k in keys if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} predicted images have no references, e.g. {missing[0]!r}")

    have_java = java_available()
    if use_java and not have_java:
        raise RuntimeError("use_java=True but no working `java` was found on PATH")
    java = have_java if use_java is None else use_java

    pred_raw = [predictions[k] for k in keys]
    ref_raw = [list(references[k]) for k in keys]
    flat_refs = [ref for refs in ref_raw for ref in refs]
    if java:
        tokenized = _java_ptb_tokenize(pred_raw + flat_refs)
        tokenizer: Literal["ptb-java", "python"] = "ptb-java"
    else:
        tokenized = [python_ptb_tokenize(s) for s in pred_raw + flat_refs]
        tokenizer = "python"
    res = {k: [tokenized[i]] for i, k in enumerate(keys)}
    gts: dict[str, list[str]] = {}
    cursor = len(keys)
    for k, refs in zip(keys, ref_raw, strict=True):
        gts[k] = tokenized[cursor : cursor + len(refs)]
        cursor += len(refs)

    # The scorers print progress and statistics to stdout; library code must stay quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    scores = {f"bleu{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
    scores["rouge_l"] = 100.0 * float(rouge)
    scores["cider"] = 100.0 * float(cider)

    meteor_skipped: str | None = None
    if not java:
        meteor_skipped = "no Java" if not have_java else "use_java=False"
    else:
        start = time.perf_counter()
        try:
            scores["meteor"] = 100.0 * _run_meteor(gts, res, meteor_timeout_s)
            logger.info("METEOR on %d images took %.1f s", len(keys), time.perf_counter() - start)
        except RuntimeError as err:
            if use_java:
                raise
            logger.warning("METEOR left out: %s", err)
            meteor_skipped = str(err)
    return CaptionMetrics(
        scores=scores,
        tokenizer=tokenizer,
        meteor_ran="meteor" in scores,
        num_images=len(keys),
        meteor_skipped=meteor_skipped,
    )
