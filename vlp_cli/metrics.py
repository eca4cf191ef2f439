"""Evaluation metrics shared by tasks: retrieval recall, caption scores (a task's own metric,
such as an answer accuracy, lives in its task file).

Everything here is a pure function of its inputs (no model, no torch), so the numbers a run
reports can be recomputed later from its saved predictions.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vlp_cli import VlpError

logger = logging.getLogger(__name__)

__all__ = [
    "CiderD",
    "CaptionMetrics",
    "caption_metrics",
    "java_available",
    "python_ptb_tokenize",
    "retrieval_recall",
]

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
        spice_skipped: Why SPICE is missing, or ``None`` if it ran.
    """

    scores: dict[str, float]
    tokenizer: Literal["ptb-java", "python"]
    meteor_ran: bool
    num_images: int
    meteor_skipped: str | None = None
    spice_skipped: str | None = None

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
            "spice_skipped": self.spice_skipped,
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
    spice_skipped = spice_missing() if java else meteor_skipped
    if spice_skipped is None:
        try:
            scores["spice"] = 100.0 * _run_spice(gts, res)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as err:
            spice_skipped = f"SPICE failed: {err}"
    if spice_skipped is not None:
        logger.info("SPICE not computed: %s", spice_skipped)
    return CaptionMetrics(
        scores=scores,
        tokenizer=tokenizer,
        meteor_ran="meteor" in scores,
        num_images=len(keys),
        meteor_skipped=meteor_skipped,
        spice_skipped=spice_skipped,
    )


def spice_missing() -> str | None:
    """Why SPICE cannot run here, or None. pycocoevalcap's SPICE needs Stanford CoreNLP 3.6.0
    beside its jar, which it would download on first use; vlp never downloads, so without
    the two jars SPICE is reported as skipped."""
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap.spice")
    if spec is None or not spec.submodule_search_locations:
        return "pycocoevalcap has no SPICE module"
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    need = [lib / f"stanford-corenlp-3.6.0{s}.jar" for s in ("", "-models")]
    absent = [p.name for p in need if not p.is_file()]
    if absent:
        return (f"Stanford CoreNLP models not installed ({', '.join(absent)} missing in {lib}; "
                "pycocoevalcap downloads them from nlp.stanford.edu, which vlp does not)")
    return None


def _run_spice(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """pycocoevalcap's SPICE (Java, Stanford CoreNLP) on tokenised captions: mean F-score."""
    from pycocoevalcap.spice.spice import Spice

    with contextlib.redirect_stdout(io.StringIO()):
        score, _ = Spice().compute_score(gts, res)
    return float(score)


# ---------------------------------------------------------------------------------------------
# CIDEr-D with fixed document frequencies (the SCST reward)
# ---------------------------------------------------------------------------------------------


def _ngram_counts(tokens: list[str], n: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            g = tuple(tokens[i: i + k])
            counts[g] = counts.get(g, 0) + 1
    return counts


class CiderD:
    """CIDEr-D whose document frequencies come from a fixed set of documents (each document:
    one image's reference captions), as SCST uses it: Oscar's reward reads the frequencies of
    the COCO training captions (`coco-train-words.p`), not of the batch being scored.

    The arithmetic is coco-caption's (`pycocoevalcap.cider`): tf-idf vectors of 1..4-grams
    with idf = log(documents) - log(max(1, df)), the candidate's weights clipped by the
    reference's, a Gaussian length penalty (sigma 6) where the length is the number of bigrams
    (the scorer's own quirk, kept), averaged over n and references, x10. Given the references
    being scored as its documents it equals pycocoevalcap's `Cider` (a test checks this).
    Sentences are scored as given: split on spaces, nothing else.
    """

    def __init__(self, documents: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0):
        if not documents:
            raise ValueError("CiderD needs at least one document (an image's references)")
        self.n, self.sigma = n, sigma
        self.df: dict[tuple[str, ...], float] = {}
        for refs in documents:
            for g in {g for ref in refs for g in _ngram_counts(ref.split(), n)}:
                self.df[g] = self.df.get(g, 0.0) + 1.0
        self.ref_len = float(np.log(float(len(documents))))
        self._vectors: dict[str, tuple[list[dict], np.ndarray, int]] = {}

    def _vector(self, sentence: str) -> tuple[list[dict], np.ndarray, int]:
        """(tf-idf weights per n, their norms, length in bigrams), cached per sentence."""
        got = self._vectors.get(sentence)
        if got is None:
            vec: list[dict] = [{} for _ in range(self.n)]
            norm = np.zeros(self.n)
            length = 0
            for g, tf in _ngram_counts(sentence.split(), self.n).items():
                k = len(g) - 1
                w = float(tf) * (self.ref_len - float(np.log(max(1.0, self.df.get(g, 0.0)))))
                vec[k][g] = w
                norm[k] += w * w
                if k == 1:
                    length += tf
            got = (vec, np.sqrt(norm), length)
            if len(self._vectors) < 200_000:
                self._vectors[sentence] = got
        return got

    def score(self, candidate: str, references: Sequence[str]) -> float:
        """CIDEr-D of one candidate against its references (raw scale: 1.0 is 100 printed)."""
        vec, norm, length = self._vector(candidate)
        total = np.zeros(self.n)
        for ref in references:
            rvec, rnorm, rlength = self._vector(ref)
            val = np.zeros(self.n)
            for k in range(self.n):
                for g, w in vec[k].items():
                    r = rvec[k].get(g, 0.0)
                    val[k] += min(w, r) * r
                if norm[k] != 0 and rnorm[k] != 0:
                    val[k] /= norm[k] * rnorm[k]
            total += val * np.exp(-((length - rlength) ** 2) / (2 * self.sigma ** 2))
        return float(total.mean() / len(references) * 10.0)

    def scores(self, candidates: Sequence[str], references: Sequence[Sequence[str]]
               ) -> np.ndarray:
        """CIDEr-D of each candidate against its own references."""
        return np.array([self.score(c, r) for c, r in zip(candidates, references, strict=True)])
