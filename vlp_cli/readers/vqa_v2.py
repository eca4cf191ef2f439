"""VQA v2 (and v1): `[SPLIT=]v2_OpenEnded_mscoco_<subtype>_questions.json` with its annotations
file beside it (`v2_mscoco_<subtype>_annotations.json`), the official release's names.

    questions:   {"data_subtype": "val2014", "questions": [{"image_id": 262148,
                  "question": "Where is he looking?", "question_id": 262148000}, ...]}
    annotations: {"annotations": [{"question_id": 262148000, "image_id": 262148,
                  "answer_type": "other", "multiple_choice_answer": "down",
                  "answers": [{"answer": "down", "answer_confidence": "yes",
                               "answer_id": 1}, ...ten...]}, ...]}

As a build-corpus source: one "vqa" example per question, its label the ten human answers
(the task normalises them and computes soft scores as the official evaluation does), its id
the question_id. The split is `SPLIT=` when given, else the subtype's (`train2014` -> train,
`val2014` -> val, `test2015` / `test-dev2015` -> test).

Image keys, one rule: COCO's file name, `COCO_<subtype>_<image_id as 12 digits>.jpg` (the keys
of a folder of COCO images extracted as it is, and of `coco-captions` examples).

Results (what the evaluation server takes, what `evaluate vqa` writes): `[{"question_id",
"answer"}]`; `read_results` and `read_annotations` serve `vlp evaluate vqa --predictions
results.json --references annotations.json`.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.readers.files import load_json, split_spec
from vlp_cli.stores.corpus import SPLITS

NAME = "vqa-v2"
SOURCE_HELP = ("`[SPLIT=]v2_OpenEnded_mscoco_*_questions.json`: VQA v2 questions, with the "
               "annotations file beside them")
_NAME = re.compile(r"OpenEnded_.*questions\.json$")


def claims(spec: str) -> bool:
    return bool(_NAME.search(split_spec(spec)[1].name))


def annotations_path(questions: Path) -> Path:
    """The official name of the annotations beside a questions file."""
    name = questions.name.replace("OpenEnded_", "").replace("questions", "annotations")
    return questions.with_name(name)


def image_key(subtype: str, image_id: int) -> str:
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


def read_annotations(path: Path, what: str = "--references") -> dict[int, dict]:
    """question_id -> {"answers": [ten answer strings], "answer_type", "image_id"}."""
    data = load_json(Path(path), what)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise VlpError(f"{what} {path}: no 'annotations' list (VQA annotations have "
                       "'annotations' with 'question_id' and 'answers')")
    out: dict[int, dict] = {}
    for i, a in enumerate(anns):
        answers = a.get("answers") if isinstance(a, dict) else None
        if not (isinstance(a, dict) and isinstance(a.get("question_id"), int)
                and isinstance(answers, list) and answers
                and all(isinstance(x, dict) and isinstance(x.get("answer"), str)
                        for x in answers)):
            raise VlpError(f"{what} {path}: annotations[{i}] needs an integer 'question_id' "
                           "and 'answers', a list of {\"answer\": str}")
        out[a["question_id"]] = {"answers": [x["answer"] for x in answers],
                                 "answer_type": a.get("answer_type"),
                                 "image_id": a.get("image_id")}
    return out


def read(spec: str, workdir: Path) -> list[dict]:
    split, path = split_spec(spec)
    data = load_json(path, "source")
    qs = data.get("questions") if isinstance(data, dict) else None
    subtype = data.get("data_subtype") if isinstance(data, dict) else None
    if not isinstance(qs, list) or not isinstance(subtype, str):
        raise VlpError(f"source {path}: a VQA questions file has 'data_subtype' and a "
                       "'questions' list")
    ann_path = annotations_path(path)
    if not ann_path.is_file():
        raise VlpError(f"source {path}: its annotations {ann_path} are not there; put the "
                       "official annotations file beside the questions (test questions have "
                       "none: they cannot be a training or evaluation corpus)")
    anns = read_annotations(ann_path, "annotations")
    if split is None:
        split = "test" if subtype.startswith("test") else \
            next((s for s in SPLITS if subtype.startswith(s)), "train")
    out = []
    for i, q in enumerate(qs):
        where = f"{path} questions[{i}]"
        if not (isinstance(q, dict) and isinstance(q.get("question_id"), int)
                and isinstance(q.get("image_id"), int) and isinstance(q.get("question"), str)):
            raise VlpError(f"{where}: needs integer 'question_id' and 'image_id' and a "
                           "'question' string")
        ann = anns.get(q["question_id"])
        if ann is None:
            raise VlpError(f"{where}: question_id {q['question_id']} has no annotation in "
                           f"{ann_path}")
        out.append({"split": split, "images": [image_key(subtype, q["image_id"])],
                    "kind": "vqa", "texts": [q["question"].strip()], "label": ann["answers"],
                    "id": q["question_id"], "where": where, "source": str(path)})
    return out


def read_results(path: Path) -> dict[int, str]:
    """question_id -> answer from a results file `[{"question_id", "answer"}]`."""
    data = load_json(Path(path), "--predictions")
    if not isinstance(data, list):
        raise VlpError(f"--predictions {path}: a VQA results file is a list of "
                       '{"question_id", "answer"}')
    out: dict[int, str] = {}
    for i, r in enumerate(data):
        if not (isinstance(r, dict) and isinstance(r.get("question_id"), int)
                and isinstance(r.get("answer"), str)):
            raise VlpError(f"--predictions {path} entry [{i}]: needs an integer 'question_id' "
                           "and an 'answer' string")
        if r["question_id"] in out:
            raise VlpError(f"--predictions {path} entry [{i}]: a second answer for question "
                           f"{r['question_id']}")
        out[r["question_id"]] = r["answer"]
    return out
