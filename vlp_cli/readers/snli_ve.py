"""SNLI-VE as released: `snli_ve_train.jsonl`, `snli_ve_dev.jsonl`, `snli_ve_test.jsonl`, one
hypothesis about a Flickr30K image per line.

    {"Flikr30kID": "2248275918.jpg", "sentence2": "A man is sleeping.", "gold_label":
     "contradiction", "pairID": "2248275918.jpg#2r1c", "sentence1": "...", "captionID": ...}

As a build-corpus source: one "snli-ve" example per line whose `gold_label` is entailment,
neutral or contradiction (others, SNLI's "-", are skipped and counted), the hypothesis
(`sentence2`) as its text, id the `pairID`. The split is `SPLIT=` when given, else the file
name's (`_train` -> train, `_dev` -> val, `_test` -> test).

Image keys, one rule: the Flickr30K file name (`Flikr30kID`, the data set's own spelling), the
keys of the Flickr30K images folder extracted as it is and of `dataset_flickr30k.json`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.readers.files import split_spec
from vlp_cli.readers.jsonl_lines import iter_jsonl

logger = logging.getLogger(__name__)

NAME = "snli-ve"
SOURCE_HELP = "`[SPLIT=]snli_ve_{train,dev,test}.jsonl`: SNLI-VE hypotheses"
KIND = "snli-ve"
LABELS = ("entailment", "neutral", "contradiction")
_NAME = re.compile(r"snli_ve_(train|dev|test)\.jsonl$")
_SPLIT = {"train": "train", "dev": "val", "test": "test"}


def claims(spec: str) -> bool:
    return bool(_NAME.search(split_spec(spec)[1].name))


def read(spec: str, workdir: Path) -> list[dict]:
    split, path = split_spec(spec)
    m = _NAME.search(path.name)
    split = split or (_SPLIT[m.group(1)] if m else "train")
    out, skipped = [], 0
    for where, rec in iter_jsonl(path, "source", require="Flikr30kID"):
        hyp, label = rec.get("sentence2"), rec.get("gold_label")
        if not isinstance(hyp, str):
            raise VlpError(f"{where}: needs a 'sentence2' string (the hypothesis)")
        if label not in LABELS:
            skipped += 1
            continue
        out.append({"split": split, "images": [rec["Flikr30kID"]], "kind": KIND,
                    "texts": [hyp.strip()], "label": label, "id": rec.get("pairID"),
                    "where": where, "source": str(path)})
    if skipped:
        logger.warning("%s: %d lines without entailment, neutral or contradiction skipped",
                       path, skipped)
    return out
