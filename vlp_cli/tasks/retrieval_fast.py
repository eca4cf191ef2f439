"""What the retrieval task adds to the cross-encoder: UNITER's ranking loss with mined
negatives, a dual-encoder head for shortlists (image-text contrastive, as LAVIS shortlists),
fast evaluation (shortlist, then re-score with the cross-encoder) and COCO's 1K folds.

Used by tasks/retrieval.py only (a helper module of that task, not a task).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli.data.examples import ImageInput, TaskDataset

if TYPE_CHECKING:
    import torch

    from vlp_cli.model import VLPModel

TEXT_HEAD, IMAGE_HEAD = "retrieval_text", "retrieval_image"


# -- the two sides alone (dual encoder) ----------------------------------------------------------


def side_fields(builder: Any, words: list[int], img: ImageInput, max_len: int) -> dict:
    """The inputs of each side alone: `[CLS] words [SEP]`, and `[CLS] [SEP] tags [SEP]` before
    the regions (the image side keeps Oscar's tags)."""
    text = builder.text(words, [], max_len)
    image = builder.text([], builder.tag_ids(img.tag_classes), max_len)
    return {"text_ids": text.ids, "image_ids": image.ids, "image_types": image.types}


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r)
    return ids, ids != pad


def collate_sides(items: list[dict], batch: dict, pad_id: int, rows: list[int]) -> None:
    """Pad the side inputs of `items[rows]` (the positives) into the batch."""
    import torch

    chosen = [items[r] for r in rows]
    ids, mask = _padded([x["text_ids"] for x in chosen], pad_id)
    batch.update(side_text_ids=ids, side_text_mask=mask)
    ids, mask = _padded([x["image_ids"] for x in chosen], pad_id)
    types = torch.zeros_like(ids)
    for i, x in enumerate(chosen):
        types[i, :len(x["image_types"])] = torch.as_tensor(x["image_types"])
    batch.update(side_image_ids=ids, side_image_mask=mask, side_image_types=types,
                 side_rows=torch.as_tensor(rows, dtype=torch.long),
                 side_image_key=torch.as_tensor([x["image_id"] for x in chosen]))


def embed_text(model: VLPModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    b = ids.shape[0]
    f, p = model.config.img_feat_dim, model.config.pos_dim
    none = torch.zeros((b, 1), dtype=torch.bool, device=ids.device)
    hidden = model(ids, torch.zeros_like(ids), mask, torch.zeros((b, 1, f), device=ids.device),
                   torch.zeros((b, 1, p), device=ids.device), none)
    return F.normalize(model.cls_logits(TEXT_HEAD, hidden).float(), dim=-1)


def embed_image(model: VLPModel, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
                feats: torch.Tensor, pos: torch.Tensor, img_mask: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    hidden = model(ids, types, mask, feats, pos, img_mask)
    return F.normalize(model.cls_logits(IMAGE_HEAD, hidden).float(), dim=-1)


def itc_loss(model: VLPModel, batch: dict, temperature: float) -> torch.Tensor:
    """In-batch image-text contrastive loss of the positives, both ways; another caption of
    the same image is not counted as a negative."""
    import torch
    import torch.nn.functional as F

    r = batch["side_rows"]
    t = embed_text(model, batch["side_text_ids"], batch["side_text_mask"])
    v = embed_image(model, batch["side_image_ids"], batch["side_image_types"],
                    batch["side_image_mask"], batch["img_feats"][r], batch["img_pos"][r],
                    batch["img_mask"][r])
    logits = t @ v.t() / temperature  # [B texts, B images]
    key = batch["side_image_key"]
    same = (key[:, None] == key[None, :]) & ~torch.eye(len(key), dtype=torch.bool,
                                                          device=key.device)
    logits = logits.masked_fill(same, -1e4)
    target = torch.arange(len(key), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


# -- UNITER's ranking loss with mined negatives --------------------------------------------------


class RankingDataset(TaskDataset):
    """Per caption: the matched pair, the caption with `n` other images, the image with `n`
    other captions (1 + 2n sequences)."""

    def __init__(self, corpus: Any, builder: Any, indices: np.ndarray, max_text_len: int,
                 n: int, pairer: Any, seed: int):
        super().__init__(corpus, builder, indices, seed)
        # pairer: the binary task's dataset, which builds a pair and a positive (with each
        # side alone when the dual encoder trains)
        self.max_text_len, self.n, self.pairer = max_text_len, n, pairer

    def units(self) -> np.ndarray:
        own = self.sizes(frozenset({"words", "image"}))
        return (1 + 2 * self.n) * np.stack(own, 1)

    def __getitem__(self, i: int) -> list[dict]:
        rng = self.rng(i)
        ex = self.corpus.get(int(self.indices[i]))
        img = self.builder.regions(ex["images"][0])
        others = [self.other_example(rng, ex["images"][0]) for _ in range(2 * self.n)]
        words, pair = ex["segments"][0], self.pairer.pair
        return [self.pairer.positive(ex, img),
                *[pair(words, self.builder.regions(o["images"][0]), 0) for o in others[:self.n]],
                *[pair(o["segments"][0], img, 0) for o in others[self.n:]]]


def select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The model inputs of some rows of a batch."""
    from vlp_cli.tasks.base import INPUTS

    return {k: batch[k][rows] for k in INPUTS}


def ranking_loss(model: VLPModel, batch: dict, head: str, n: int, hard: int,
                 margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, [B] whether the positive outscored every negative trained on)."""
    import torch

    from vlp_cli.tasks.base import encode

    group = 1 + 2 * n
    b = batch["input_ids"].shape[0] // group
    base = torch.arange(b, device=batch["input_ids"].device)[:, None] * group
    if hard < n:  # mine: score every candidate with the current model, keep the hardest
        was = model.training
        model.eval()
        with torch.no_grad():
            s = model.cls_logits(head, encode(model, batch))[:, 0].view(b, group).float()
        model.train(was)
        top_img = s[:, 1:1 + n].topk(hard, dim=1).indices + 1
        top_txt = s[:, 1 + n:].topk(hard, dim=1).indices + 1 + n
        cols = torch.cat([torch.zeros_like(top_img[:, :1]), top_img, top_txt], 1)
        batch = select_rows(batch, (base + cols).reshape(-1))
        group = 1 + 2 * hard
    scores = model.cls_logits(head, encode(model, batch))[:, 0].float().sigmoid()
    scores = scores.view(b, group)
    pos, neg = scores[:, :1], scores[:, 1:]
    loss = torch.clamp(margin + neg - pos, min=0).mean()
    return loss, (pos > neg).all(1)


# -- evaluation ----------------------------------------------------------------------------------


def fold_recalls(scores: np.ndarray, text_to_image: np.ndarray, folds: int) -> dict:
    """COCO 1K: the images split into `folds` equal consecutive folds, each with its texts,
    recall@K in each; the mean over folds, keys prefixed `folds_`."""
    from vlp_cli.metrics import retrieval_recall

    size = scores.shape[0] // folds
    parts = []
    for f in range(folds):
        lo, hi = f * size, (f + 1) * size
        cols = np.where((text_to_image >= lo) & (text_to_image < hi))[0]
        parts.append(retrieval_recall(scores[lo:hi][:, cols], text_to_image[cols] - lo))
    return {f"folds_{k}": float(np.mean([p[k] for p in parts])) for k in parts[0]} | {
        "fold_images": size}


def shortlist_pairs(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image its top-k texts and per text its top-k images by the dual encoder:
    ([N, k] text indices, [M, k] image indices)."""
    k_t, k_i = min(k, sim.shape[1]), min(k, sim.shape[0])
    return (np.argsort(-sim, axis=1, kind="stable")[:, :k_t],
            np.argsort(-sim.T, axis=1, kind="stable")[:, :k_i])


def reranked(sim: np.ndarray, cross: dict[tuple[int, int], float], i2t: np.ndarray,
             t2i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score matrices for each direction: shortlisted pairs by the cross-encoder, above every
    other pair, which keeps its dual-encoder order. ([N, M] for i2t, [N, M] for t2i.)"""
    low = sim - 10.0  # sims are cosines in [-1, 1]; cross scores in [0, 1] + 10
    a, b = low.copy(), low.copy()
    for i, row in enumerate(i2t):
        for j in row:
            a[i, j] = 10.0 + cross[(i, int(j))]
    for j, col in enumerate(t2i):
        for i in col:
            b[int(i), j] = 10.0 + cross[(int(i), j)]
    return a, b
