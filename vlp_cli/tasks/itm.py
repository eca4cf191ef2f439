"""UNITER's image-text matching with word-region alignment (WRA) in the same step.

ITM: half the pairs get another image (UNITER swaps the image, not the text); a 2-way
cross-entropy on the pooled [CLS] (UNITER's code; its paper writes a sigmoid). Target 1:
matched. WRA: the optimal transport distance between the contextual word states and region
states of each pair (IPOT, ot.py), pulled down for matched pairs and up for unmatched ones:
(sum over matched - sum over unmatched) / pairs, weighted `itm.wra_weight` (0.1), no gradient
through the transport plan (UNITER's pretrain.py). Text and regions include the special tokens
and the whole-image region, as UNITER's padding masks do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.data.examples import ExampleBuilder, TaskDataset
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import Context, Objective, Stats, count_stat, encode, longs, mean_stat

if TYPE_CHECKING:
    import torch

    from vlp_cli.model import HeadSpec, VLPModel


class ItmDataset(TaskDataset):
    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 neg_prob: float, tags: bool, max_text_len: int, seed: int):
        super().__init__(corpus, builder, indices, seed)
        self.neg_prob, self.tags, self.max_text_len = neg_prob, tags, max_text_len
        self.with_tags = tags
        self.swaps = frozenset({"image"} if neg_prob > 0 else ())

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        ex = self.corpus.get(int(self.indices[i]))
        image, matched = ex["images"][0], 1
        if rng.random() < self.neg_prob:
            other = self.other_example(rng, image)["images"][0]
            if other != image:
                image, matched = other, 0
        img = self.builder.regions(image)
        tags = self.builder.tag_ids(img.tag_classes) if self.tags else []
        text = self.builder.text(ex["segments"][0], tags, self.max_text_len)
        return self.item(text, img, itm=matched)


class Itm(Objective):
    name = "itm"
    help = "UNITER: image-text matching (image swapped) + word-region alignment by OT"
    metrics = ("itm_acc", "ot_matched", "ot_unmatched")
    report = ("itm_acc", "ot_matched", "ot_unmatched")
    uses_pooler = True

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        return [HeadSpec("itm", "linear", 2)]

    def objectives(self, recipe: Any) -> list[str]:
        wra = recipe.itm.wra_weight
        return ["itm"] + ([f"wra (IPOT, weight {wra:g})"] if wra > 0 else [])

    def dataset(self, ctx: Context, split: str, seed: int) -> ItmDataset:
        sec = ctx.recipe.itm
        parts = [ctx.corpus.indices(kind, split) for kind in sec.text]
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if split == "train" and len(idx) == 0:
            raise VlpError(f"corpus {ctx.corpus.path} has no train examples of kinds "
                           f"{sec.text} (itm.text)")
        return ItmDataset(ctx.corpus, ctx.builder, idx, sec.neg_prob, sec.tags,
                          ctx.recipe.data.max_text_len, seed)

    def collate(self, items: list[dict], batch: dict) -> None:
        batch["itm"] = longs(items, "itm")

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        import torch

        from vlp_cli.losses import classification_loss
        from vlp_cli.ot import wra_loss

        sec = self.recipe.itm
        hidden = encode(model, batch)  # [B, T + R, H]
        logits = model.cls_logits("itm", hidden)
        target = batch["itm"]
        loss = classification_loss(logits, target)
        b = logits.shape[0]
        matched = target == 1
        stats = {"itm_loss": mean_stat(loss, b),
                 "itm_acc": count_stat((logits.argmax(-1) == target).sum(), b)}
        if sec.wra_weight > 0:
            t = batch["input_ids"].shape[1]
            wra, dist = wra_loss(hidden[:, :t], hidden[:, t:], batch["text_mask"],
                                 batch["img_mask"], matched, beta=sec.ot_beta,
                                 iters=sec.ot_iters)
            loss = loss + sec.wra_weight * wra
            stats["wra"] = mean_stat(wra, b)
            n_pos, n_neg = int(matched.sum()), int((~matched).sum())
            zero = torch.zeros((), device=dist.device)
            stats["ot_matched"] = (dist[matched].detach().sum() if n_pos else zero,
                                   torch.tensor(float(n_pos), device=dist.device))
            stats["ot_unmatched"] = (dist[~matched].detach().sum() if n_neg else zero,
                                     torch.tensor(float(n_neg), device=dist.device))
        stats["loss"] = mean_stat(loss, b)
        return loss, stats


TASK = Itm()
