"""GQA as released: `[SPLIT=]{train,val,testdev}_balanced_questions.json` (or `_all_`), one JSON
object keyed by question id.

    {"02930152": {"question": "Is the sky dark?", "imageId": "2354786", "answer": "yes",
                  "fullAnswer": "Yes, the sky is dark.", "isBalanced": true,
                  "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
                  "semantic": [...], "entailed": [...], "equivalent": [...], ...}, ...}

As a build-corpus source: one "vqa" example per question with its single answer as the label,
so `vlp finetune vqa` trains GQA as UNITER and Oscar do (a classifier on [CLS] over the answer
vocabulary; one answer per question: exact match after VQA's normalisation), id the question
id. Questions without an answer (the test and challenge files) are refused: they cannot be a
training or evaluation corpus. The split is `SPLIT=` when given, else the file name's (`train`,
`val`; `testdev` -> test).

Image keys, one rule: `<imageId>.jpg`, the names in GQA's `images/` folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.readers.files import load_json, split_spec

NAME = "gqa"
SOURCE_HELP = "`[SPLIT=]{train,val,testdev}_balanced_questions.json`: GQA questions"
_NAME = re.compile(r"^(train|val|testdev|test|challenge|submission)_(balanced|all)_questions"
                   r"(_\d+)?\.json$")
_SPLIT = {"train": "train", "val": "val", "testdev": "test", "test": "test",
          "challenge": "test", "submission": "test"}


def claims(spec: str) -> bool:
    return bool(_NAME.match(split_spec(spec)[1].name))


def read(spec: str, workdir: Path) -> list[dict]:
    split, path = split_spec(spec)
    data = load_json(path, "source")
    if not isinstance(data, dict):
        raise VlpError(f"source {path}: GQA questions are one object keyed by question id")
    m = _NAME.match(path.name)
    split = split or (_SPLIT[m.group(1)] if m else "train")
    out = []
    for qid, q in data.items():
        where = f"{path} question {qid!r}"
        if not (isinstance(q, dict) and isinstance(q.get("question"), str)
                and isinstance(q.get("imageId"), str)):
            raise VlpError(f"{where}: needs 'question' and 'imageId' strings")
        if not isinstance(q.get("answer"), str):
            raise VlpError(f"{where}: has no 'answer' (GQA's test and challenge questions "
                           "have none); use the train, val or testdev files")
        out.append({"split": split, "images": [f"{q['imageId']}.jpg"], "kind": "vqa",
                    "texts": [q["question"].strip()], "label": [q["answer"]], "id": qid,
                    "where": where, "source": str(path)})
    return out
