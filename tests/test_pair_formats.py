"""NLVR2 and SNLI-VE in their released formats, read into corpus examples (the tasks that
train on them are issue 10's next part)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_cli import VlpError
from vlp_cli.readers import jsonl, nlvr2, reader_for, snli_ve

FIX = Path(__file__).parent / "fixtures"
NLVR2 = FIX / "nlvr2" / "dev.json"
SNLI_VE = FIX / "snli_ve" / "snli_ve_dev.jsonl"


def test_nlvr2_statements_name_both_images(tmp_path: Path) -> None:
    assert reader_for(str(NLVR2)) is nlvr2
    exs = nlvr2.read(str(NLVR2), tmp_path)
    assert [e["images"] for e in exs] == [["dev-850-0-img0.png", "dev-850-0-img1.png"],
                                          ["dev-269-2-img0.png", "dev-269-2-img1.png"],
                                          ["dev-269-2-img0.png", "dev-269-2-img1.png"]]
    assert [e["label"] for e in exs] == ["False", "True", "False"]
    assert {e["split"] for e in exs} == {"val"} and exs[0]["id"] == "dev-850-0-0"
    assert {e["split"] for e in nlvr2.read(f"test={NLVR2}", tmp_path)} == {"test"}
    # A generic .json that is not NLVR2 stays vlp's JSONL.
    other = tmp_path / "dev.json"
    other.write_text('{"image": "a.png", "caption": "a cat"}\n')
    assert reader_for(str(other)) is jsonl
    bad = tmp_path / "bad.json"
    bad.write_text('{"identifier": "dev-1-0-0", "sentence": "x", "left_url": "u", '
                   '"label": "maybe"}\n')
    with pytest.raises(VlpError, match=r"bad\.json line 1: needs a 'sentence' string and a "
                                       r"'label'"):
        nlvr2.read(str(bad), tmp_path)


def test_snli_ve_hypotheses_with_gold_labels(tmp_path: Path) -> None:
    assert reader_for(str(SNLI_VE)) is snli_ve
    exs = snli_ve.read(str(SNLI_VE), tmp_path)
    assert [e["label"] for e in exs] == ["contradiction", "entailment", "neutral"]  # "-" out
    assert [e["images"] for e in exs] == [["2248275918.jpg"]] * 2 + [["10002456.jpg"]]
    assert exs[0]["texts"] == ["A man is sleeping in a hammock."]
    assert {e["split"] for e in exs} == {"val"} and exs[2]["id"] == "10002456.jpg#0r1n"


def test_gqa_questions_train_through_the_vqa_task(tmp_path: Path) -> None:
    from vlp_cli.readers import gqa

    path = FIX / "gqa" / "val_balanced_questions.json"
    assert reader_for(str(path)) is gqa
    exs = gqa.read(str(path), tmp_path)
    assert [(e["id"], e["images"], e["label"], e["kind"], e["split"]) for e in exs] == [
        ("02930152", ["2354786.jpg"], ["yes"], "vqa", "val"),
        ("07333408", ["2375429.jpg"], ["pipe"], "vqa", "val")]
    no_answer = tmp_path / "test_balanced_questions.json"
    no_answer.write_text('{"1": {"question": "Is it?", "imageId": "n1"}}')
    with pytest.raises(VlpError, match="has no 'answer'"):
        gqa.read(str(no_answer), tmp_path)
