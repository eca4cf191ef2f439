"""RefCOCO's refs(unc).p + instances.json, read with a restricted unpickler: the fixture is
written as the release wrote it (pickle protocol 2) at test time; a hostile pickle is refused
and runs nothing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from vlp_cli import VlpError
from vlp_cli.readers import reader_for, refcoco

REFS = [
    {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000581857_16.jpg", "ann_id": 1719310,
     "ref_id": 0, "image_id": 581857, "split": "train", "category_id": 1,
     "sentences": [{"tokens": ["the", "lady", "with", "the", "blue", "shirt"], "raw":
                    "THE LADY WITH THE BLUE SHIRT", "sent_id": 0,
                    "sent": "the lady with the blue shirt"},
                   {"tokens": ["lady", "w", "back", "to", "us"], "raw": "lady w back to us",
                    "sent_id": 1, "sent": "lady w back to us"}]},
    {"sent_ids": [2], "file_name": "COCO_train2014_000000581857_15.jpg", "ann_id": 1719311,
     "ref_id": 1, "image_id": 581857, "split": "testA", "category_id": 1,
     "sentences": [{"tokens": ["woman", "on", "right"], "raw": "woman on right",
                    "sent_id": 2, "sent": "woman on right"}]},
    {"sent_ids": [3], "file_name": "COCO_train2014_000000000009_1.jpg", "ann_id": 1038967,
     "ref_id": 2, "image_id": 9, "split": "testB", "category_id": 51,
     "sentences": [{"tokens": ["bowl", "of", "broccoli"], "raw": "bowl of broccoli",
                    "sent_id": 3, "sent": "bowl of broccoli"}]},
]
INSTANCES = {
    "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "height": 640,
                "width": 427},
               {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 480,
                "width": 640}],
    "annotations": [{"id": 1719310, "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.42],
                     "category_id": 1, "area": 10000.0, "iscrowd": 0},
                    {"id": 1719311, "image_id": 581857, "bbox": [260.0, 120.5, 160.0, 400.0],
                     "category_id": 1, "area": 10000.0, "iscrowd": 0},
                    {"id": 1038967, "image_id": 9, "bbox": [1.08, 187.69, 611.59, 285.84],
                     "category_id": 51, "area": 120057.13, "iscrowd": 0}],
    "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 51, "name": "bowl", "supercategory": "kitchen"}]}


def _release(tmp_path: Path, refs: object) -> Path:
    root = tmp_path / "refcoco"
    root.mkdir()
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "instances.json").write_text(json.dumps(INSTANCES))
    return root / "refs(unc).p"


def test_refs_and_instances_become_one_example_per_sentence(tmp_path: Path) -> None:
    path = _release(tmp_path, REFS)
    assert reader_for(str(path)) is refcoco
    exs = refcoco.read(str(path), tmp_path)
    assert [e["texts"][0] for e in exs] == ["the lady with the blue shirt", "lady w back to us",
                                            "woman on right", "bowl of broccoli"]
    assert [e["split"] for e in exs] == ["train", "train", "test", "test"]
    assert [e["label"]["subset"] for e in exs[2:]] == ["testA", "testB"]
    assert exs[0]["images"] == ["COCO_train2014_000000581857.jpg"]
    assert exs[0]["label"]["box"] == [103.93, 299.99, 134.22, 177.42]
    assert {e["id"] for e in refcoco.read(f"test={path}", tmp_path)} == {2, 3}


def test_python2_byte_strings_are_read_as_latin1(tmp_path: Path) -> None:
    """The release was pickled by Python 2: its strings are byte strings (SHORT_BINSTRING)."""
    p = tmp_path / "refs(unc).p"
    p.write_bytes(b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x04caf\xe9q\x03ua.")
    assert refcoco.load_refs(p) == [{"sent": "caf\xe9"}]


class _Hostile:
    def __reduce__(self):
        import os

        return (os.system, ("touch HACKED",))


def test_a_pickle_that_names_a_function_is_refused_and_runs_nothing(tmp_path: Path,
                                                                     monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _release(tmp_path, [REFS[0], _Hostile()])
    with pytest.raises(VlpError, match=r"refused, it names (posix|os)\.system"):
        refcoco.read(str(path), tmp_path)
    assert not (tmp_path / "HACKED").exists()
    # A class instance (not a builtin container) is refused too.
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(
        pickle.dumps([VlpError("x")], protocol=2))
    with pytest.raises(VlpError, match="refused"):
        refcoco.read(str(path), tmp_path)
