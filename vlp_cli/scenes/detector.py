"""A simulated detector over the scenes' ground truth, written as a `--boxes` file.

Per object: its box jittered (each side by a few percent of the object's size), a score, and
a smoothed distribution over the 24 classes whose top class is the true one, or, for
`WRONG_TAG_PROB` of the objects, a confusable one: the same shape in another colour (most
often) or the same colour in another shape, with the true class then second. The tag is
always the distribution's argmax. Per image, 1 to `MAX_EXTRA` extra boxes (random crops of
the background or parts of objects) with low scores and flat distributions, as a detector's
low-confidence leftovers. The top class of an object box gets at least `TOP_MIN` of the mass
and the rest at most 1 - `TOP_MIN`, so the argmax is never in doubt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlp_cli.scenes.layout import CLASSES, COLORS, SEED, SHAPES, SPLIT_INDEX, Scene

WRONG_TAG_PROB = 0.15
SAME_SHAPE_SHARE = 0.7  # of wrong tags and of the confusion mass: another colour, same shape
JITTER = 0.06  # standard deviation of each box side's shift, as a share of the object's side
TOP_MIN, TOP_MAX = 0.55, 0.9
SMOOTH = 0.02  # spread evenly over all 24 classes
OBJECT_SCORES = (0.45, 0.99)
EXTRA_SCORES = (0.02, 0.3)
MAX_EXTRA = 3
DECIMALS = 4  # of probabilities and scores in the boxes file

_INDEX = {name: i for i, name in enumerate(CLASSES)}


@dataclass
class Detections:
    """One image's simulated detections; `truth[i]` is box i's true class, or None (extra)."""

    boxes: np.ndarray  # [K, 4]
    probs: np.ndarray  # [K, 24] over CLASSES
    scores: np.ndarray  # [K]
    truth: list[str | None]

    @property
    def labels(self) -> list[str]:
        return [CLASSES[int(i)] for i in self.probs.argmax(axis=1)]


def confusion_weights(name: str) -> np.ndarray:
    """How a class's confusion mass spreads: same shape, other colour (SAME_SHAPE_SHARE in
    all) and same colour, other shape (the rest)."""
    color, shape = name.split(" ")
    w = np.zeros(len(CLASSES))
    for c in COLORS:
        if c != color:
            w[_INDEX[f"{c} {shape}"]] = SAME_SHAPE_SHARE / (len(COLORS) - 1)
    for s in SHAPES:
        if s != shape:
            w[_INDEX[f"{color} {s}"]] = (1 - SAME_SHAPE_SHARE) / (len(SHAPES) - 1)
    return w


def _object_probs(true: str, rng: np.random.Generator) -> np.ndarray:
    weights = confusion_weights(true)
    top = _INDEX[true]
    if rng.random() < WRONG_TAG_PROB:
        top = int(rng.choice(len(CLASSES), p=weights))
    p = np.full(len(CLASSES), SMOOTH / len(CLASSES))
    p[top] += rng.uniform(TOP_MIN, TOP_MAX)
    rest = 1.0 - p.sum()
    if top != _INDEX[true]:  # the true class comes second
        share = rng.uniform(0.5, 0.9)
        p[_INDEX[true]] += share * rest
        rest -= share * rest
    weights[top] = 0.0
    weights[_INDEX[true]] = 0.0
    mask = weights > 0
    spread = np.zeros(len(CLASSES))
    spread[mask] = rng.dirichlet(weights[mask] * 4)
    return p + rest * spread


def _jitter(box: tuple[float, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    x1, y1, x2, y2 = box
    side = np.sqrt((x2 - x1) * (y2 - y1))
    b = np.asarray(box, float) + rng.normal(0, JITTER * side, size=4)
    b = b.clip(0, size)
    b[2], b[3] = max(b[2], b[0] + 2), max(b[3], b[1] + 2)
    return b.clip(0, size)


def _extra_box(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    if scene.objects and rng.random() < 0.5:  # a part of an object
        x1, y1, x2, y2 = scene.objects[int(rng.integers(len(scene.objects)))].box
        fx, fy = rng.uniform(0, 0.5, size=2)
        w, h = (x2 - x1) * rng.uniform(0.3, 0.6), (y2 - y1) * rng.uniform(0.3, 0.6)
        x, y = x1 + fx * (x2 - x1), y1 + fy * (y2 - y1)
        return np.array([x, y, min(x + w, scene.width), min(y + h, scene.height)])
    w, h = rng.uniform(10, 50, size=2)  # a patch of anything, often background
    x, y = rng.uniform(0, scene.width - w), rng.uniform(0, scene.height - h)
    return np.array([x, y, x + w, y + h])


def detect(scene: Scene, seed: int = SEED) -> Detections:
    """The simulated detections of one scene (its own random stream)."""
    rng = np.random.default_rng([seed, SPLIT_INDEX[scene.split], scene.index, 3])
    boxes, probs, scores, truth = [], [], [], []
    for obj in scene.objects:
        boxes.append(_jitter(obj.box, scene.width, rng))
        probs.append(_object_probs(obj.name, rng))
        scores.append(rng.uniform(*OBJECT_SCORES))
        truth.append(obj.name)
    for _ in range(int(rng.integers(1, MAX_EXTRA + 1))):
        boxes.append(_extra_box(scene, rng))
        probs.append(SMOOTH / len(CLASSES) + (1 - SMOOTH) * rng.dirichlet(np.full(len(CLASSES),
                                                                                  0.3)))
        scores.append(rng.uniform(*EXTRA_SCORES))
        truth.append(None)
    return Detections(np.asarray(boxes), np.asarray(probs), np.asarray(scores), truth)


def boxes_line(scene: Scene, det: Detections) -> dict:
    """The boxes-file record of one scene (see extractors/given.py for the format)."""
    probs = det.probs.round(DECIMALS)
    # Tags from the written values: the argmax a reader of the file finds.
    labels = [CLASSES[int(i)] for i in probs.argmax(axis=1)]
    return {"image": scene.key, "width": scene.width, "height": scene.height,
            "boxes": det.boxes.round(2).tolist(), "labels": labels,
            "scores": det.scores.round(DECIMALS).tolist(),
            "classes": list(CLASSES), "probs": probs.tolist()}


def write_boxes(scenes: list[Scene], path: Path, seed: int = SEED) -> Path:
    """Write the simulated detections of `scenes` as a `--boxes` JSONL file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for scene in scenes:
            f.write(json.dumps(boxes_line(scene, detect(scene, seed))) + "\n")
    return path
