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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 24-image feature store (16-d features) and a corpus of captions and questions."""
    from vlp_cli.stages import corpus
    from vlp_cli.stores.features import FeatureStoreWriter

    root = tmp_path_factory.mktemp("tiny")
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
    w.close()
    src = root / "data.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recipe = tiny_recipe_obj()
    corpus.run([str(src)], root / "features", root / "corpus", recipe)
    return {"root": root, "features": root / "features", "corpus": root / "corpus",
            "source": src}


def tiny_recipe_sets() -> list[str]:
    """Overrides that make every stage tiny and fast."""
    sets = ["model.init=random:tiny", "data.max_regions=6", "data.min_boxes=1",
            "data.max_boxes=5", "corpus.val_fraction=0.2", "retrieval.eval_images=0",
            "captioning.max_caption_len=8", "vqa.max_text_len=24", "extract.min_size=64",
            "extract.batch_size=4"]
    # The demo mixes six objectives; most tests run Oscar's alone (tests/test_uniter.py mixes).
    sets += ["pretrain.tasks={oscar: 1}", "pretrain.corpora=[]",
             "pretrain.train.eval_at_start=false"]
    for task in ("pretrain", "vqa", "retrieval", "captioning"):
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
