"""VCR as released: `train.jsonl`, `val.jsonl`, `test.jsonl`, one question about a movie frame
per line.

    {"annot_id": "val-0", "img_fn": "lsmdc_1054_Harry_Potter/1054_..._00.01.34.982@0.jpg",
     "metadata_fn": "...json", "objects": ["person", "person", "horse"],
     "question": ["What", "is", [0], "doing", "?"],
     "answer_choices": [[[0], "is", "riding", "a", "horse", "."], ...4],
     "answer_label": 0, "rationale_choices": [["Because", [2], ...], ...4],
     "rationale_label": 2, "movie": "...", "img_id": "val-0", "question_number": 0, ...}

Region references: a list of object indices inside the tokens (`[0]`, `[0, 1]`). They are
written as the objects' class names with their index (`person0`, `person0 and person1`),
the indices of `objects`, which are also the order of the boxes in `metadata_fn` (so a
feature store extracted with those boxes, `vlp extract-features --boxes`, has region i =
object i). The choices are 4 answers and 4 rationales.

As a build-corpus source: one "vcr" example per line, texts
`[question + right answer + right rationale, question, answer 0..3, rationale 0..3]` (the
first, UNITER's second-stage pre-training text, is the question alone in the test file,
which has no labels), label {"answer": i, "rationale": j} (-1 in the test file), id the
`annot_id`. The split is `SPLIT=` when given, else the file's (train, val -> val, test).

Image keys, one rule: the `img_fn` path as it is (`lsmdc_.../...@0.jpg`), the relative paths
of VCR's `vcr1images/` folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.readers.files import first_line_has, split_spec
from vlp_cli.readers.jsonl_lines import iter_jsonl

NAME = "vcr"
SOURCE_HELP = "`[SPLIT=]{train,val,test}.jsonl` of VCR (claimed by content): questions"
KIND = "vcr"
CHOICES = 4
_SPLIT = {"train": "train", "val": "val", "test": "test"}


def claims(spec: str) -> bool:
    return first_line_has(spec, (".jsonl",), {"img_fn", "answer_choices", "objects"})


def render(tokens: list, objects: list[str], where: str) -> str:
    """VCR's tokens as text, each region reference as class name + index."""
    words = []
    for t in tokens:
        if isinstance(t, str):
            words.append(t)
        elif isinstance(t, list) and t and all(isinstance(i, int) and 0 <= i < len(objects)
                                               for i in t):
            words.append(" and ".join(f"{objects[i]}{i}" for i in t))
        else:
            raise VlpError(f"{where}: token {t!r} is neither a word nor a list of indices "
                           f"into its {len(objects)} objects")
    text = " ".join(words)
    return re.sub(r" ([.,?!';:])", r"\1", text)  # "doing ?" -> "doing?"


def read(spec: str, workdir: Path) -> list[dict]:
    split, path = split_spec(spec)
    split = split or _SPLIT.get(path.stem, "train")
    out = []
    for where, rec in iter_jsonl(path, "source", require="img_fn"):
        objects = rec.get("objects")
        if not (isinstance(objects, list) and all(isinstance(o, str) for o in objects)):
            raise VlpError(f"{where}: needs 'objects', a list of class names")
        texts = []
        for field in ("question", "answer_choices", "rationale_choices"):
            value = rec.get(field)
            if field == "question":
                value = [value]
            if not (isinstance(value, list) and len(value) == (1 if field == "question"
                                                               else CHOICES)
                    and all(isinstance(v, list) for v in value)):
                raise VlpError(f"{where}: '{field}' must be "
                               + ("a token list" if field == "question" else
                                  f"{CHOICES} token lists"))
            texts += [render(v, objects, f"{where} {field}") for v in value]
        a, r = rec.get("answer_label", -1), rec.get("rationale_label", -1)
        if not all(isinstance(x, int) and -1 <= x < CHOICES for x in (a, r)):
            raise VlpError(f"{where}: 'answer_label' and 'rationale_label' are 0..3")
        first = texts[0] if a < 0 or r < 0 else \
            f"{texts[0]} {texts[1 + a]} {texts[1 + CHOICES + r]}"
        out.append({"split": split, "images": [rec["img_fn"]], "kind": KIND,
                    "texts": [first, *texts], "label": {"answer": a, "rationale": r},
                    "id": rec.get("annot_id"), "where": where, "source": str(path)})
    return out
