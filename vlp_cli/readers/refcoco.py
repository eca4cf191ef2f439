"""RefCOCO, RefCOCO+ and RefCOCOg as released (Licheng Yu's refer layout): `refs(unc).p` (or
`refs(google).p`, `refs(umd).p`) with `instances.json` beside it.

    refs(*).p       a Python 2 pickle (protocol 2) of a list of refs: {"ref_id", "ann_id",
                    "image_id", "split": "train" | "val" | "test" | "testA" | "testB",
                    "category_id", "file_name", "sentences": [{"sent_id", "sent", "raw",
                    "tokens"}]}
    instances.json  COCO's images and annotations: {"images": [{"id", "file_name", ...}],
                    "annotations": [{"id", "image_id", "bbox": [x, y, w, h], ...}]}

The refs file is read by a restricted unpickler that builds lists, dicts, tuples, strings,
numbers and sets and refuses anything else (the file is never allowed to name a class or a
function, so reading it runs no code); Python 2 byte strings are read as latin-1.

As a build-corpus source: one "refcoco" example per sentence, its text the sentence (`sent`),
its label {"box": the referred annotation's [x, y, w, h], "ann_id", "category_id", "subset":
the refs file's split}, id the `sent_id`. Splits: train, val, and test for "test", "testA"
(people) and "testB" (other objects), which the label's `subset` tells apart. `SPLIT=` keeps
the refs of that split only.

Image keys, one rule: the image's COCO `file_name` in instances.json
(`COCO_train2014_000000581857.jpg`), as for the other COCO readers.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

from vlp_cli import VlpError
from vlp_cli.readers.files import load_json, split_spec

NAME = "refcoco"
SOURCE_HELP = "`[SPLIT=]refs(unc).p`: RefCOCO / RefCOCO+ / RefCOCOg, instances.json beside it"
KIND = "refcoco"
_NAME = re.compile(r"refs\(\w+\)\.p$")
SPLIT_OF = {"train": "train", "val": "val", "test": "test", "testA": "test", "testB": "test"}
_CONTAINERS = {("__builtin__", "set"), ("builtins", "set"), ("__builtin__", "frozenset"),
               ("builtins", "frozenset")}


class _ContainersOnly(pickle.Unpickler):
    """Builds what the pickle opcodes build by themselves (lists, dicts, tuples, strings,
    numbers) and sets; a pickle that names any other class or function is refused before
    anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CONTAINERS:
            return set if name == "set" else frozenset
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def load_refs(path: Path) -> list:
    """The refs list of a refs(*).p file, read with the restricted unpickler."""
    if not path.is_file():
        raise VlpError(f"source {path} not found")
    data = path.read_bytes()
    if data[:1] in (b"{", b"["):
        raise VlpError(f"source {path}: a JSON file, not a refs pickle: give the refs(unc).p "
                       "file (instances.json is read from beside it)")
    try:
        refs = _ContainersOnly(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise VlpError(f"source {path}: refused, {exc}: a refs file holds only lists, dicts, "
                       "strings and numbers (nothing in it was run)") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, MemoryError) as exc:
        raise VlpError(f"source {path}: not a readable refs pickle ({type(exc).__name__})"
                       ) from None
    if not isinstance(refs, list):
        raise VlpError(f"source {path}: a refs file is a list of refs, found "
                       f"{type(refs).__name__}")
    return refs


def write_refs(refs: list, path: Path) -> None:
    """Write a refs list as the release did (a protocol-2 pickle), for data written in this
    format (vlp export-scenes); only builtin values, so that the file names no class and
    `load_refs` reads it back."""
    def plain(x: Any) -> bool:
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        return x is None or type(x) in (str, int, float, bool)

    if not plain(refs):
        raise ValueError("a refs file holds only lists, dicts, strings and numbers")
    path.write_bytes(pickle.dumps(refs, protocol=2))


def claims(spec: str) -> bool:
    return bool(_NAME.search(split_spec(spec)[1].name))


def read(spec: str, workdir: Path) -> list[dict]:
    only, path = split_spec(spec)
    refs = load_refs(path)
    inst_path = path.with_name("instances.json")
    inst = load_json(inst_path, "instances (beside the refs file)")
    if not (isinstance(inst, dict) and isinstance(inst.get("images"), list)
            and isinstance(inst.get("annotations"), list)):
        raise VlpError(f"{inst_path}: COCO instances have 'images' and 'annotations' lists")
    names = {im.get("id"): im.get("file_name") for im in inst["images"] if isinstance(im, dict)}
    boxes = {a.get("id"): a.get("bbox") for a in inst["annotations"] if isinstance(a, dict)}
    out = []
    for i, ref in enumerate(refs):
        where = f"{path} ref [{i}]"
        if not (isinstance(ref, dict) and ref.get("split") in SPLIT_OF
                and isinstance(ref.get("sentences"), list)):
            raise VlpError(f"{where}: needs a 'split' among {', '.join(SPLIT_OF)} and "
                           "'sentences'")
        split = SPLIT_OF[ref["split"]]
        if only is not None and split != only:
            continue
        key, box = names.get(ref.get("image_id")), boxes.get(ref.get("ann_id"))
        if not isinstance(key, str):
            raise VlpError(f"{where}: image_id {ref.get('image_id')!r} is not in {inst_path}")
        if not (isinstance(box, list) and len(box) == 4):
            raise VlpError(f"{where}: ann_id {ref.get('ann_id')!r} has no 'bbox' in "
                           f"{inst_path}")
        label = {"box": [float(x) for x in box], "ann_id": ref.get("ann_id"),
                 "category_id": ref.get("category_id"), "subset": ref["split"]}
        for j, s in enumerate(ref["sentences"]):
            text = s.get("sent") if isinstance(s, dict) else None
            if not isinstance(text, str):
                raise VlpError(f"{where} sentences[{j}]: needs a 'sent' string")
            if text.strip():
                out.append({"split": split, "images": [key], "kind": KIND,
                            "texts": [text.strip()], "label": label, "id": s.get("sent_id"),
                            "where": f"{where} sentences[{j}]", "source": str(path)})
    return out
