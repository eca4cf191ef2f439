"""Shared fixtures: a tiny synthetic feature store and corpus, and a recipe for tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LABELS = ["circle", "traffic light", "dog"]
COLORS = ["red", "blue", "green"]


def make_regions(rng: np.random.Generator, k: int, dim: int, with_probs: bool = False):
    from vlp_cli.stores.features import Regions

    xy = rng.uniform(0, 40, size=(k, 2))
    wh = rng.uniform(4, 20, size=(k, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    probs = rng.dirichlet(np.ones(len(LABELS)), size=k).astype(np.float16) if with_probs else None
    return Regions(
        features=rng.normal(size=(k, dim)).astype(np.float16), boxes=boxes,
        class_ids=rng.integers(0, len(LABELS), size=k).astype(np.int32),
        confidences=rng.uniform(0, 1, size=k).astype(np.float32), width=64, height=64,
        class_probs=probs, image_feature=rng.normal(size=dim).astype(np.float16),
    )


def _tiny_store(root: Path, extra=None) -> dict[str, Path]:
    """24 images (16-d features) with captions and questions in a store and a corpus; `extra`
    (writer, rng) -> more build-corpus sources about images it adds."""
    from vlp_cli.stages import corpus
    from vlp_cli.stores.features import FeatureStoreWriter

    rng = np.random.default_rng(0)
    meta = {"extractor": {"name": "synthetic"}, "feature_dim": 16, "labels": LABELS}
    w = FeatureStoreWriter(root / "features", meta)
    lines = []
    for i in range(24):
        key = f"img/{i}.png"
        w.put(key, make_regions(rng, 5, 16))
        split = "test" if i >= 18 else "train"
        color = COLORS[i % 3]
        lines.append({"image": key, "caption": f"a {color} thing number {i}", "split": split})
        lines.append({"image": key, "question": "what color is it?", "answers": [color],
                      "split": split})
        lines.append({"image": key, "question": "is it red?",
                      "answers": ["yes" if color == "red" else "no"], "split": split})
    sources = extra(root, w, rng) if extra is not None else []
    w.close()
    src = root / "data.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    corpus.run([str(src), *sources], root / "features", root / "corpus", tiny_recipe_obj())
    return {"root": root, "features": root / "features", "corpus": root / "corpus",
            "source": src}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 24-image feature store (16-d features) and a corpus of captions and questions."""
    return _tiny_store(tmp_path_factory.mktemp("tiny"))


def write_task_sources(root: Path, writer, rng: np.random.Generator, dim: int = 16) -> list[str]:
    """NLVR2, SNLI-VE, RefCOCO and VCR files in their released formats about images it adds to a
    feature store `writer`; returns the build-corpus sources (the refs pickle is written as
    the release wrote it, protocol 2)."""
    import pickle

    nlvr2, snli, refs, images, anns = [], {"train": [], "test": []}, [], [], []
    labels = ["entailment", "neutral", "contradiction"]
    for k in range(12):
        prefix = "train" if k < 8 else ("dev" if k < 10 else "test1")
        for img in (0, 1):
            writer.put(f"{prefix}-{k}-0-img{img}.png", make_regions(rng, 4, dim))
        nlvr2.append({"identifier": f"{prefix}-{k}-0-{k % 2}", "sentence":
                      f"the left image has {k % 3 + 1} dogs", "label": ["True", "False"][k % 2],
                      "left_url": "http://x/l.jpg", "right_url": "http://x/r.jpg",
                      "writer": "w", "synset": "dog", "query": "dogs", "validation": {}})
        key = f"COCO_train2014_{k:012d}.jpg"
        regions = make_regions(rng, 5, dim)
        writer.put(key, regions)
        snli["train" if k < 9 else "test"].append(
            {"Flikr30kID": key, "sentence2": f"a dog is {['red', 'blue', 'green'][k % 3]}",
             "gold_label": labels[k % 3], "pairID": f"{key}#{k}r1{'enc'[k % 3]}",
             "sentence1": "a dog", "captionID": f"{key}#{k}"})
        images.append({"id": k, "file_name": key, "width": 64, "height": 64})
        # The referred object: the most confident box, which every read keeps.
        x1, y1, x2, y2 = (float(v) for v in regions.boxes[regions.confidences.argmax()])
        anns.append({"id": 100 + k, "image_id": k, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "category_id": 1, "area": 1.0, "iscrowd": 0})
        refs.append({"ref_id": k, "ann_id": 100 + k, "image_id": k, "category_id": 1,
                     "split": (["train"] * 8 + ["val", "testA", "testB", "testA"])[k],
                     "file_name": f"COCO_train2014_{k:012d}_{100 + k}.jpg",
                     "sentences": [{"sent_id": 2 * k + j, "sent": f"the thing number {k % 5}",
                                    "raw": "x", "tokens": ["x"]} for j in (0, 1)]})
    (root / "nlvr2").mkdir()
    for name, lines in (("train.json", nlvr2[:8]), ("dev.json", nlvr2[8:10]),
                        ("test1.json", nlvr2[10:])):
        (root / "nlvr2" / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
    for split, lines in snli.items():
        (root / f"snli_ve_{split}.jsonl").write_text("".join(json.dumps(x) + "\n"
                                                             for x in lines))
    (root / "refcoco").mkdir()
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "refcoco" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "dog"}]}))
    # VCR's test file has no labels: labelled questions held out as 'test' come from a val
    # file given as `test=...`.
    vcr = {"train": [], "val": [], "heldout": []}
    for k in range(10):
        key = f"lsmdc_tiny/frame{k}@0.jpg"
        writer.put(key, make_regions(rng, 4, dim, with_probs=True))  # MRC-kl's targets
        choices = [[[0], "is", w, "."] for w in ("running", "sitting", "eating", "asleep")]
        reasons = [["because", [1], "is", w, "."] for w in ("near", "far", "red", "gone")]
        vcr["train" if k < 7 else "val" if k < 8 else "heldout"].append(
            {"movie": "tiny", "objects": ["dog", "circle", "dog", "circle"],
             "img_fn": key, "metadata_fn": key.replace(".jpg", ".json"),
             "question": ["what", "is", [0, 2], "doing", "?"], "answer_choices": choices,
             "answer_label": k % 4, "rationale_choices": reasons, "rationale_label": (k + 1) % 4,
             "annot_id": f"{'train' if k < 7 else 'val'}-{k}", "img_id": f"x-{k}",
             "question_number": 0})
    (root / "vcr").mkdir()
    for split, lines in vcr.items():
        (root / "vcr" / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n"
                                                           for x in lines))
    return [str(root / "vcr" / "train.jsonl"), str(root / "vcr" / "val.jsonl"),
            f"test={root / 'vcr' / 'heldout.jsonl'}"] + \
        [str(root / "nlvr2" / n) for n in ("train.json", "dev.json", "test1.json")] + \
        [str(root / "snli_ve_train.jsonl"), str(root / "snli_ve_test.jsonl"),
         str(root / "refcoco" / "refs(unc).p")]


@pytest.fixture(scope="session")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny store and corpus plus NLVR2, SNLI-VE and RefCOCO examples read from their
    released formats: every task's kinds."""
    return _tiny_store(tmp_path_factory.mktemp("tasks"), write_task_sources)


def tiny_recipe_sets() -> list[str]:
    """Overrides that make every stage tiny and fast."""
    sets = ["model.init=random:tiny", "data.max_regions=6", "data.min_boxes=1",
            "data.max_boxes=5", "corpus.val_fraction=0.2", "retrieval.eval_images=0",
            "captioning.max_caption_len=8", "vqa.max_text_len=24", "extract.min_size=64",
            "extract.batch_size=4"]
    # The demo mixes six objectives; most tests run Oscar's alone (tests/test_uniter.py mixes).
    sets += ["pretrain.tasks={oscar: 1}", "pretrain.corpora=[]",
             "pretrain.train.eval_at_start=false"]
    for task in ("pretrain", "vqa", "retrieval", "captioning", "gqa", "nlvr2", "snli_ve",
                 "refcoco", "vcr"):
        sets += [f"{task}.train.steps=3", f"{task}.train.batch_size=4",
                 f"{task}.train.warmup_steps=1", f"{task}.train.eval_every=2",
                 f"{task}.train.eval_batches=2", f"{task}.train.log_every=1"]
    return sets


def tiny_recipe_obj():
    from vlp_cli.config import load_recipe

    return load_recipe("tiny", tiny_recipe_sets())


def cli(*args) -> object:
    """`vlp ARGS` through typer's CliRunner (exceptions become the exit code, as for a user)."""
    from typer.testing import CliRunner

    from vlp_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(res) -> str:
    """The single `error:` line of a failed command: exit 1, no traceback."""
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]
