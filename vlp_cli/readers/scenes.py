"""`scenes` / `scenes:N`: the embedded scenes data set (see vlp_cli/scenes/).

As a build-corpus source: one "caption" example per (scene, reference caption), 3 to 5 per
scene, and one "vqa" example per question with its single answer as `label`; ids
`SCENE-qN` where SCENE is e.g. `train-00012`. The ground truth (`scenes-objects.jsonl`) and
a summary (`scenes-summary.json`) are written into the corpus.

As an image source: the scenes rendered as PNG into the scratch folder (keys
`scenes/SPLIT/NNNNN.png`), and the simulated detector's boxes, tags and class distributions
as the boxes file (`scenes-boxes.jsonl`, kept beside the store).

`scenes` is `TRAIN_SCENES` train and `TEST_SCENES` test scenes; `scenes:N` the first N train
scenes and, in the same proportion, the first test scenes (at least one): the same scenes as
in the full set, so a small corpus is a sample of the large one.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from vlp_cli import VlpError
from vlp_cli.scenes import detector
from vlp_cli.scenes.language import captions, questions
from vlp_cli.scenes.layout import (SEED, SPLIT_INDEX, TEST_SCENES, TRAIN_SCENES, Scene,
                                   make_scenes, write_images)

NAME = "scenes"
SOURCE_HELP = ("`scenes` or `scenes:N`: the embedded scenes (2 to 6 easy-VQA shapes per image, "
               "captions with relations, questions, a simulated detector's boxes; N: the first "
               "N train scenes and proportionately many test scenes)")
REPORT_NOTE = ("scenes-summary.json", "scenes data set",
               ("Object tags here come from a simulated detector over the ground truth: "
                "jittered boxes, about 15% wrong top tags, low-confidence extra boxes."))
_SPEC = re.compile(rf"{NAME}:(\d+)")


def claims(spec: str) -> bool:
    return spec == NAME or _SPEC.fullmatch(spec) is not None


def counts(spec: str) -> dict[str, int]:
    """Scenes per split that a spec names."""
    if spec == NAME:
        return {"train": TRAIN_SCENES, "test": TEST_SCENES}
    match = _SPEC.fullmatch(spec)
    if match is None or int(match.group(1)) < 1:
        raise VlpError(f"source {spec!r}: expected `{NAME}` or `{NAME}:N` with N >= 1")
    n = int(match.group(1))
    return {"train": n, "test": max(1, round(n * TEST_SCENES / TRAIN_SCENES))}


def scenes(spec: str = NAME, seed: int = SEED) -> list[Scene]:
    """The scenes of a spec, train then test, each with its objects (class, colour, shape,
    size word, box) and a stable key (its image key)."""
    return [s for split, n in counts(spec).items() for s in make_scenes(split, n, seed)]


def scene_id(scene: Scene) -> str:
    """`train-00012`: the scene's id in example ids."""
    return f"{scene.split}-{scene.index:05d}"


def ground_truth(scene: Scene) -> dict:
    """One line of `scenes-objects.jsonl`."""
    return {"image": scene.key, "scene": scene_id(scene), "split": scene.split,
            "width": scene.width, "height": scene.height,
            "objects": [{"class": o.name, "color": o.color, "shape": o.shape, "size": o.size,
                         "box": list(o.box)} for o in scene.objects]}


def language(scene: Scene, seed: int = SEED) -> tuple[list[str], list[tuple[str, str]]]:
    """(reference captions, (question, answer) pairs) of a scene, from its own stream."""
    rng = np.random.default_rng([seed, SPLIT_INDEX[scene.split], scene.index, 4])
    return captions(scene, rng), questions(scene, rng)


def read(spec: str, workdir: Path) -> list[dict]:
    """Captions and questions of the scenes, as corpus examples (texts not yet tokenised);
    writes the ground truth and a summary into `workdir`."""
    examples: list[dict] = []
    answers: Counter[str] = Counter()
    found = scenes(spec)
    with (workdir / "scenes-objects.jsonl").open("w", encoding="utf-8") as f:
        for scene in found:
            f.write(json.dumps(ground_truth(scene)) + "\n")
            refs, qas = language(scene)
            base = {"split": scene.split, "images": [scene.key], "source": NAME}
            for text in refs:
                examples.append({**base, "kind": "caption", "texts": [text], "label": None,
                                 "id": None})
            for n, (q, a) in enumerate(qas):
                examples.append({**base, "kind": "vqa", "texts": [q], "label": [a],
                                 "id": f"{scene_id(scene)}-q{n}"})
                answers[a] += 1
    objects = [o for s in found for o in s.objects]
    summary = {
        "scenes": dict(Counter(s.split for s in found)),
        "objects": len(objects),
        "classes": len({o.name for o in objects}),
        "scenes_repeating_a_class": sum(len({o.name for o in s.objects}) < len(s.objects)
                                        for s in found),
        "captions": sum(e["kind"] == "caption" for e in examples),
        "questions": sum(e["kind"] == "vqa" for e in examples),
        "yes_share": round(answers["yes"] / max(answers["yes"] + answers["no"], 1), 3),
    }
    (workdir / "scenes-summary.json").write_text(json.dumps(summary, indent=2))
    return examples


def image_source(spec: str, scratch: Path) -> tuple[Path, Path | None]:
    """(image folder, boxes JSONL): the scenes rendered into `scratch`, and the simulated
    detector's boxes with class distributions."""
    found = scenes(spec)
    root = scratch / "images"
    write_images(found, root)
    return root, detector.write_boxes(found, scratch / "scenes-boxes.jsonl")
