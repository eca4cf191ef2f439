"""Oscar pre-training: masked tokens over words and tags + polluted-tag contrastive loss.

Recipe section `oscar` (config.OscarCfg); mixed into `vlp pretrain` by `pretrain.tasks`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli import VlpError
from vlp_cli.config import OscarCfg
from vlp_cli.data.examples import ExampleBuilder, TaskDataset, mask_tokens
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import (Context, Stats, Task, count_stat, encode, held_out_stats, longs,
                                masked_tokens, mean_stat, pad_labels)

if TYPE_CHECKING:
    import torch

    from vlp_cli.model import HeadSpec, VLPModel


class PretrainDataset(TaskDataset):
    """Masked tokens over words and tags + a polluted-pair contrastive label.

    Label 0: matched. 1: tags replaced by another image's (Oscar). With Oscar+'s 3-way loss,
    2: caption replaced. As in the Oscar code (`mask_loss_for_unmatched=1`), polluted pairs
    still get the masked token loss, and an image without tags gets its caption polluted.
    """

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 cfg: OscarCfg, max_text_len: int, seed: int):
        super().__init__(corpus, builder, indices, seed)
        self.cfg = cfg
        self.max_text_len = max_text_len
        self.num_classes = 3 if cfg.caption_pollute_prob > 0 else 2
        polluted = cfg.pollute_prob > 0
        self.swaps = frozenset((["tags"] if polluted else [])
                               + (["words"] if cfg.caption_pollute_prob > 0 else []))

    def bound_swaps(self, words: np.ndarray, tags: np.ndarray, regions: np.ndarray,
                    swaps: frozenset[str]) -> None:
        # An image without tags gets its caption polluted whatever caption_pollute_prob.
        if "tags" in swaps:
            words[tags == 0] = words.max()
        super().bound_swaps(words, tags, regions, swaps)

    def __getitem__(self, i: int) -> dict:
        rng = self.rng(i)
        ex = self.corpus.get(int(self.indices[i]))
        img = self.builder.regions(ex["images"][0])
        words, tags, label = ex["segments"][0], img.tag_classes, 0
        u = rng.random()
        if u < self.cfg.pollute_prob:
            other = self.other_example(rng, ex["images"][0])
            if u >= self.cfg.caption_pollute_prob and tags:
                tags, label = self.builder.tag_classes(other["images"][0]), 1
            else:
                words, label = other["segments"][0], self.num_classes - 1
        text = self.builder.text(words, self.builder.tag_ids(tags), self.max_text_len)
        cands = [*range(*text.a_span), *range(*text.b_span)]
        ids, labels = mask_tokens(text.ids, cands, self.cfg.mask_prob, self.builder, rng)
        text.ids = ids
        return self.item(text, img, mlm_labels=labels, contrast=label)


class Oscar(Task):
    name = "oscar"
    stage = "pretrain"
    help = "Oscar: masked tokens over words and tags + polluted-tag contrastive"
    metrics = ("mlm_acc", "contrast_acc")
    report = ("mlm_acc", "contrast_acc")
    uses_pooler = True

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        n = 3 if ctx.recipe.oscar.caption_pollute_prob > 0 else 2
        return [HeadSpec("mlm", "masked_tokens", init="bert_mlm"),
                HeadSpec("contrast", "linear", n, init="bert_nsp")]

    def legacy_heads(self, config: dict) -> list[tuple[str, HeadSpec]]:
        from vlp_cli.model import HeadSpec

        n = int(config.get("num_contrast_classes", 2))
        return [("mlm_head", HeadSpec("mlm", "masked_tokens", init="bert_mlm")),
                ("contrast_head", HeadSpec("contrast", "linear", n, init="bert_nsp"))]

    def objectives(self, recipe: Any) -> list[str]:
        n = 3 if recipe.oscar.caption_pollute_prob > 0 else 2
        return ["mlm", f"contrastive-{n}way"]

    def dataset(self, ctx: Context, split: str, seed: int) -> PretrainDataset:
        kinds = ctx.recipe.oscar.text
        parts = [ctx.corpus.indices(kind, split) for kind in kinds]
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if split == "train" and len(idx) == 0:
            raise VlpError(f"corpus {ctx.corpus.path} has no train examples of kinds {kinds} "
                           "(oscar.text)")
        return PretrainDataset(ctx.corpus, ctx.builder, idx, ctx.recipe.oscar,
                               ctx.recipe.data.max_text_len, seed)

    def collate(self, items: list[dict], batch: dict) -> None:
        batch["mlm_labels"] = pad_labels(items, "mlm_labels", batch["input_ids"].shape[1])
        batch["contrast"] = longs(items, "contrast")

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        from vlp_cli.losses import classification_loss

        hidden = encode(model, batch)
        mlm, stats = masked_tokens(model, hidden, batch["mlm_labels"])
        logits = model.cls_logits("contrast", hidden)
        con = classification_loss(logits, batch["contrast"])
        b = logits.shape[0]
        stats["contrast_loss"] = mean_stat(con, b)
        stats["contrast_acc"] = count_stat((logits.argmax(-1) == batch["contrast"]).sum(), b)
        loss = mlm + self.recipe.oscar.contrastive_weight * con
        stats["loss"] = mean_stat(loss, b)
        return loss, stats

    def check_checkpoint(self, meta: dict) -> str | None:
        # Any checkpoint trained with this objective (pre-trained, or mixed) can be scored.
        legacy = "tasks" not in meta and meta.get("task") == "pretrain"  # vlp <= 0.2
        if self.name not in meta.get("tasks", {}) and not legacy:
            return (f"a '{meta.get('task')}' checkpoint, not trained with the '{self.name}' "
                    "objective (its heads are not in it)")
        return None

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        stats = held_out_stats(self, ctx, model, split, limit, accelerator)
        return stats, []


TASK = Oscar()
