"""VQA v2: the official questions + annotations files as a corpus source, the evaluation
server's results format, and `vlp evaluate vqa --predictions F --references F` scored as the
official evaluation does (hand-checked cases)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, one_error_line, make_regions, tiny_recipe_sets
from vlp_cli.readers import reader_for, vqa_v2

VQA = Path(__file__).parent / "fixtures" / "vqa"
QUESTIONS = VQA / "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = VQA / "v2_mscoco_val2014_annotations.json"
RESULTS = VQA / "vqa_val2014_results.json"
run, _error = cli, one_error_line


def test_reader_takes_the_official_files(tmp_path: Path) -> None:
    assert reader_for(str(QUESTIONS)) is vqa_v2
    exs = vqa_v2.read(str(QUESTIONS), tmp_path)
    assert len(exs) == 6 and {e["split"] for e in exs} == {"val"}
    assert {e["images"][0] for e in exs} == {"COCO_val2014_000000458752.jpg",
                                             "COCO_val2014_000000262146.jpg",
                                             "COCO_val2014_000000524291.jpg"}
    first = exs[0]
    assert first["kind"] == "vqa" and first["id"] == 458752000
    assert first["texts"] == ["Is this a train?"] and first["label"] == ["yes"] * 10
    assert {e["split"] for e in vqa_v2.read(f"train={QUESTIONS}", tmp_path)} == {"train"}


def test_questions_without_their_annotations_are_one_line(tmp_path: Path) -> None:
    q = tmp_path / QUESTIONS.name
    shutil.copy(QUESTIONS, q)
    from vlp_cli import VlpError

    with pytest.raises(VlpError) as err:
        vqa_v2.read(str(q), tmp_path)
    line = str(err.value)
    assert "\n" not in line and "v2_mscoco_val2014_annotations.json" in line and "beside" in line


def test_a_results_file_scores_as_the_official_evaluation(tmp_path: Path) -> None:
    """By hand: "yes" vs ten "yes" 1; "two" vs 2 x "2" + 8 x "two" (digits normalised) 1;
    "red" vs 1 red + 9 blue: nine of ten leave-one-out subsets hold one match, 9/10 x 1/3 =
    0.3; "cat" vs 3 cat + 7 dog: (3 x 2/3 + 7 x 1) / 10 = 0.9; "Yes" vs ten "yes": the
    answers all agree, so nothing is normalised and the case differs: 0; "an umbrella" vs
    6 "umbrella" + 4 "an umbrella" (articles dropped) 1. Overall 4.2 / 6 = 70."""
    res = run("evaluate", "vqa", "--predictions", RESULTS, "--references", ANNOTATIONS,
              "-o", tmp_path / "scored")  # not beside the fixture, in the repository
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert json.loads((tmp_path / "scored" / "metrics.json").read_text()) == out
    assert out["vqa_accuracy"] == pytest.approx(70.0)
    assert out["yes/no"] == pytest.approx(50.0) and out["number"] == pytest.approx(100.0)
    assert out["other"] == pytest.approx(220 / 3) and out["questions"] == 6


def test_partial_or_foreign_results_are_refused(tmp_path: Path) -> None:
    rows = json.loads(RESULTS.read_text())
    part = tmp_path / "part.json"
    part.write_text(json.dumps(rows[:4]))
    assert "2 questions" in _error(run("evaluate", "vqa", "--predictions", part,
                                       "--references", ANNOTATIONS))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(rows + [{"question_id": 1, "answer": "no"}]))
    assert "not in" in _error(run("evaluate", "vqa", "--predictions", foreign,
                                  "--references", ANNOTATIONS))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question_id": "458752000", "answer": "yes"}]))
    assert "entry [0]" in _error(run("evaluate", "vqa", "--predictions", bad,
                                     "--references", ANNOTATIONS))


def test_finetune_and_evaluate_from_the_official_files(tmp_path: Path) -> None:
    """The chain on the fixture: a store keyed by COCO file names, a corpus from the questions
    (train and test from the same file), fine-tuning, evaluation; evaluate writes the server's
    results file, and scoring that file without a checkpoint gives the same accuracy."""
    from vlp_cli.stores.features import FeatureStoreWriter

    rng = np.random.default_rng(0)
    w = FeatureStoreWriter(tmp_path / "features", {"extractor": {"name": "synthetic"},
                                                   "feature_dim": 16, "labels": ["a", "b"]})
    for image_id in (458752, 262146, 524291):
        w.put(vqa_v2.image_key("val2014", image_id), make_regions(rng, 4, 16))
    w.close()
    s = [a for x in tiny_recipe_sets() for a in ("--set", x)]
    io_ = ["-c", tmp_path / "corpus", "-f", tmp_path / "features"]
    for args in (["build-corpus", f"train={QUESTIONS}", f"test={QUESTIONS}", "--features",
                  tmp_path / "features", "--out", tmp_path / "corpus", *s, "--set",
                  "corpus.val_fraction=0"],
                 ["pretrain", "recipes/tiny.yaml", *io_, "-o", tmp_path / "pre", *s, "--set",
                  "oscar.text=[vqa]"],
                 ["finetune", "vqa", "-k", tmp_path / "pre", *io_, "-o", tmp_path / "vqa", *s]):
        res = run(*args)
        assert res.exit_code == 0, res.output
    res = run("evaluate", "vqa", "-k", tmp_path / "vqa", *io_)
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "eval-vqa-test" / "metrics.json").read_text())
    results = tmp_path / "eval-vqa-test" / "vqa_results.json"
    rows = json.loads(results.read_text())
    assert sorted(r["question_id"] for r in rows) == sorted(
        q["question_id"] for q in json.loads(QUESTIONS.read_text())["questions"])
    res = run("evaluate", "vqa", "--predictions", results, "--references", ANNOTATIONS)
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout[res.stdout.index("{"):])
    assert again["vqa_accuracy"] == pytest.approx(got["vqa_accuracy"])


def test_image_keys_of_a_store_imported_from_oscar_tsvs(tmp_path: Path) -> None:
    """Oscar's and VinVL's COCO TSVs key images by the bare image id: `corpus.image_keys`
    maps the official file names onto them; a field that does not exist is one line."""
    from vlp_cli.stores.features import FeatureStoreWriter

    rng = np.random.default_rng(0)
    w = FeatureStoreWriter(tmp_path / "features", {"extractor": {"name": "oscar-tsv"},
                                                   "feature_dim": 16, "labels": ["a", "b"]})
    for image_id in (458752, 262146, 524291):
        w.put(str(image_id), make_regions(rng, 4, 16))
    w.close()
    s = [a for x in tiny_recipe_sets() for a in ("--set", x)]
    args = ["build-corpus", f"train={QUESTIONS}", "--features", tmp_path / "features", *s]
    res = run(*args, "--out", tmp_path / "plain")
    assert "corpus.image_keys" in one_error_line(res)
    res = run(*args, "--out", tmp_path / "c", "--set", "corpus.image_keys={id}")
    assert "quote it" in one_error_line(res)  # YAML reads {id} as a mapping
    res = run(*args, "--out", tmp_path / "c", "--set", 'corpus.image_keys="{id}"')
    assert res.exit_code == 0, res.output
    from vlp_cli.stores.corpus import Corpus

    c = Corpus(tmp_path / "c")
    assert sorted({c.get(int(i))["images"][0] for i in range(len(c))}) == \
        ["262146", "458752", "524291"]
    res = run(*args, "--out", tmp_path / "bad", "--set", 'corpus.image_keys="{name}.npz"')
    assert "'{name}.npz'" in one_error_line(res) and "{lower}" in res.output
    from vlp_cli.readers.files import store_key

    assert store_key("COCO_val2014_000000391895.jpg", "{lower}.npz", "x") == \
        "coco_val2014_000000391895.npz"
    assert store_key("dev-850-0-img0.png", "nlvr2_{stem}.npz", "x") == "nlvr2_dev-850-0-img0.npz"
    assert store_key("COCO_val2014_000000391895.jpg", "{id:012d}", "x") == "000000391895"
