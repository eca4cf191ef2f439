"""Task datasets (corpus x features) and the collator that pads them into batches.

Every `__getitem__` draws its randomness from a generator seeded by (seed, epoch, index), so a
run is reproducible whatever the number of DataLoader workers.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlp_cli.config import CaptioningCfg, PretrainCfg
from vlp_cli.data.examples import ExampleBuilder, ImageInput, mask_tokens
from vlp_cli.stores.corpus import Corpus


class _Base(Dataset):
    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray, seed: int):
        self.corpus = corpus
        self.builder = builder
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(i)])

    def other_example(self, rng: np.random.Generator, image: str) -> dict:
        """A random example of a different image (10 tries, as in the Oscar code)."""
        ex = {}
        for _ in range(10):
            ex = self.corpus.get(int(self.indices[rng.integers(len(self.indices))]))
            if ex["image"] != image:
                break
        return ex

    @staticmethod
    def item(text: Any, img: ImageInput, **fields: Any) -> dict:
        return {"ids": text.ids, "types": text.types, "feats": img.feats, "pos": img.pos,
                **fields}


class PretrainDataset(_Base):
    """Oscar pre-training: masked tokens over words and tags + polluted-pair contrastive label.

    Label 0: matched. 1: tags replaced by another image's (Oscar). With Oscar+'s 3-way loss,
    2: caption replaced. As in the Oscar code (`mask_loss_for_unmatched=1`), polluted pairs
    still get the masked token loss, and an image without tags gets its caption polluted.
    """

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 cfg: PretrainCfg, max_text_len: int, seed: int):
        super().__init__(corpus, builder, indices, seed)
        self.cfg = cfg
        self.max_text_len = max_text_len
        self.num_classes = 3 if cfg.caption_pollute_prob > 0 else 2

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        ex = self.corpus.get(int(self.indices[i]))
        img = self.builder.regions(ex["image"])
        words, tags, label = ex["ids"], img.tag_classes, 0
        u = rng.random()
        if u < self.cfg.pollute_prob:
            other = self.other_example(rng, ex["image"])
            if u >= self.cfg.caption_pollute_prob and tags:
                tags, label = self.builder.tag_classes(other["image"]), 1
            else:
                words, label = other["ids"], self.num_classes - 1
        text = self.builder.text(words, self.builder.tag_ids(tags), self.max_text_len)
        cands = [*range(*text.a_span), *range(*text.b_span)]
        ids, labels = mask_tokens(text.ids, cands, self.cfg.mask_prob, self.builder, rng)
        text.ids = ids
        return self.item(text, img, mlm_labels=labels, contrast=label)


class VqaDataset(_Base):
    """Question + tags + regions; soft answer scores as targets (BCE)."""

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 max_text_len: int, seed: int = 0):
        super().__init__(corpus, builder, indices, seed)
        self.max_text_len = max_text_len

    def __getitem__(self, i: int) -> dict:
        ex = self.corpus.get(int(self.indices[i]))
        img = self.builder.regions(ex["image"])
        text = self.builder.text(ex["ids"], self.builder.tag_ids(img.tag_classes),
                                 self.max_text_len)
        return self.item(text, img, vqa_labels=ex.get("labels", []),
                         vqa_scores=ex.get("scores", []), index=int(self.indices[i]))


class RetrievalTrainDataset(_Base):
    """Oscar's retrieval training: each caption gives a matched pair and an unmatched one.

    The negative swaps the caption (p=0.5) or the image for another image's, as the Oscar code
    does; the [CLS] head classifies matched / unmatched.
    """

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 max_text_len: int, seed: int, shared_tag_negatives: float = 0.0):
        super().__init__(corpus, builder, indices, seed)
        self.max_text_len = max_text_len
        self.shared_tag_negatives = shared_tag_negatives
        self.tag_groups: dict[tuple[int, ...], list[int]] = {}
        self.tags_of: list[tuple[int, ...]] = []
        if shared_tag_negatives > 0:
            # One pass over the examples' images: which examples share the same tag set.
            for pos, i in enumerate(self.indices):
                key = tuple(sorted(set(builder.tag_classes(corpus.get(int(i))["image"]))))
                self.tags_of.append(key)
                self.tag_groups.setdefault(key, []).append(pos)

    def pair(self, words: list[int], img: ImageInput, match: int) -> dict:
        text = self.builder.text(words, self.builder.tag_ids(img.tag_classes), self.max_text_len)
        return self.item(text, img, match=match)

    def negative_example(self, rng: np.random.Generator, i: int, image: str) -> dict:
        if self.shared_tag_negatives > 0 and rng.random() < self.shared_tag_negatives:
            group = self.tag_groups[self.tags_of[i]]
            for _ in range(10):
                ex = self.corpus.get(int(self.indices[group[rng.integers(len(group))]]))
                if ex["image"] != image:
                    return ex
        return self.other_example(rng, image)

    def __getitem__(self, i: int) -> list[dict]:
        rng = self.rng(i)
        ex = self.corpus.get(int(self.indices[i]))
        img = self.builder.regions(ex["image"])
        other = self.negative_example(rng, i, ex["image"])
        if rng.random() < 0.5:
            neg = self.pair(other["ids"], img, 0)
        else:
            neg = self.pair(ex["ids"], self.builder.regions(other["image"]), 0)
        return [self.pair(ex["ids"], img, 1), neg]


class CaptionDataset(_Base):
    """Oscar captioning: caption tokens masked and predicted under a left-to-right mask.

    Layout (as the Oscar code): the caption segment `[CLS] caption [SEP]` is padded to a fixed
    length A = max_caption_len + 2 so that tags and regions sit at the same positions in
    training and in decoding. Caption tokens see earlier caption tokens and all tags and
    regions; tags and regions never see the caption. The closing [SEP] is maskable: predicting
    it is how decoding learns to stop.
    """

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 cfg: CaptioningCfg, max_text_len: int, seed: int):
        super().__init__(corpus, builder, indices, seed)
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

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        ex = self.corpus.get(int(self.indices[i]))
        item, n = self.build(ex["ids"], self.builder.regions(ex["image"]))
        cands = list(range(1, n + 2))  # caption words and the closing [SEP]
        ids, labels = mask_tokens(item["ids"], cands, self.cfg.mask_prob, self.builder, rng,
                                  max_masked=self.cfg.max_masked)
        item.update(ids=ids, mlm_labels=labels)
        return item


@functools.cache
def _quiet_read_only_views() -> None:
    """Spend torch's once-per-process "array is not writable" warning here, silenced.

    Regions reach the collator as read-only views into the feature store's memory map; torch
    only reads them (`copy_` into the batch), so the warning, which is about writing, does not
    apply.
    """
    ro = np.zeros(1, np.float16)
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(ro)


def rows_into(dst: torch.Tensor, src: np.ndarray) -> None:
    """`dst[...] = src` in one pass, converting the dtype (float16 regions -> float32 batch).

    `src` may be a read-only view into a store. torch's vectorised conversion is ~5x faster
    than numpy's float16 -> float32 `astype` (which, with a copy after it, used to be most of
    a read of a 50 x 2048 record).
    """
    _quiet_read_only_views()
    dst.copy_(torch.from_numpy(src))


class Collator:
    """Pads items into a batch: text [B, T], regions [B, R, F]; builds masks and targets."""

    def __init__(self, pad_id: int, num_answers: int = 0):
        self.pad_id = pad_id
        self.num_answers = num_answers

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        if items and isinstance(items[0], list):
            items = [x for pair in items for x in pair]
        b = len(items)
        t = max(len(x["ids"]) for x in items)
        r = max(max(len(x["feats"]) for x in items), 1)
        f = items[0]["feats"].shape[1]
        p = items[0]["pos"].shape[1]
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        types = torch.zeros((b, t), dtype=torch.long)
        text_mask = torch.zeros((b, t), dtype=torch.bool)
        feats = torch.zeros((b, r, f), dtype=torch.float32)
        pos = torch.zeros((b, r, p), dtype=torch.float32)
        img_mask = torch.zeros((b, r), dtype=torch.bool)
        for i, x in enumerate(items):
            n, k = len(x["ids"]), len(x["feats"])
            ids[i, :n] = torch.as_tensor(x["ids"])
            types[i, :n] = torch.as_tensor(x["types"])
            valid = x.get("text_valid")
            text_mask[i, :n] = True if valid is None else torch.as_tensor(valid, dtype=torch.bool)
            if k:
                rows_into(feats[i, :k], x["feats"])
                rows_into(pos[i, :k], x["pos"])
                img_mask[i, :k] = True
        batch = {"input_ids": ids, "token_type_ids": types, "text_mask": text_mask,
                 "img_feats": feats, "img_pos": pos, "img_mask": img_mask}
        if "mlm_labels" in items[0]:
            labels = torch.full((b, t), -100, dtype=torch.long)
            for i, x in enumerate(items):
                labels[i, : len(x["mlm_labels"])] = torch.as_tensor(x["mlm_labels"])
            batch["mlm_labels"] = labels
        for name in ("contrast", "match", "index"):
            if name in items[0]:
                batch[name] = torch.as_tensor([x[name] for x in items], dtype=torch.long)
        if "vqa_labels" in items[0]:
            target = torch.zeros((b, self.num_answers), dtype=torch.float32)
            for i, x in enumerate(items):
                for a, s in zip(x["vqa_labels"], x["vqa_scores"]):
                    target[i, a] = s
            batch["vqa_targets"] = target
        if "causal" in items[0]:
            batch["attn_mask"] = caption_attention(items[0]["causal"], t, r, b)
        return batch


def caption_attention(a_len: int, t: int, r: int, b: int) -> torch.Tensor:
    """Oscar's seq2seq mask [B, L, L] (query, key); key padding is applied by the model."""
    n = t + r
    allowed = torch.ones((n, n), dtype=torch.bool)
    allowed[:a_len, :a_len] = torch.tril(torch.ones((a_len, a_len), dtype=torch.bool))
    allowed[a_len:, :a_len] = False
    return allowed.expand(b, n, n)
