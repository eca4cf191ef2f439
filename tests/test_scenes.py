"""The embedded scenes data set: layouts, simulated detector, language, boxes-file class
distributions, and the CLI from `extract-features scenes:N` to a corpus."""

from __future__ import annotations

import importlib.util
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_recipe_sets
from typer.testing import CliRunner

from vlp_cli import VlpError
from vlp_cli.extractors.given import read_boxes_jsonl

pytestmark = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None,
                                reason="easy_vqa not installed (pip install easy-vqa==1.0)")

N_TRAIN = 600  # enough scenes for rates, a fraction of a second once the pool is cached


@pytest.fixture(scope="module")
def train_scenes():
    from vlp_cli.scenes.layout import make_scenes

    return make_scenes("train", N_TRAIN)


# --- layouts -----------------------------------------------------------------------------


def test_deterministic_and_prefix_stable(train_scenes) -> None:
    from vlp_cli.readers import scenes as reader
    from vlp_cli.scenes.detector import detect
    from vlp_cli.scenes.layout import make_scenes, render

    again = make_scenes("train", 30)
    assert again == train_scenes[:30]  # scene i does not depend on how many are made
    assert make_scenes("train", 30, seed=10) != again
    assert np.array_equal(render(again[3]), render(train_scenes[3]))
    a, b = detect(again[3]), detect(train_scenes[3])
    assert np.array_equal(a.probs, b.probs) and np.array_equal(a.boxes, b.boxes)
    assert reader.language(again[3]) == reader.language(train_scenes[3])
    small, full = reader.scenes("scenes:10"), reader.counts("scenes")
    assert [s.split for s in small].count("test") == 2 and small[:10] == train_scenes[:10]
    assert full == {"train": 3000, "test": 600}
    with pytest.raises(VlpError, match="scenes:N"):
        reader.counts("scenes:0")


def test_splits_use_their_own_easy_vqa_images(train_scenes) -> None:
    from vlp_cli.scenes.layout import make_scenes

    assert all(o.source.startswith("train/") for s in train_scenes for o in s.objects)
    test = make_scenes("test", 100)
    assert all(o.source.startswith("test/") for s in test for o in s.objects)
    assert {s.key for s in test}.isdisjoint(s.key for s in train_scenes)


def test_classes_counts_repeats_and_overlaps(train_scenes) -> None:
    from vlp_cli.scenes.layout import CANVAS, CLASSES, MAX_OBJECTS, MIN_OBJECTS, SIZE_BANDS

    assert len(CLASSES) == 24
    assert {o.name for s in train_scenes for o in s.objects} == set(CLASSES)
    assert {len(s.objects) for s in train_scenes} == set(range(MIN_OBJECTS, MAX_OBJECTS + 1))
    repeats = np.mean([len({o.name for o in s.objects}) < len(s.objects) for s in train_scenes])
    assert 0.1 < repeats < 0.7
    overlapping = 0
    for s in train_scenes:
        boxes = np.array([o.box for o in s.objects])
        assert (boxes >= 0).all() and (boxes <= CANVAS).all()
        for o in s.objects:
            lo, hi = SIZE_BANDS[o.size]
            assert lo - 0.1 <= np.sqrt((o.box[2] - o.box[0]) * (o.box[3] - o.box[1])) <= hi + 0.1
        iw = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0],
                                                                           boxes[None, :, 0])
        ih = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1],
                                                                           boxes[None, :, 1])
        hit = (iw > 0) & (ih > 0)
        np.fill_diagonal(hit, False)
        overlapping += bool(hit.any())
    assert 0.05 * N_TRAIN < overlapping < 0.8 * N_TRAIN  # some overlap, not everywhere


def test_rendered_shapes_are_where_the_boxes_say(train_scenes) -> None:
    from vlp_cli.readers.easyvqa import REFERENCE_RGB
    from vlp_cli.scenes.layout import render

    scene = next(s for s in train_scenes if len(s.objects) == 2)
    rgb = render(scene).astype(int)
    top = scene.objects[-1]  # painted last: its centre shows its own colour
    cx, cy = int((top.box[0] + top.box[2]) / 2), int((top.box[1] + top.box[3]) / 2)
    assert np.abs(rgb[cy, cx] - np.array(REFERENCE_RGB[top.color])).max() <= 2
    assert np.abs(rgb[0, 0] - np.array(scene.background)).max() <= 12 or any(
        o.box[0] < 2 and o.box[1] < 2 for o in scene.objects)


# --- simulated detector ------------------------------------------------------------------


def test_detector_wrong_tags_distributions_and_extras(train_scenes) -> None:
    from vlp_cli.scenes.detector import boxes_line, detect

    wrong = total = 0
    for scene in train_scenes:
        det = detect(scene)
        assert np.allclose(det.probs.sum(axis=1), 1.0)
        line = boxes_line(scene, det)
        assert line["labels"] == [line["classes"][int(np.argmax(p))] for p in line["probs"]]
        for tag, true, score in zip(det.labels, det.truth, det.scores):
            if true is None:
                assert score <= 0.3  # extra boxes: low confidence
                continue
            total += 1
            if tag != true:
                wrong += 1
                tc, ts = tag.split()
                yc, ys = true.split()
                assert tc == yc or ts == ys  # a confusable class
        assert sum(t is None for t in det.truth) >= 1
    assert 0.10 <= wrong / total <= 0.20


# --- language ----------------------------------------------------------------------------

_NUMBER = "(zero|one|two|three|four|five|six)"
_SHAPE_WORD = re.compile(rf"\b(?:{_NUMBER} \w+ )?(?:{_NUMBER} )?(circle|rectangle|triangle)(s?)\b")
_NUM = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def _objects_named(caption: str) -> int:
    n = 0
    for m in _SHAPE_WORD.finditer(caption):
        count = m.group(1) or m.group(2)
        n += _NUM[count] if count and m.group(4) else 1
    return n


def test_captions_name_several_objects_and_questions_are_right(train_scenes) -> None:
    from vlp_cli.readers.scenes import language
    from vlp_cli.scenes.layout import COLORS, SHAPES

    yes = no = related = 0
    kinds = set()
    for scene in train_scenes[:300]:
        refs, qas = language(scene)
        assert 3 <= len(refs) <= 5 and len(set(refs)) == len(refs)
        assert all(_objects_named(r) >= 2 for r in refs), refs
        related += any(re.search(r" (left of|right of|above|below) ", r) for r in refs)
        names = [o.name for o in scene.objects]
        for q, a in qas:
            yes += a == "yes"
            no += a == "no"
            if m := re.fullmatch(r"is there a (\w+ \w+)\?", q):
                assert a == ("yes" if m.group(1) in names else "no")
            elif m := re.fullmatch(r"how many (\w+)s are there\?", q):
                assert a == str(sum(o.shape == m.group(1) for o in scene.objects))
            elif m := re.fullmatch(r"how many (\w+) shapes are there\?", q):
                assert a == str(sum(o.color == m.group(1) for o in scene.objects))
            kinds.add("yes/no" if a in ("yes", "no") else "count" if a.isdigit() else
                      "color" if a in COLORS else "shape" if a in SHAPES else "size")
    assert kinds == {"yes/no", "count", "color", "shape", "size"}
    assert related >= 200  # most scenes have a caption relating two objects
    assert 0.45 <= yes / (yes + no) <= 0.55


# --- boxes file with class distributions -------------------------------------------------


def _line(**extra) -> dict:
    return {"image": "a.png", "boxes": [[0, 0, 4, 4], [1, 1, 3, 3]], "labels": ["cat", "dog"],
            "classes": ["dog", "cat", "cow"], "probs": [[0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]} | extra


def test_boxes_file_probs_are_stored_over_the_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    lines = [_line(), {"image": "empty.png", "boxes": [], "labels": []},
             _line(image="b.png", labels=["cat", "cat"], probs=[[0.2, 0.7, 0.1], [0, 1, 0]])]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    given = read_boxes_jsonl(path)
    assert given.labels == ["cat", "cow", "dog"]  # labels and classes, sorted
    assert np.allclose(given.probs["a.png"], [[0.8, 0.1, 0.1], [0.3, 0.1, 0.6]])
    assert "empty.png" not in given.probs and given.boxes["empty.png"][1] == []


@pytest.mark.parametrize("change, phrase", [
    ({"probs": None}, "'classes' and 'probs' go together"),
    ({"classes": ["dog", "dog", "cow"]}, "'classes' names a class twice"),
    ({"classes": ["dog", 3, "cow"]}, "'classes' must be a list of non-empty strings"),
    ({"probs": [[0.1, 0.8, 0.1]]}, r"'probs' must be a list with one row per box \(2\)"),
    ({"probs": [[0.1, 0.9], [0.6, 0.4]]}, "each 'probs' row must be 3 numbers"),
    ({"probs": [[0.1, 0.8, 0.1], [0.6, "x", 0.1]]}, "each 'probs' row must be 3 numbers"),
    ({"probs": [[0.1, 0.8, 0.1], [1.2, -0.3, 0.1]]}, "'probs' must be finite non-negative"),
    ({"probs": [[0.1, 0.8, 0.1], [0.6, 0.6, 0.1]]}, "'probs' row 1 sums to 1.3, not 1"),
])
def test_malformed_probs_name_file_line_and_field(tmp_path: Path, change: dict,
                                                  phrase: str) -> None:
    path = tmp_path / "b.jsonl"
    bad = {k: v for k, v in (_line() | change).items() if v is not None}
    path.write_text(json.dumps(_line(image="ok.png")) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(VlpError, match=f"b.jsonl line 2: {phrase}") as err:
        read_boxes_jsonl(path)
    assert "\n" not in str(err.value)


def test_probs_on_some_lines_only_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    plain = {"image": "p.png", "boxes": [[0, 0, 1, 1]], "labels": ["cat"]}
    path.write_text(json.dumps(_line()) + "\n" + json.dumps(plain) + "\n")
    with pytest.raises(VlpError, match="line 2: no 'classes'/'probs' while .*line 1 gives"):
        read_boxes_jsonl(path)


# --- the CLI ----------------------------------------------------------------------------


def test_extract_and_build_corpus_from_scenes(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp_cli.cli import app
    from vlp_cli.scenes.layout import CLASSES
    from vlp_cli.stores.corpus import Corpus
    from vlp_cli.stores.features import FeatureStore

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where extract renders
    runner = CliRunner()
    sets = [x for s in tiny_recipe_sets() for x in ("--set", s)]
    f, c = tmp_path / "features", tmp_path / "corpus"
    for args in (["extract-features", "scenes:12", "--out", f], ["extract-features",
                 "scenes:12", "--out", f], ["build-corpus", "scenes:12", "-f", f, "-o", c]):
        res = runner.invoke(app, [str(a) for a in args] + sets, catch_exceptions=False)
        assert res.exit_code == 0, res.output
    assert list(scratch.iterdir()) == []  # the rendered images are gone
    store = FeatureStore(f)
    assert len(store) == 14 and store.meta["source"] == "scenes:12"  # 12 train + 2 test
    assert store.labels == sorted(CLASSES)
    assert (f / "scenes-boxes.jsonl").is_file()
    for key in store.keys():
        r = store.get_selected(key, 0.2, 1, 5, probs=True)
        assert r.class_probs is not None and r.class_probs.shape == (len(r), 24)
        p = r.class_probs.astype(np.float32)
        assert np.allclose(p.sum(axis=1), 1.0, atol=0.01)
        assert (p.max(axis=1) < 0.95).all()  # a distribution: the MRC-kl target is no one-hot
        assert (p.argmax(axis=1) == r.class_ids).all()
    corpus = Corpus(c)
    examples = [corpus.get(i) for i in range(len(corpus))]
    assert {(e["kind"], e["split"]) for e in examples} >= {("caption", "train"), ("vqa", "train"),
                                                           ("caption", "test"), ("vqa", "test"),
                                                           ("caption", "val")}
    assert all(e["label"] is None for e in examples if e["kind"] == "caption")
    assert all(len(e["label"]) == 1 for e in examples if e["kind"] == "vqa")
    truth = [json.loads(x) for x in (c / "scenes-objects.jsonl").read_text().splitlines()]
    assert len(truth) == 14 and all(2 <= len(t["objects"]) <= 6 for t in truth)
    assert json.loads((c / "scenes-summary.json").read_text())["scenes"] == {"train": 12,
                                                                            "test": 2}
