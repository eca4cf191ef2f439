"""The Karpathy splits: `dataset_coco.json`, `dataset_flickr30k.json` (and `dataset_flickr8k.json`),
the caption splits every captioning and retrieval paper of the seeds reports on.

    {"dataset": "coco", "images": [{"filepath": "val2014",
      "filename": "COCO_val2014_000000391895.jpg", "imgid": 0, "split": "test",
      "cocoid": 391895, "sentids": [...], "sentences": [{"tokens": [...],
      "raw": "A man with a red helmet on a small moped on a dirt road.", "imgid": 0,
      "sentid": 770337}, ...]}, ...]}

As a build-corpus source: one "caption" example per sentence (its `raw` text), id the
`sentid`, split the image's: `train`, `val`, `test`, and `restval` -> train (Oscar and UNITER
train on restval: the 113K COCO training images). `SPLIT=` before the path keeps only that
split's images (`test=dataset_coco.json`: the 5K test images).

Image keys, one rule: the `filename` (COCO's `COCO_val2014_000000391895.jpg`, Flickr30K's
`1000092795.jpg`): the keys of a folder of those images extracted as it is, and of the
`coco-captions` and `vqa-v2` readers for the same COCO images.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.readers.files import load_json, split_spec

NAME = "karpathy"
SOURCE_HELP = "`[SPLIT=]dataset_{coco,flickr30k,flickr8k}.json`: the Karpathy caption splits"
_NAME = re.compile(r"dataset_(coco|flickr30k|flickr8k)\.json$")
# The Karpathy file's split -> vlp's (restval: the rest of COCO val, trained on).
SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def claims(spec: str) -> bool:
    return bool(_NAME.search(split_spec(spec)[1].name))


def read(spec: str, workdir: Path) -> list[dict]:
    only, path = split_spec(spec)
    data = load_json(path, "source")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise VlpError(f"source {path}: no 'images' list (a Karpathy split file has 'images', "
                       "each with 'filename', 'split' and 'sentences')")
    out = []
    for i, im in enumerate(images):
        where = f"{path} images[{i}]"
        sents = im.get("sentences") if isinstance(im, dict) else None
        if not (isinstance(im, dict) and isinstance(im.get("filename"), str)
                and im.get("split") in SPLIT_OF and isinstance(sents, list)):
            raise VlpError(f"{where}: needs 'filename', a 'split' among "
                           f"{', '.join(SPLIT_OF)} and a 'sentences' list")
        split = SPLIT_OF[im["split"]]
        if only is not None and split != only:
            continue
        for j, s in enumerate(sents):
            if not (isinstance(s, dict) and isinstance(s.get("raw"), str)):
                raise VlpError(f"{where} sentences[{j}]: needs a 'raw' string")
            if s["raw"].strip():
                out.append({"split": split, "images": [im["filename"]], "kind": "caption",
                            "texts": [s["raw"].strip()], "label": None, "id": s.get("sentid"),
                            "where": f"{where} sentences[{j}]", "source": str(path)})
    return out
