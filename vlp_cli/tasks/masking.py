"""What UNITER's masked objectives share (mlm, mrfr, mrc, mrckl): the example, the masking and
the batch fields.

Conditional masking (UNITER's choice, `pretrain.masking: conditional`): an objective masks its
own modality only, the other stays whole: MLM masks 15% of the word pieces (80% [MASK], 10%
random, 10% kept), the region objectives 15% of the regions. Joint masking (the paper's
ablation) masks both in every example; each objective still scores its own modality.

A masked region's input feature is zeroed before the image embedding (UNITER's code; its
paper speaks of a learned embedding) and its original feature kept as MRFR's target; MRC
targets the detector's top class, MRC-kl its class distribution. The whole-image region is
never masked (it has no class).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.data.examples import ExampleBuilder, TaskDataset, mask_tokens
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import Context, Objective, pad_labels

if TYPE_CHECKING:
    import torch


def label_map(store_labels: list[str], labels: list[str]) -> np.ndarray:
    """Store class id -> index in the objective's label space (-1: not in it)."""
    where = {name: i for i, name in enumerate(labels)}
    return np.array([where.get(name, -1) for name in store_labels] + [-1], np.int64)


def mask_regions(n: int, candidates: list[int], prob: float,
                 rng: np.random.Generator) -> np.ndarray:
    """UNITER's region mask: each candidate with `prob`, at least one. [n] bool."""
    masked = np.zeros(n, bool)
    if not candidates:
        return masked
    for i in candidates:
        masked[i] = rng.random() < prob
    if not masked.any():
        masked[int(rng.choice(candidates))] = True
    return masked


class MaskedDataset(TaskDataset):
    """Words and regions, with words (`text_prob` > 0) and/or regions (`region_prob` > 0)
    masked. Items carry MLM labels, the region mask, the regions' classes in the objective's
    label space (`classes`) and, with `probs`, their class distributions in it."""

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray, *,
                 text_prob: float, region_prob: float, tags: bool, max_text_len: int,
                 labels: list[str], probs: bool, seed: int):
        super().__init__(corpus, builder, indices, seed)
        self.text_prob, self.region_prob = text_prob, region_prob
        self.tags, self.max_text_len, self.probs = tags, max_text_len, probs
        self.with_tags = tags
        self.num_labels = len(labels)
        self.map = label_map(builder.features.labels if builder.features else [], labels)
        # The classes this corpus's detector can give: a union of several stores' label sets
        # is scored within each store's own (`own_classes`), so that one detector's names
        # never compete with another's for the same region.
        self.space = np.zeros(self.num_labels, bool)
        self.space[self.map[self.map >= 0]] = True

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        ex = self.corpus.get(int(self.indices[i]))
        img = self.builder.regions(ex["images"][0], probs=self.probs)
        tags = self.builder.tag_ids(img.tag_classes) if self.tags else []
        text = self.builder.text(ex["segments"][0], tags, self.max_text_len)
        labels = [-100] * len(text.ids)
        if self.text_prob > 0:
            cands = [*range(*text.a_span), *range(*text.b_span)]
            text.ids, labels = mask_tokens(text.ids, cands, self.text_prob, self.builder, rng)
        n = len(img.feats)
        masked = np.zeros(n, bool)
        if self.region_prob > 0:
            masked = mask_regions(n, list(range(int(img.whole_image), n)), self.region_prob, rng)
        classes = self.map[img.classes] if img.classes is not None else np.full(n, -1)
        soft = None
        if self.probs:
            soft = np.zeros((n, self.num_labels), np.float32)
            if img.probs is not None:  # scatter the store's classes into the label space
                keep = self.map[:-1] >= 0
                soft[:, self.map[:-1][keep]] = img.probs[:, keep]
            else:  # boxes given without a distribution: the class itself, one-hot
                rows = np.flatnonzero(classes >= 0)
                soft[rows, classes[rows]] = 1.0
        return self.item(text, img, mlm_labels=labels, region_masked=masked,
                         region_classes=classes, region_probs=soft, label_space=self.space)


def collate_masked(items: list[dict], batch: dict) -> None:
    """The masked fields: MLM labels [B, T]; `region_masked` [B, R]; the masked regions'
    original features `feat_targets` [M, F] (then zeroed in `img_feats`), their classes
    `region_targets` [M] (-100: none), distributions `soft_targets` [M, C] when read, and the
    classes the batch's stores can give, `label_space` [C] bool."""
    import torch

    batch["mlm_labels"] = pad_labels(items, "mlm_labels", batch["input_ids"].shape[1])
    b, r = batch["img_mask"].shape
    masked = torch.zeros((b, r), dtype=torch.bool)
    classes = torch.full((b, r), -100, dtype=torch.long)
    for i, x in enumerate(items):
        k = len(x["region_masked"])
        masked[i, :k] = torch.from_numpy(x["region_masked"])
        c = torch.from_numpy(np.asarray(x["region_classes"], np.int64))
        classes[i, :k] = torch.where(c >= 0, c, -100)
    batch["region_masked"] = masked
    batch["feat_targets"] = batch["img_feats"][masked].clone()
    batch["img_feats"][masked] = 0.0
    batch["region_targets"] = classes[masked]
    if items and len(items[0]["label_space"]):
        batch["label_space"] = torch.from_numpy(np.any([x["label_space"] for x in items], 0))
    if items and items[0]["region_probs"] is not None:
        c = items[0]["region_probs"].shape[1]
        soft = torch.zeros((b, r, c))
        for i, x in enumerate(items):
            soft[i, : len(x["region_probs"])] = torch.from_numpy(x["region_probs"])
        batch["soft_targets"] = soft[masked]


class MaskedObjective(Objective):
    """A UNITER masked objective; subclasses name the modality they score and their heads."""

    uses_pooler = False
    scores_text = False  # MLM: the words; else the regions
    needs_probs = False  # MRC-kl reads the class distributions
    needs_classes = False  # MRC and MRC-kl classify regions: the store must name classes

    def objectives(self, recipe: Any) -> list[str]:
        return [f"{self.name} ({recipe.pretrain.masking} masking)"]

    def labels(self, ctx: Context) -> list[str]:
        """The label space of the region objectives: the checkpoint's when it has one, else
        the union over the run's feature stores (`Context.labels`)."""
        return list(self.state.get("labels") or ctx.labels or ctx.builder.features.labels)

    def prepare(self, ctx: Context) -> dict:
        return {} if self.scores_text else {"labels": self.labels(ctx)}

    def dataset(self, ctx: Context, split: str, seed: int) -> MaskedDataset:
        sec = self.section(ctx.recipe)
        parts = [ctx.corpus.indices(kind, split) for kind in sec.text]
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if split == "train" and len(idx) == 0:
            raise VlpError(f"corpus {ctx.corpus.path} has no train examples of kinds "
                           f"{sec.text} ({self.name}.text)")
        store = ctx.builder.features
        if self.needs_classes and not (store and store.labels):
            raise VlpError(
                f"{self.name} classifies regions, but feature store "
                f"{store.path if store else '(none)'} names no region classes (grid boxes, or "
                f"boxes given without classes): take {self.name} out of pretrain.tasks, or out "
                f"of this corpus's pretrain.corpora entry, or extract with a detector")
        joint = ctx.recipe.pretrain.masking == "joint"
        p = sec.mask_prob
        return MaskedDataset(ctx.corpus, ctx.builder, idx,
                             text_prob=p if self.scores_text or joint else 0.0,
                             region_prob=p if not self.scores_text or joint else 0.0,
                             tags=sec.tags, max_text_len=ctx.recipe.data.max_text_len,
                             labels=[] if self.scores_text else self.labels(ctx),
                             probs=self.needs_probs, seed=seed)

    def collate(self, items: list[dict], batch: dict) -> None:
        collate_masked(items, batch)


def own_classes(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Region-class logits [M, C] (fp32) with the classes no store of the batch has set to
    -1e4: finite, so that KL's zero targets there stay 0 x finite."""
    space = batch.get("label_space")
    return logits if space is None else logits.masked_fill(~space, -1e4)


def region_states(model: Any, batch: dict) -> torch.Tensor:
    """The encoder over the batch (masked regions already zeroed by the collator)."""
    from vlp_cli.tasks.base import encode

    return encode(model, batch)
