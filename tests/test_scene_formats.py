"""`vlp export-scenes`: the scene set in six data sets' own formats, read back by the readers,
fine-tuned and evaluated per task with a text-only baseline and the majority-class results
file, and `vlp report`'s learning table (make demo-tasks, on a tiny model)."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, one_error_line, tiny_recipe_sets

SETS = [a for x in tiny_recipe_sets() for a in ("--set", x)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "data"
    res = cli("export-scenes", "scenes:40", "--out", out)
    assert res.exit_code == 0, res.output
    return out


def test_every_format_is_written_as_released(exported: Path) -> None:
    from vlp_cli.readers.refcoco import load_refs

    sources = json.loads((exported / "sources.json").read_text())
    assert sorted(sources) == ["COCO captions", "GQA", "NLVR2", "RefCOCO", "SNLI-VE", "VQA v2"]
    qs = json.loads((exported / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json")
                    .read_text())
    anns = json.loads((exported / "vqa" / "v2_mscoco_train2014_annotations.json").read_text())
    for name in ("captions_train2014.json", "captions_val2014.json"):
        caps = json.loads((exported / "coco" / name).read_text())["annotations"]
        assert len({c["id"] for c in caps}) == len(caps)  # unique, as COCO's are
    assert qs["data_subtype"] == "train2014" and len(qs["questions"]) == len(anns["annotations"])
    a = anns["annotations"][0]
    assert len(a["answers"]) == 10 and {x["answer"] for x in a["answers"]} == \
        {a["multiple_choice_answer"]}
    refs = load_refs(exported / "refcoco" / "refs(unc).p")
    assert {r["split"] for r in refs} == {"train", "testA", "testB"}
    inst = json.loads((exported / "refcoco" / "instances.json").read_text())
    assert {a["id"] for a in inst["annotations"]} >= {r["ann_id"] for r in refs}
    # every image a file names is written, and has the detector's boxes
    boxes = {json.loads(x)["image"] for x in (exported / "boxes.jsonl").read_text().splitlines()}
    assert boxes == {p.name for p in (exported / "images").iterdir()}
    nlvr2 = [json.loads(x) for x in (exported / "nlvr2" / "train.json").read_text().splitlines()]
    for r in nlvr2:
        prefix = r["identifier"].rsplit("-", 1)[0]
        assert {f"{prefix}-img0.png", f"{prefix}-img1.png"} <= boxes


def _form(text: str) -> str:
    """A sentence with its colours, shapes, numbers and sides replaced: its form."""
    from vlp_cli.scenes.language import NUMBERS
    from vlp_cli.scenes.layout import COLORS, SHAPES

    words = set(COLORS) | set(SHAPES) | {f"{s}s" for s in SHAPES} | set(NUMBERS) | \
        {"left", "right", "above", "below", "small", "medium", "large"}
    return " ".join("_" if w in words else w for w in re.findall(r"[a-z]+", text.lower()))


def test_yes_no_and_true_false_forms_come_with_both_answers(exported: Path) -> None:
    """Across the set, every NLVR2 statement form is both true and false and the labels are
    balanced, so the words alone cannot decide; SNLI-VE's forms likewise."""
    rows = [json.loads(x) for x in (exported / "nlvr2" / "train.json").read_text().splitlines()]
    labels = Counter(r["label"] for r in rows)
    assert labels["True"] == labels["False"]
    by_form = defaultdict(set)
    for r in rows:
        by_form[_form(r["sentence"])].add(r["label"])
    common = [f for f, n in Counter(_form(r["sentence"]) for r in rows).items() if n >= 8]
    assert common and all(by_form[f] == {"True", "False"} for f in common), dict(by_form)
    ve = [json.loads(x) for x in (exported / "snli_ve" / "snli_ve_train.jsonl")
          .read_text().splitlines()]
    assert Counter(r["gold_label"] for r in ve) == {"contradiction": len(ve) // 2,
                                                     "entailment": len(ve) // 4,
                                                     "neutral": len(ve) // 4}
    # A hidden property is neutral of an object that is there, a contradiction of one that is not.
    for r in ve:
        if r["gold_label"] == "neutral":
            assert r["sentence2"].split()[1] != "picture"
    gqa = json.loads((exported / "gqa" / "train_balanced_questions.json").read_text())
    yes_no = Counter(q["answer"] for q in gqa.values() if q["answer"] in ("yes", "no"))
    assert abs(yes_no["yes"] - yes_no["no"]) <= 0.2 * sum(yes_no.values())
    assert {q["types"]["structural"] for q in gqa.values()} == \
        {"query", "verify", "logical", "compare", "choose"}


def test_export_refuses_a_folder_with_something_in_it(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    line = one_error_line(cli("export-scenes", "scenes:5", "--out", tmp_path / "x"))
    assert "--out" in line and "not empty" in line
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_blank_regions_leaves_the_box_count_and_nothing_else() -> None:
    from vlp_cli.config import DataCfg
    from vlp_cli.data.examples import ExampleBuilder
    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.stores.records import Regions

    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 30, 30], [1, 2, 3, 4]], np.float32)
    r = Regions(rng.normal(size=(3, 8)).astype(np.float16), boxes, np.array([1, 2, 3]),
                np.ones(3, np.float32), 64, 64)
    tok = load_tokenizer("embedded:minilm")
    labels = ["a", "b", "c", "d"]
    seen = ExampleBuilder(tok, None, DataCfg(image_region=False), labels).image_input(r)
    blank = ExampleBuilder(tok, None, DataCfg(image_region=False, blank_regions=True),
                           labels).image_input(r)
    assert len(blank.feats) == len(seen.feats) == 3 and seen.tag_classes
    assert seen.feats.any() and seen.pos.any()
    assert not blank.feats.any() and not blank.pos.any() and blank.tag_classes == []
    # a text-only model's chosen region is still scored against the true box (RefCOCO)
    from vlp_cli.tasks.refcoco import region_ious
    assert np.allclose(blank.corners, boxes / 64)
    assert region_ious(blank, [0, 0, 10, 10]) == region_ious(seen, [0, 0, 10, 10])
    assert region_ious(blank, [0, 0, 10, 10])[0] == 1.0


@pytest.mark.slow
def test_every_task_runs_from_the_exported_formats_and_report_judges_learning(
        exported: Path, tmp_path: Path) -> None:
    """The chain of make demo-tasks on a tiny random model: one store, one pre-training, each
    task with regions and text only, the majority file scored, the learning table."""
    src = json.loads((exported / "sources.json").read_text())
    feats = tmp_path / "features"
    res = cli("extract-features", exported / "images", "--boxes", exported / "boxes.jsonl",
              "--out", feats, "--recipe", "recipes/tiny.yaml", *SETS)
    assert res.exit_code == 0, res.output
    corpora = {}
    for name, s in src.items():
        sets = [a for x in s.get("sets", []) for a in ("--set", x)]
        corpora[name] = tmp_path / re.sub(r"\W", "", name)
        res = cli("build-corpus", *s["sources"], "-f", feats, "-o", corpora[name], "--recipe",
                  "recipes/tiny.yaml", *SETS, *sets)
        assert res.exit_code == 0, (name, res.output)
    pre = tmp_path / "pre"
    res = cli("pretrain", "recipes/tiny.yaml", "-c", corpora["COCO captions"], "-f", feats,
              "-o", pre, *SETS)
    assert res.exit_code == 0, res.output
    runs = {"vqa": "VQA v2", "gqa": "GQA", "nlvr2": "NLVR2", "snli-ve": "SNLI-VE",
            "refcoco": "RefCOCO", "captioning": "COCO captions"}
    ev = tmp_path / "eval"
    for task, name in runs.items():
        io_ = ["-c", corpora[name], "-f", feats]
        extra = ["--limit", "4"] if task == "captioning" else []
        for variant, sets in (("", []), ("-text-only", ["--set", "data.blank_regions=true"])):
            ft = tmp_path / f"{task}{variant}"
            res = cli("finetune", task, "-k", pre, *io_, "-o", ft, *SETS, *sets)
            assert res.exit_code == 0, (task, res.output)
            res = cli("evaluate", task, "-k", ft, *io_, *extra, "-o", ev / f"{task}{variant}")
            assert res.exit_code == 0, (task, res.output)
        res = cli("evaluate", task, "--predictions", src[name]["majority"], "--references",
                  src[name]["references"], "-o", ev / f"{task}-majority")
        assert res.exit_code == 0, (task, res.output)
    blank = json.loads((ev / "vqa-text-only" / "metrics.json").read_text())
    assert blank["inputs"] == "text only"
    from vlp_cli.stages.report import collect, learning_rows

    rows = {r["task"]: r for r in learning_rows(collect(ev)[0])}
    assert sorted(rows) == sorted(runs)
    for r in rows.values():
        assert r["majority"] is not None and r["text_only"] is not None
        assert r["margin"] == pytest.approx(r["value"] - max(r["majority"], r["text_only"]))
    # NLVR2's and SNLI-VE's majority levels are those of the labels written
    assert rows["nlvr2"]["majority"] == pytest.approx(50.0)
    assert rows["snli-ve"]["majority"] == pytest.approx(50.0)
    res = cli("report", ev)
    assert res.exit_code == 0 and "does each task learn" in res.output, res.output
