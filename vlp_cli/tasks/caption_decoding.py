"""Oscar's caption layout and decoding as next-token functions (the captioning task's
machinery, kept beside it): the training items, the seq2seq attention mask, a decoder that
re-encodes every step as Oscar's code does, and one that caches keys and values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlp_cli.config import CaptioningCfg
from vlp_cli.data.examples import ExampleBuilder, ImageInput, TaskDataset, mask_tokens
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import encode

if TYPE_CHECKING:
    import torch

    from vlp_cli.model import VLPModel


class CaptionDataset(TaskDataset):
    """Caption tokens masked and predicted under a left-to-right mask.

    Layout (as the Oscar code): the caption segment `[CLS] caption [SEP]` is padded to a fixed
    length A = max_caption_len + 2 so that tags and regions sit at the same positions in
    training and in decoding. Caption tokens see earlier caption tokens and all tags and
    regions; tags and regions never see the caption. The closing [SEP] is maskable: predicting
    it is how decoding learns to stop.
    """

    def __init__(self, corpus: Corpus | None, builder: ExampleBuilder, indices: np.ndarray,
                 cfg: CaptioningCfg, max_text_len: int, seed: int):
        super().__init__(corpus, builder, indices, seed)  # type: ignore[arg-type]
        self.cfg = cfg
        self.max_text_len = max_text_len

    def build(self, caption: list[int], img: ImageInput) -> tuple[dict, int]:
        b = self.builder
        a_len = self.cfg.max_caption_len + 2
        cap = list(caption[: self.cfg.max_caption_len])
        seg = [b.cls_id, *cap, b.sep_id]
        valid = [1] * len(seg) + [0] * (a_len - len(seg))
        tags = b.tag_ids(img.tag_classes)[: max(self.max_text_len - a_len - 1, 0)]
        ids = seg + [b.pad_id] * (a_len - len(seg)) + tags + ([b.sep_id] if tags else [])
        types = [0] * a_len + [1] * (len(ids) - a_len)
        valid += [1] * (len(ids) - a_len)
        item = {"ids": ids, "types": types, "feats": img.feats, "pos": img.pos,
                "text_valid": valid, "causal": a_len}
        return item, len(cap)

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        # The caption segment has a fixed length; tags fill what is left of max_text_len.
        images = [self.corpus.get(int(i))["images"][0] for i in self.indices]
        regions, tags = self.builder.image_sizes(images)
        a_len = self.cfg.max_caption_len + 2
        tags = np.minimum(tags, max(self.max_text_len - a_len - 1, 0))
        return a_len + tags + (tags > 0), regions

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        ex = self.corpus.get(int(self.indices[i]))
        item, n = self.build(ex["segments"][0], self.builder.regions(ex["images"][0]))
        cands = list(range(1, n + 2))  # caption words and the closing [SEP]
        ids, labels = mask_tokens(item["ids"], cands, self.cfg.mask_prob, self.builder, rng,
                                  max_masked=self.cfg.max_masked)
        item.update(ids=ids, mlm_labels=labels)
        return item


def caption_attention(a_len: int, t: int, r: int, b: int) -> torch.Tensor:
    """Oscar's seq2seq mask [B, L, L] (query, key); key padding is applied by the model."""
    import torch

    n = t + r
    allowed = torch.ones((n, n), dtype=torch.bool)
    allowed[:a_len, :a_len] = torch.tril(torch.ones((a_len, a_len), dtype=torch.bool))
    allowed[a_len:, :a_len] = False
    return allowed.expand(b, n, n)


def seq2seq(items: list[dict], batch: dict) -> None:
    t, r = batch["input_ids"].shape[1], batch["img_feats"].shape[1]
    batch["attn_mask"] = caption_attention(items[0]["causal"], t, r, len(items))


class CaptionDecoder:
    """Oscar's decoding as a next-token function: the state is each row's prefix and the step
    count; a step lays out `[CLS] prefix [MASK]` exactly as training does and reads the
    logits at the [MASK]. (No key-value cache: every step runs the whole sequence, as Oscar.)"""

    def __init__(self, model: VLPModel, ds: CaptionDataset, images: list[ImageInput],
                 device: torch.device):
        from vlp_cli.data.datasets import Collator

        self.model, self.ds, self.device = model, ds, device
        self.collate = Collator(ds.builder.pad_id, seq2seq)
        self.images = images

    def start(self) -> dict:
        return {"words": [[] for _ in self.images], "rows": list(range(len(self.images))),
                "t": 0}

    def step(self, state: dict, tokens: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        import torch

        b = self.ds.builder
        if tokens is not None:
            for w, tok in zip(state["words"], tokens.tolist()):
                if tok != b.sep_id:
                    w.append(int(tok))
        items = [self.ds.build(w + [b.mask_id], self.images[r])[0]
                 for w, r in zip(state["words"], state["rows"])]
        batch = {k: v.to(self.device) for k, v in self.collate(items).items()}
        hidden = encode(self.model, batch)
        where = torch.zeros(batch["input_ids"].shape, dtype=torch.bool, device=self.device)
        where[:, 1 + state["t"]] = True  # the [MASK] after t words
        logits = self.model.mlm_logits(hidden[:, : where.shape[1]], where, "mlm")  # [B, V]
        return logits, {**state, "t": state["t"] + 1}

    def reorder(self, state: dict, rows: torch.Tensor) -> dict:
        keep = rows.tolist()
        return {"words": [list(state["words"][i]) for i in keep],
                "rows": [state["rows"][i] for i in keep], "t": state["t"]}


class CachedCaptionDecoder:
    """The same decoding as `CaptionDecoder`, with keys and values reused: under Oscar's mask
    the tags and regions attend only to each other, so they are encoded once per image; each
    step encodes two positions, the word chosen last (the [CLS] at the first step) and a
    [MASK] after it, which attend to the tags, regions and cached caption prefix (causally
    among themselves); the [MASK]'s keys and values are dropped after the step. Every position
    keeps its place in the training layout (position ids, token types), so the logits equal
    re-encoding the whole sequence each step (`CaptionDecoder`) up to float rounding."""

    def __init__(self, model: VLPModel, ds: CaptionDataset, images: list[ImageInput] | None,
                 device: torch.device, batch: dict | None = None):
        """Encode the context of `images`, or of `batch` when given: a collated batch of the
        empty-caption layout (`ds.build([], image)`), already on `device` (SCST)."""
        import torch

        from vlp_cli.data.datasets import Collator
        from vlp_cli.decoding import KVCache

        self.model, self.ds, self.device = model, ds, device
        b = ds.builder
        self.a_len = a = ds.cfg.max_caption_len + 2
        # The training layout with an empty caption; everything from position a_len on is
        # the context: tags, their [SEP], regions.
        if batch is None:
            batch = Collator(b.pad_id, seq2seq)([ds.build([], img)[0] for img in images or []])
            batch = {k: v.to(device) for k, v in batch.items()}
        ids = batch["input_ids"][:, a:]
        n, tags = ids.shape
        ctx = torch.cat([batch["text_mask"][:, a:], batch["img_mask"]], dim=1).bool()
        self.cache = KVCache()
        positions = torch.arange(a, a + tags, device=device).expand(n, tags)
        model.extend(self.cache, ctx[:, None, :].expand(n, ctx.shape[1], ctx.shape[1]), ids,
                     batch["token_type_ids"][:, a:], positions, batch["img_feats"],
                     batch["img_pos"])
        self.ctx = ctx  # [B, C] the context keys that are real (not padding)

    def start(self) -> dict:
        return {"t": 0}

    def step(self, state: dict, tokens: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        import torch

        b, t = self.ds.builder, state["t"]
        n, c = self.ctx.shape
        dev = self.device
        prev = torch.full((n,), b.cls_id, dtype=torch.long) if tokens is None else tokens
        ids = torch.stack([prev.to(dev), torch.full((n,), b.mask_id, device=dev)], dim=1)
        positions = torch.tensor([t, t + 1], device=dev).expand(n, 2)
        # Keys: the context, the cached caption prefix ([CLS] and t - 1 words), the two new.
        allowed = torch.cat([self.ctx[:, None, :].expand(n, 2, c),
                             torch.ones((n, 2, t), dtype=torch.bool, device=dev),
                             torch.tril(torch.ones((2, 2), dtype=torch.bool,
                                                   device=dev)).expand(n, 2, 2)], dim=2)
        hidden = self.model.extend(self.cache, allowed, ids, torch.zeros_like(ids), positions)
        self.cache.keep(c + t + 1)  # the [MASK] goes; the word stays
        where = torch.zeros((n, 2), dtype=torch.bool, device=dev)
        where[:, 1] = True
        return self.model.mlm_logits(hidden, where, "mlm"), {"t": t + 1}

    def reorder(self, state: dict, rows: torch.Tensor) -> dict:
        self.cache.select(rows)
        self.ctx = self.ctx.index_select(0, rows.to(self.ctx.device))
        return state
