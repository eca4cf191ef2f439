"""COCO captions: the official annotation file as a corpus source, COCO results files, and
`vlp evaluate captioning --predictions F --references F` (no checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli, one_error_line
from vlp_cli.readers import coco_captions, reader_for

COCO = Path(__file__).parent / "fixtures" / "coco"
REFS = COCO / "captions_val2014.json"
RESULTS = COCO / "captions_val2014_fakecap_results.json"
run, _error = cli, one_error_line


def test_reader_takes_the_official_file(tmp_path: Path) -> None:
    assert reader_for(str(REFS)) is coco_captions
    exs = coco_captions.read(str(REFS), tmp_path)
    assert len(exs) == 9 and {e["split"] for e in exs} == {"val"}
    assert {e["images"][0] for e in exs} == {"COCO_val2014_000000391895.jpg",
                                             "COCO_val2014_000000522418.jpg",
                                             "COCO_val2014_000000184613.jpg"}
    first = exs[0]
    assert first["kind"] == "caption" and first["id"] == 100
    assert first["texts"] == ["A man with a red helmet on a small moped on a dirt road."]
    assert {e["split"] for e in coco_captions.read(f"test={REFS}", tmp_path)} == {"test"}


def test_image_ids_follow_the_documented_rule() -> None:
    assert coco_captions.image_id("COCO_val2014_000000391895.jpg") == 391895
    assert coco_captions.image_id("val2014/COCO_val2014_000000000042.jpg") == 42
    assert coco_captions.image_id("photos/dog.jpg") == "photos/dog.jpg"


def test_evaluate_scores_a_results_file_without_a_checkpoint(tmp_path: Path) -> None:
    from vlp_cli.metrics import caption_metrics

    res = run("evaluate", "captioning", "--predictions", RESULTS, "--references", REFS,
              "-o", tmp_path / "scored")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    preds = {str(r["image_id"]): r["caption"] for r in json.loads(RESULTS.read_text())}
    refs: dict[str, list[str]] = {}
    for a in json.loads(REFS.read_text())["annotations"]:
        refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    want = caption_metrics(preds, refs).as_dict()
    assert metrics["images"] == 3
    for k in ("bleu4", "rouge_l", "cider"):
        assert metrics[k] == want[k] and metrics[k] > 0
    rows = [json.loads(x) for x in (tmp_path / "scored" / "predictions.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 3 and all(len(r["references"]) == 3 for r in rows)
    # The same captions as vlp's own JSONL (image keys) against JSONL references.
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"image": k, "caption": c}) + "\n"
                                              for k, c in preds.items()))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"image": k, "caption": c}) + "\n"
                                              for k, cs in refs.items() for c in cs))
    res = run("evaluate", "captioning", "--predictions", tmp_path / "p.jsonl", "--references",
              tmp_path / "r.jsonl", "-o", tmp_path / "scored2")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "scored2" / "metrics.json").read_text())
    assert again["cider"] == metrics["cider"]


def test_scoring_mistakes_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps([{"image_id": 391895, "caption": "a man"},
                               {"image_id": 7, "caption": "a thing"}]))
    line = _error(run("evaluate", "captioning", "--predictions", bad, "--references", REFS))
    assert "1 of 2 images have no reference" in line and "'7'" in line and str(REFS) in line
    bad.write_text(json.dumps([{"image_id": 391895, "caption": "a"},
                               {"image_id": 391895, "caption": "b"}]))
    assert "second caption for image '391895'" in _error(
        run("evaluate", "captioning", "--predictions", bad, "--references", REFS))
    assert "go together" in _error(run("evaluate", "captioning", "--predictions", RESULTS))
    assert "missing --checkpoint" in _error(run("evaluate", "captioning"))
    assert "cannot score a --predictions file" in _error(
        run("evaluate", "retrieval", "--predictions", RESULTS, "--references", REFS))
    assert "no 'annotations' list" in _error(
        run("evaluate", "captioning", "--predictions", RESULTS, "--references", RESULTS))
