"""Image-text retrieval, Oscar's way: a matched/unmatched classifier on [CLS], scored over all
pairs, recall@1/5/10 both ways.

Recipe section `retrieval` (config.RetrievalCfg). Reads captions (corpus kind "caption").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli.data.examples import ExampleBuilder, ImageInput, TaskDataset
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import (Context, Stats, Task, count_stat, encode, longs, mean_stat,
                                sharded_map, split_indices)

if TYPE_CHECKING:
    import torch

    from vlp_cli.model import HeadSpec, VLPModel

logger = logging.getLogger(__name__)

KIND = "caption"


class RetrievalTrainDataset(TaskDataset):
    """Each caption gives a matched pair and an unmatched one.

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
                key = tuple(sorted(set(builder.tag_classes(corpus.get(int(i))["images"][0]))))
                self.tags_of.append(key)
                self.tag_groups.setdefault(key, []).append(pos)

    def pair(self, words: list[int], img: ImageInput, match: int) -> dict:
        text = self.builder.text(words, self.builder.tag_ids(img.tag_classes), self.max_text_len)
        return self.item(text, img, match=match)

    def units(self) -> np.ndarray:
        # An item is two sequences, each padded to the batch's longest text and region list:
        # the matched pair, and the unmatched one, which may take another example's words or
        # image (bounded by the largest).
        own, neg = self.sizes(frozenset()), self.sizes(frozenset({"words", "image"}))
        return 2 * np.stack([np.maximum(own[0], neg[0]), np.maximum(own[1], neg[1])], 1)

    def negative_example(self, rng: np.random.Generator, i: int, image: str) -> dict:
        if self.shared_tag_negatives > 0 and rng.random() < self.shared_tag_negatives:
            group = self.tag_groups[self.tags_of[i]]
            for _ in range(10):
                ex = self.corpus.get(int(self.indices[group[rng.integers(len(group))]]))
                if ex["images"][0] != image:
                    return ex
        return self.other_example(rng, image)

    def __getitem__(self, i: int) -> list[dict]:
        rng = self.rng(i)
        ex = self.corpus.get(int(self.indices[i]))
        img = self.builder.regions(ex["images"][0])
        other = self.negative_example(rng, i, ex["images"][0])
        if rng.random() < 0.5:
            neg = self.pair(other["segments"][0], img, 0)
        else:
            neg = self.pair(ex["segments"][0], self.builder.regions(other["images"][0]), 0)
        return [self.pair(ex["segments"][0], img, 1), neg]


class _Pairs:
    """Every (image, text) pair of an evaluation, built on demand."""

    def __init__(self, pairer: RetrievalTrainDataset, images: list[ImageInput],
                 texts: list[list[int]]):
        self.pairer, self.images, self.texts = pairer, images, texts

    def __len__(self) -> int:
        return len(self.images) * len(self.texts)

    def __getitem__(self, k: int) -> dict:
        i, j = divmod(k, len(self.texts))
        return self.pairer.pair(self.texts[j], self.images[i], 0)


def unique_caption_images(c: Corpus, split: str) -> tuple[list[str], list[list[int]], int]:
    """Images of `split` whose captions no other image shares (one image per caption).

    Returns the image keys (sorted), each image's caption ids, and how many images the split
    has in all.
    """
    by_image: dict[str, list[dict]] = {}
    for i in c.require(KIND, split):
        ex = c.get(int(i))
        by_image.setdefault(ex["images"][0], []).append(ex)
    owners: dict[str, set[str]] = {}
    for key, exs in by_image.items():
        for ex in exs:
            owners.setdefault(ex["texts"][0].strip().lower(), set()).add(key)
    keep = sorted(k for k, exs in by_image.items()
                  if all(len(owners[e["texts"][0].strip().lower()]) == 1 for e in exs))
    return keep, [[e["segments"][0] for e in by_image[k]] for k in keep], len(by_image)


class Retrieval(Task):
    name = "retrieval"
    help = "image-text retrieval: R@1/5/10 both ways over all pairs"
    kinds = (KIND,)
    metrics = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    report = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "images",
              "unique_caption_images", "split_images")
    headline = "rsum"
    select = "match_acc"

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        return [HeadSpec(self.name, "linear", 2)]

    def legacy_heads(self, config: dict) -> list[tuple[str, HeadSpec]]:
        from vlp_cli.model import HeadSpec

        return [("match_head", HeadSpec(self.name, "linear", 2))]

    def dataset(self, ctx: Context, split: str, seed: int) -> RetrievalTrainDataset:
        idx = split_indices(ctx.corpus, KIND, split)
        return RetrievalTrainDataset(ctx.corpus, ctx.builder, idx, self.recipe.data.max_text_len,
                                     seed, self.recipe.retrieval.shared_tag_negatives)

    def collate(self, items: list[dict], batch: dict) -> None:
        batch["match"] = longs(items, "match")

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        from vlp_cli.losses import classification_loss

        hidden = encode(model, batch)
        logits = model.cls_logits(self.name, hidden)
        loss = classification_loss(logits, batch["match"])
        b = logits.shape[0]
        acc = (logits.argmax(-1) == batch["match"]).sum()
        return loss, {"loss": mean_stat(loss, b), "match_acc": count_stat(acc, b)}

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        """All-pairs scoring with the matched/unmatched head (Oscar), R@1/5/10 both ways."""
        from vlp_cli.data.datasets import Collator
        from vlp_cli.metrics import retrieval_recall

        cfg = self.recipe.retrieval
        keys, captions, total = unique_caption_images(ctx.corpus, split)
        unique = len(keys)
        n = min(limit or cfg.eval_images or unique, unique)
        if n < unique:
            # A fixed random subset, the same for every model evaluated with this seed.
            pick = np.sort(np.random.default_rng(self.recipe.seed).choice(unique, n,
                                                                           replace=False))
            keys, captions = [keys[i] for i in pick], [captions[i] for i in pick]
        if accelerator.is_main_process:
            logger.info("retrieval on %s: %d of %d images have captions no other image "
                        "shares; scoring %d of them x their captions, all pairs", split, unique,
                        total, n)
        texts = [t for caps in captions for t in caps]
        text_to_image = np.array([i for i, caps in enumerate(captions) for _ in caps])
        images = [ctx.builder.regions(k) for k in keys]
        pairer = RetrievalTrainDataset(ctx.corpus, ctx.builder, np.zeros(0),
                                       self.recipe.data.max_text_len, 0)
        prob = sharded_map(
            accelerator, _Pairs(pairer, images, texts), Collator(ctx.builder.pad_id),
            lambda b: model.cls_logits(self.name, encode(model, b)).softmax(-1)[:, 1].float(),
            cfg.eval_batch_size, "retrieval eval")
        scores = prob.numpy().reshape(len(images), len(texts))
        metrics = retrieval_recall(scores, text_to_image)
        metrics.update(images=len(images), texts=len(texts), unique_caption_images=unique,
                       split_images=total)
        ranked = [{"image": keys[i], "top_texts": [int(j) for j in np.argsort(-scores[i])[:5]]}
                  for i in range(len(images))]
        return metrics, ranked

    def match_scores(self, model: VLPModel, builder: ExampleBuilder, images: list[ImageInput],
                     texts: list[str], tokenizer: Any, device: torch.device,
                     batch_size: int = 256) -> np.ndarray:
        """[images, texts]: the matched-class probability of every pair (vlp score)."""
        import torch

        from vlp_cli.data.datasets import Collator

        pairer = RetrievalTrainDataset(None, builder, np.zeros(0),  # type: ignore[arg-type]
                                       self.recipe.data.max_text_len, 0)
        words = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        pairs = _Pairs(pairer, images, words)
        collate = Collator(builder.pad_id)
        out = []
        model.eval()
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                items = [pairs[k] for k in range(start, min(start + batch_size, len(pairs)))]
                batch = {k: v.to(device) for k, v in collate(items).items()}
                out.append(model.cls_logits(self.name, encode(model, batch)).float()
                           .softmax(-1)[:, 1].cpu())
        return torch.cat(out).numpy().reshape(len(images), len(texts))


TASK = Retrieval()
