"""Boxes handed in with `vlp extract-features --boxes FILE.jsonl`: parsing and checking.

One line per image:

    {"image": key, "boxes": [[x1, y1, x2, y2], ...], "labels": [tag, ...],
     "scores": [confidence, ...],                       optional, default 1.0 each
     "classes": [class name, ...], "probs": [[p, ...], ...]}   optional, together

`probs` holds one class distribution per box (UNITER's MRC-kl target, as the detector path
stores it), each row aligned to the line's `classes` list: non-negative, finite, summing to 1
(within `PROBS_TOLERANCE`; renormalised on reading). The tag in `labels` is the box's own
(usually the distribution's argmax, but not checked). When one line gives `probs`, every line
with boxes must: a store with class distributions for some images only would be a trap for
the objectives that read them. The tag vocabulary is the sorted union of all labels and
classes, and each distribution is stored over it (absent classes get 0).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlp_cli import VlpError
from vlp_cli.readers.jsonl_lines import iter_jsonl

# How far a distribution's sum may stray from 1 (values written with a few decimals).
PROBS_TOLERANCE = 0.01


@dataclass
class GivenBoxes:
    """Boxes handed in with --boxes FILE.jsonl, by image key."""

    boxes: dict[str, tuple[np.ndarray, list[str], np.ndarray]]
    labels: list[str]  # sorted vocabulary
    sha256: str
    # Per image key with boxes: float32 [K, len(labels)] class distributions, when given.
    probs: dict[str, np.ndarray] = field(default_factory=dict)


def _class_probs(where: str, rec: dict, k: int) -> tuple[list[str], np.ndarray] | None:
    """(classes, [k, len(classes)] rows summing to 1) of one line, or None when absent."""
    classes, probs = rec.get("classes"), rec.get("probs")
    if classes is None and probs is None:
        return None
    if classes is None or probs is None:
        raise VlpError(f"{where}: 'classes' and 'probs' go together (give both or neither)")
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(x, str) and x for x in classes)):
        raise VlpError(f"{where}: 'classes' must be a list of non-empty strings")
    if len(set(classes)) != len(classes):
        raise VlpError(f"{where}: 'classes' names a class twice")
    if not isinstance(probs, list) or len(probs) != k:
        raise VlpError(f"{where}: 'probs' must be a list with one row per box ({k})")
    try:
        arr = np.asarray(probs, dtype=np.float64).reshape(k, len(classes))
    except (ValueError, TypeError):
        raise VlpError(f"{where}: each 'probs' row must be {len(classes)} numbers, one per "
                       "entry of 'classes'") from None
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise VlpError(f"{where}: 'probs' must be finite non-negative numbers")
    sums = arr.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > PROBS_TOLERANCE)
    if bad.size:
        raise VlpError(f"{where}: 'probs' row {int(bad[0])} sums to {sums[bad[0]]:.4g}, not 1")
    return classes, arr / sums[:, None]


def read_boxes_jsonl(path: Path) -> GivenBoxes:
    """Parse a boxes file (the module docstring gives the format).

    Image keys are NFC-normalised like `list_images`' keys, so that a file written where
    names are NFD (macOS) still matches. Any malformed line is an error naming the file, the
    line and the field.
    """
    path = Path(path)
    out: dict[str, tuple[np.ndarray, list[str], np.ndarray]] = {}
    raw_probs: dict[str, tuple[list[str], np.ndarray]] = {}
    vocab: set[str] = set()
    with_probs = without_probs = None  # the first line of each kind, for the message
    for where, rec in iter_jsonl(path, "boxes file"):
        boxes, labels = rec.get("boxes"), rec.get("labels")
        if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
            raise VlpError(f"{where}: 'boxes' and 'labels' must be lists of the same length")
        try:
            arr = np.asarray(boxes, dtype=np.float32).reshape(len(boxes), 4)
        except (ValueError, TypeError):
            raise VlpError(f"{where}: each box must be [x1, y1, x2, y2] numbers")
        if len(arr) and (not np.isfinite(arr).all() or (arr[:, 2] < arr[:, 0]).any()
                         or (arr[:, 3] < arr[:, 1]).any()):
            raise VlpError(f"{where}: boxes need finite x1 <= x2 and y1 <= y2 (pixels)")
        if not all(isinstance(x, str) and x for x in labels):
            raise VlpError(f"{where}: 'labels' must be non-empty strings")
        scores = rec.get("scores", [1.0] * len(labels))
        if not isinstance(scores, list) or len(scores) != len(labels):
            raise VlpError(f"{where}: 'scores' must be a list as long as 'labels'")
        try:
            score_arr = np.asarray(scores, dtype=np.float32).reshape(len(labels))
        except (ValueError, TypeError):
            raise VlpError(f"{where}: 'scores' must be numbers") from None
        if not np.isfinite(score_arr).all():
            raise VlpError(f"{where}: 'scores' must be finite numbers")
        key = unicodedata.normalize("NFC", rec["image"])
        given = _class_probs(where, rec, len(labels))
        if given is not None:
            with_probs = with_probs or where
            raw_probs[key] = given
            vocab.update(given[0])
        elif labels:
            without_probs = without_probs or where
        if with_probs and without_probs:
            raise VlpError(f"{without_probs}: no 'classes'/'probs' while {with_probs} gives "
                           "them: give every line with boxes a class distribution, or none")
        out[key] = (arr, list(labels), score_arr)
        vocab.update(labels)
    if not out:
        raise VlpError(f"boxes file {path} holds no records")
    names = sorted(vocab)
    column = {x: i for i, x in enumerate(names)}
    probs: dict[str, np.ndarray] = {}
    for key, (classes, arr) in raw_probs.items():
        full = np.zeros((len(arr), len(names)), np.float32)
        full[:, [column[x] for x in classes]] = arr
        probs[key] = full
    return GivenBoxes(out, names, hashlib.sha256(path.read_bytes()).hexdigest()[:16], probs)
