"""Conceptual Captions and SBU as released: `[SPLIT=]FILE.tsv`, one image per line, `caption<TAB>
image` with no header (CC's `Train_GCC-training.tsv`: caption, then the image's URL).

As a build-corpus source: one "caption" example per line, id the line number (from 1). The
split is `SPLIT=` when given, else read from the file name (`Validation_GCC-1.1.0-Validation.tsv`
-> val, `...test...` -> test, otherwise train).

Image keys, one rule: a URL or path in the second column gives the line's index, 0-based and
zero-padded to 9 digits, plus `.jpg` (`000000041.jpg`, the names downloaders such as
img2dataset give a TSV's images in line order); a third column, when present, is the key itself
(the name your downloaded image has). Lines without an image (a failed download marked
empty) are skipped and counted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.readers.files import split_spec

logger = logging.getLogger(__name__)

NAME = "caption-tsv"
SOURCE_HELP = ("`[SPLIT=]FILE.tsv`: Conceptual Captions / SBU, `caption<TAB>image URL[<TAB>key]` "
               "per line")
_SPLIT_WORDS = (("val", "val"), ("test", "test"))


def claims(spec: str) -> bool:
    return split_spec(spec)[1].suffix.lower() == ".tsv"


def key_of(index: int) -> str:
    return f"{index:09d}.jpg"


def read(spec: str, workdir: Path) -> list[dict]:
    split, path = split_spec(spec)
    if not path.is_file():
        raise VlpError(f"source {path} not found")
    if split is None:
        low = path.name.lower()
        split = next((s for word, s in _SPLIT_WORDS if word in low), "train")
    out, skipped = [], 0
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise VlpError(f"source {path}: not UTF-8 text") from None
    for index, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        cols = line.split("\t")
        where = f"{path}:{index + 1}"
        if len(cols) not in (2, 3):
            raise VlpError(f"{where}: expected `caption<TAB>image[<TAB>key]`, found "
                           f"{len(cols)} column(s)")
        caption, image = cols[0].strip(), cols[1].strip()
        if not caption or not image:
            skipped += 1
            continue
        key = cols[2].strip() if len(cols) == 3 and cols[2].strip() else key_of(index)
        out.append({"split": split, "images": [key], "kind": "caption", "texts": [caption],
                    "label": None, "id": index + 1, "where": where, "source": str(path)})
    if skipped:
        logger.warning("%s: %d lines without a caption or an image skipped", path, skipped)
    return out
