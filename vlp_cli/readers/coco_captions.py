"""COCO captions: `[SPLIT=]captions_*.json` (the official annotation files), and COCO caption
results (`[{"image_id", "caption"}]`, what the COCO evaluation server and `evaluate
captioning` take and write).

    {"images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", ...}, ...],
     "annotations": [{"id": 770337, "image_id": 391895, "caption": "A man with ..."}, ...]}

As a build-corpus source: one "caption" example per annotation; the image key is the image's
`file_name` (an image folder extracted as is gives keys of that name); the id is the
annotation's. The split is `SPLIT=` when given, otherwise read from the file name
(`captions_train2014.json` -> train, `..._val...` -> val, `..._test...` -> test).

Image ids and keys: `image_id(key)` is the integer that ends a key's file stem
(`COCO_val2014_000000391895.jpg` -> 391895; keys without one stay strings), so results
written from a store of COCO images carry COCO's own ids.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlp_cli import VlpError
from vlp_cli.readers.files import load_json, split_spec
from vlp_cli.readers.jsonl_lines import iter_jsonl
from vlp_cli.stores.corpus import SPLITS

NAME = "coco-captions"
SOURCE_HELP = "`[SPLIT=]captions_*.json`: COCO's caption annotations"
_NAME = re.compile(r"captions_.*\.json$")
_TRAILING_INT = re.compile(r"(\d+)$")


def claims(spec: str) -> bool:
    return bool(_NAME.search(split_spec(spec)[1].name))


def image_id(key: str) -> int | str:
    """COCO's image id of a store key: the integer ending its file stem, else the key."""
    m = _TRAILING_INT.search(Path(key).stem)
    return int(m.group(1)) if m else key


def _annotations(data: Any, path: Path, what: str) -> list[dict]:
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise VlpError(f"{what} {path}: no 'annotations' list (a COCO captions file has "
                       "'images' and 'annotations')")
    _check_entries(anns, f"{what} {path}: annotations")
    return anns


def _check_entries(entries: list, where: str) -> None:
    """Every entry a {"image_id": int or str, "caption": str, ...} object."""
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("caption"), str)
                and isinstance(e.get("image_id"), (int, str))):
            raise VlpError(f"{where}[{i}] needs 'image_id' and a 'caption' string")


def read(spec: str, workdir: Path) -> list[dict]:
    split, path = split_spec(spec)
    data = load_json(path, "source")
    anns = _annotations(data, path, "source")
    names = {im.get("id"): im.get("file_name") for im in data.get("images", [])
             if isinstance(im, dict)}
    if split is None:
        split = next((s for s in SPLITS if s in path.stem), "train")
    out = []
    for i, a in enumerate(anns):
        key = names.get(a["image_id"])
        if not isinstance(key, str):
            raise VlpError(f"source {path}: annotations[{i}] refers to image_id "
                           f"{a['image_id']!r}, which has no 'file_name' in 'images'")
        if a["caption"].strip():
            out.append({"split": split, "images": [key], "kind": "caption",
                        "texts": [a["caption"].strip()], "label": None, "id": a.get("id"),
                        "where": f"{path} annotations[{i}]", "source": str(path)})
    return out


def read_references(path: Path) -> dict[str, list[str]]:
    """Reference captions by image: a COCO captions file (by image_id) or JSONL lines
    {"image", "caption"} (by image key), several per image."""
    path = Path(path)
    refs: dict[str, list[str]] = {}
    if path.suffix.lower() == ".jsonl":
        for where, rec in iter_jsonl(path, "--references"):
            if not isinstance(rec.get("caption"), str):
                raise VlpError(f"{where}: needs a 'caption' string")
            refs.setdefault(rec["image"], []).append(rec["caption"])
        return refs
    for a in _annotations(load_json(path, "--references"), path, "--references"):
        refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    return refs


def read_results(path: Path) -> dict[str, str]:
    """One caption per image: COCO results JSON `[{"image_id", "caption"}]` or JSONL lines
    {"image", "caption"} (`vlp caption`'s output)."""
    path = Path(path)
    rows: list[tuple[str, str, str]] = []
    if path.suffix.lower() == ".jsonl":
        for where, rec in iter_jsonl(path, "--predictions"):
            if not isinstance(rec.get("caption"), str):
                raise VlpError(f"{where}: needs a 'caption' string")
            rows.append((where, rec["image"], rec["caption"]))
    else:
        data = load_json(path, "--predictions")
        if not isinstance(data, list):
            raise VlpError(f"--predictions {path}: a COCO results file is a list of "
                           '{"image_id", "caption"}')
        _check_entries(data, f"--predictions {path}: entry")
        rows += [(f"--predictions {path} entry [{i}]", str(r["image_id"]), r["caption"])
                 for i, r in enumerate(data)]
    preds: dict[str, str] = {}
    for where, key, caption in rows:
        if key in preds:
            raise VlpError(f"{where}: a second caption for image {key!r} (one per image)")
        preds[key] = caption
    return preds
