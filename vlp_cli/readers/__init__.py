"""Readers: one file per released data-set format, turning it into corpus examples.

A reader module has `NAME`, `SOURCE_HELP`, `claims(spec) -> bool` and `read(spec, workdir) ->
list[dict]` (examples as stores/corpus.py describes them, texts not yet tokenised; an optional
"where" names the line for messages); one that is also an image source has `image_source(spec,
scratch) -> (folder, boxes JSONL or None)`. Readers know no tasks.
"""

from __future__ import annotations

from types import ModuleType

from vlp_cli import VlpError
from vlp_cli.readers import (caption_tsv, coco_captions, easyvqa, gqa, jsonl, karpathy,
                             nlvr2, refcoco, scenes, snli_ve, vcr, vqa_v2)

# In the order they are asked whether a source is theirs.
READERS: dict[str, ModuleType] = {easyvqa.NAME: easyvqa, scenes.NAME: scenes,
                                  coco_captions.NAME: coco_captions, karpathy.NAME: karpathy,
                                  vqa_v2.NAME: vqa_v2, caption_tsv.NAME: caption_tsv,
                                  nlvr2.NAME: nlvr2, snli_ve.NAME: snli_ve, refcoco.NAME: refcoco,
                                  gqa.NAME: gqa, vcr.NAME: vcr, jsonl.NAME: jsonl}


def reader_for(spec: str) -> ModuleType:
    """The reader of a build-corpus source."""
    for reader in READERS.values():
        if reader.claims(spec):
            return reader
    raise VlpError(f"source {spec!r}: not an existing file and not a named source; give "
                   + "; or ".join(r.SOURCE_HELP for r in READERS.values()))


def image_source(spec: str) -> ModuleType | None:
    """The reader that provides images (and boxes) under a name, e.g. `easy-vqa`."""
    for reader in READERS.values():
        if hasattr(reader, "image_source") and reader.claims(spec):
            return reader
    return None


def sources_help() -> str:
    return "; ".join(r.SOURCE_HELP for r in READERS.values())


def image_sources() -> list[str]:
    """Names of the data sets whose images a reader provides (`vlp extract-features NAME`)."""
    return [r.NAME for r in READERS.values() if hasattr(r, "image_source")]
