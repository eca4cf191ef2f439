"""build-corpus input rules, and what `vlp inspect` says about tags."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import LABELS, tiny_recipe_obj
from vlp_cli.cli import app
from vlp_cli.stores.corpus import Corpus
from vlp_cli.stores.features import FeatureStoreWriter, Regions


def _jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def _build(tiny_data: dict, out: Path, *sources: str) -> object:
    return CliRunner().invoke(app, ["build-corpus", *sources, "-f", str(tiny_data["features"]),
                                    "-o", str(out)])


def test_blank_texts_are_dropped_and_counted(tiny_data: dict, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    from vlp_cli.stages import corpus

    src = _jsonl(tmp_path / "d.jsonl", [
        {"image": "img/0.png", "caption": "a red thing"},
        {"image": "img/1.png", "caption": "  \t "},
        {"image": "img/2.png", "question": " ", "answers": ["red"]},
        {"image": "img/3.png", "question": "what color?", "answers": ["red"]},
    ])
    with caplog.at_level(logging.INFO):
        corpus.run([str(src)], tiny_data["features"], tmp_path / "c", tiny_recipe_obj())
    c = Corpus(tmp_path / "c")
    assert len(c) == 2 and all(c.get(i)["texts"][0].strip() for i in range(2))
    assert "2 blank captions or questions dropped" in caplog.text


def test_empty_answers_and_unknown_splits_are_named(tiny_data: dict, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "q.jsonl", [
        {"image": "img/0.png", "question": "what color?", "answers": ["red"]},
        {"image": "img/1.png", "question": "what color?", "answers": []},
    ])
    result = _build(tiny_data, tmp_path / "c1", str(src))
    assert result.exit_code == 1
    assert f"{src} line 2: 'answers' is empty" in result.output
    result = _build(tiny_data, tmp_path / "c2", f"foo={src}")
    assert result.exit_code == 1
    assert f"unknown split 'foo' in 'foo={src}': use train, val or test" in result.output
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_unscorable_test_answers_and_the_val_carve_are_logged(
        tiny_data: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from vlp_cli.stages import corpus

    lines = [{"image": f"img/{i}.png", "question": "what color?", "answers": ["red"]}
             for i in range(10)]
    lines += [{"image": "img/20.png", "question": "what shape?", "answers": ["hexagon"],
               "split": "test"},
              {"image": "img/21.png", "question": "what color?", "answers": ["red"],
               "split": "test"}]
    src = _jsonl(tmp_path / "q.jsonl", lines)
    recipe = tiny_recipe_obj()  # corpus.val_fraction=0.2
    with caplog.at_level(logging.INFO):
        corpus.run([str(src)], tiny_data["features"], tmp_path / "c", recipe)
        # The answer vocabulary is the task's: counted when fine-tuning starts.
        from vlp_cli.checkpoint import load_tokenizer
        from vlp_cli.data.examples import ExampleBuilder
        from vlp_cli.stores.features import FeatureStore
        from vlp_cli.tasks import TASKS, Context

        tok = load_tokenizer("embedded:minilm")
        ctx = Context(recipe, Corpus(tmp_path / "c"), ExampleBuilder(
            tok, FeatureStore(tiny_data["features"]), recipe.data), tok)
        TASKS["vqa"].bind(recipe).prepare(ctx)
    assert "1 of 2 test questions have no answer in the 1-answer vocabulary" in caplog.text
    assert ("moved 2 of 10 train images (2 examples) to val (corpus.val_fraction=0.2"
            in caplog.text)
    assert Corpus(tmp_path / "c").meta["counts"]["vqa/val"] == 2


def test_inspect_counts_images_per_tag_at_the_read_threshold(tmp_path: Path) -> None:
    def regions(classes: list[int], conf: list[float]) -> Regions:
        k = len(classes)
        return Regions(np.zeros((k, 4), np.float16), np.tile([0, 0, 8, 8], (k, 1)).astype(
            np.float32), np.asarray(classes, np.int32), np.asarray(conf, np.float32), 16, 16)

    w = FeatureStoreWriter(tmp_path / "f", {"extractor": {"name": "t"}, "feature_dim": 4,
                                            "labels": LABELS})
    w.put("a", regions([2, 2, 2, 2], [0.9, 0.8, 0.7, 0.6]))  # four dogs in one image
    w.put("b", regions([0, 2], [0.5, 0.1]))  # a circle; a dog below the threshold
    w.put("c", regions([1], [0.3]))
    w.close()
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "f"), "--json"])
    info = json.loads(result.output)
    assert info["images_per_tag (conf >= 0.2)"] == {"dog": 1, "circle": 1, "traffic light": 1}
    assert info["boxes_per_image"]["histogram"]["1"] == 1
