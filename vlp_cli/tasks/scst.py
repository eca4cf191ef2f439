"""Self-critical sequence training's data and reward (used by the captioning task): one item
per image, and CIDEr-D with the training captions' document frequencies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlp_cli.config import CaptioningCfg
from vlp_cli.data.examples import ExampleBuilder
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.caption_decoding import CaptionDataset


class ScstDataset(CaptionDataset):
    """SCST's items: one per image of the split, its context in the empty-caption layout
    (decoding fills the caption), the row of its references in the reward's table, and a
    seed for the sampling (from the item's own stream: the same draws after a resume)."""

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 cfg: CaptioningCfg, max_text_len: int, seed: int, rows: list[int]):
        super().__init__(corpus, builder, indices, cfg, max_text_len, seed)
        self.rows = rows

    def __getitem__(self, i: int) -> dict:
        ex = self.corpus.get(int(self.indices[i]))
        item, _ = self.build([], self.builder.regions(ex["images"][0]))
        item.update(refs=self.rows[i], draw=int(self.rng(i).integers(2**62)))
        return item


def _reference_form(caption: str) -> str:
    """A caption as the SCST reward compares it: coco-caption's tokens, then Oscar's end word
    (its reward appends " <eos>" to every sentence, so ending well counts)."""
    from vlp_cli.metrics import python_ptb_tokenize

    return f"{python_ptb_tokenize(caption)} <eos>"


class ScstReward:
    """CIDEr-D of decoded captions against their images' references, the document
    frequencies computed once from the training captions (one document per image)."""

    def __init__(self, tokenizer: Any, train_refs: list[list[str]]):
        from vlp_cli.metrics import CiderD

        self.tokenizer = tokenizer
        self.cider = CiderD([[_reference_form(r) for r in refs] for refs in train_refs])
        self.refs: list[list[str]] = []

    def add(self, refs: list[list[str]]) -> list[int]:
        """Register images' references; their rows in the table."""
        start = len(self.refs)
        self.refs += [[_reference_form(r) for r in rs] for rs in refs]
        return list(range(start, len(self.refs)))

    def __call__(self, ids: list[list[int]], rows: list[int]) -> np.ndarray:
        texts = [_reference_form(self.tokenizer.decode(w, skip_special_tokens=True))
                 for w in ids]
        return self.cider.scores(texts, [self.refs[r] for r in rows])


def images_and_refs(corpus: Corpus, idx: np.ndarray) -> tuple[list[int], list[list[str]]]:
    """(first example index, reference captions) of each image among these examples."""
    first: dict[str, int] = {}
    refs: dict[str, list[str]] = {}
    for i in idx.tolist():
        ex = corpus.get(int(i))
        key = ex["images"][0]
        first.setdefault(key, int(i))
        refs.setdefault(key, []).append(ex["texts"][0])
    keys = sorted(first)
    return [first[k] for k in keys], [refs[k] for k in keys]
