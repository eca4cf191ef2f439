"""VQA's official evaluation (the VQA task's metric, kept beside it): answer normalisation and
soft accuracy as the official script computes them (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, current master), including its quirks, so
that accuracies are comparable with published numbers; soft targets and the answer vocabulary.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

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
