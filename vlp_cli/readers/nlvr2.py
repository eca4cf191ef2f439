"""NLVR2 as released: `train.json`, `dev.json`, `test1.json` (JSON lines, one statement about
a pair of images per line).

    {"identifier": "dev-850-0-0", "sentence": "The left image contains twice the number of
     dogs as the right image.", "label": "False", "left_url": "...", "right_url": "...",
     "writer": "...", "synset": "...", "query": "...", "validation": {...}}

As a build-corpus source: one "nlvr2" example per line, two images (left, right), the
statement as its text, label "True" / "False", id the `identifier`. The split is `SPLIT=` when
given, else the identifier's prefix (`train` -> train, `dev` -> val, `test1` / `test2` -> test).

Image keys, one rule: the official image file names, `<identifier without its last part>-img0.png`
and `-img1.png` (`dev-850-0-0` -> `dev-850-0-img0.png`, `dev-850-0-img1.png`), as the images
come in their `dev/` folders.

The file is claimed by its content (a first line with "identifier", "sentence" and
"left_url"): the names are generic.
"""

from __future__ import annotations

from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.readers.files import first_line_has, split_spec
from vlp_cli.readers.jsonl_lines import iter_jsonl

NAME = "nlvr2"
SOURCE_HELP = "`[SPLIT=]train.json|dev.json|test1.json`: NLVR2 statements (JSON lines)"
KIND = "nlvr2"
_PREFIX = {"train": "train", "dev": "val", "test1": "test", "test2": "test"}


def claims(spec: str) -> bool:
    return first_line_has(spec, (".json", ".jsonl"), {"identifier", "sentence", "left_url"})


def image_keys(identifier: str) -> list[str]:
    stem = identifier.rsplit("-", 1)[0]
    return [f"{stem}-img0.png", f"{stem}-img1.png"]


def read(spec: str, workdir: Path) -> list[dict]:
    split, path = split_spec(spec)
    out = []
    for where, rec in iter_jsonl(path, "source", require="identifier"):
        ident, sentence, label = rec["identifier"], rec.get("sentence"), rec.get("label")
        if not isinstance(sentence, str) or label not in ("True", "False"):
            raise VlpError(f"{where}: needs a 'sentence' string and a 'label', \"True\" or "
                           "\"False\"")
        s = split or _PREFIX.get(ident.split("-", 1)[0])
        if s is None:
            raise VlpError(f"{where}: identifier {ident!r} starts with none of "
                           f"{', '.join(_PREFIX)}; give the split as SPLIT={path}")
        out.append({"split": s, "images": image_keys(ident), "kind": KIND,
                    "texts": [sentence.strip()], "label": label, "id": ident, "where": where,
                    "source": str(path)})
    return out
