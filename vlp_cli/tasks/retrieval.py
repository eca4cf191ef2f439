"""Image-text retrieval: Oscar's matched/unmatched classifier on [CLS] or UNITER's ranking loss
with mined hard negatives (`retrieval.loss`), scored over all pairs, recall@1/5/10 both ways;
optionally a dual-encoder head trained alongside, whose shortlists make evaluation fast
(`retrieval.eval_mode`), and COCO's 1K folds (`retrieval.folds`). The pieces beyond Oscar's
are in retrieval_fast.py.

Recipe section `retrieval` (config.RetrievalCfg). Reads captions (corpus kind "caption").
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli.data.examples import ExampleBuilder, ImageInput, TaskDataset
from vlp_cli.stores.corpus import Corpus
from vlp_cli import VlpError
from vlp_cli.tasks import retrieval_fast as fast
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
                 max_text_len: int, seed: int, shared_tag_negatives: float = 0.0,
                 itc: bool = False):
        super().__init__(corpus, builder, indices, seed)
        self.max_text_len = max_text_len
        self.shared_tag_negatives = shared_tag_negatives
        self.itc = itc  # positives also carry each side alone (the dual-encoder loss)
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

    def positive(self, ex: dict, img: ImageInput) -> dict:
        item = self.pair(ex["segments"][0], img, 1)
        if self.itc:
            item.update(fast.side_fields(self.builder, ex["segments"][0], img,
                                         self.max_text_len), pad=self.builder.pad_id,
                        image_id=zlib.crc32(ex["images"][0].encode()))
        return item

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
        return [self.positive(ex, img), neg]


class _PairList:
    """Chosen (image, text) pairs of an evaluation."""

    def __init__(self, pairer: RetrievalTrainDataset, images: list[ImageInput],
                 texts: list[list[int]], pairs: list[tuple[int, int]]):
        self.pairer, self.images, self.texts, self.pairs = pairer, images, texts, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        i, j = self.pairs[k]
        return self.pairer.pair(self.texts[j], self.images[i], 0)


class _Sides:
    """Each image alone and each text alone, for the dual encoder."""

    def __init__(self, builder: ExampleBuilder, images: list[ImageInput],
                 texts: list[list[int]], max_len: int):
        self.builder, self.max_len = builder, max_len
        self.image_items = [self._item([], img, False) for img in images]
        self.text_items = [self._item(t, images[0], True) for t in texts]

    def _item(self, words: list[int], img: ImageInput, is_text: bool) -> dict:
        fields = fast.side_fields(self.builder, words, img, self.max_len)
        empty = ImageInput(img.feats[:0], img.pos[:0], []) if is_text else img
        return {**TaskDataset.item(self.builder.text(words, [], self.max_len), empty), **fields,
                "image_id": 0, "is_text": is_text}

    def images(self) -> list[dict]:
        return self.image_items

    def texts(self) -> list[dict]:
        return self.text_items


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

    def prepare(self, ctx: Context) -> dict:
        cfg = self.recipe.retrieval
        return {"loss": cfg.loss, "itc": cfg.itc_weight > 0}

    def heads(self, ctx: Context) -> list[HeadSpec]:
        from vlp_cli.model import HeadSpec

        ranking = self.state.get("loss") == "ranking"
        specs = [HeadSpec(self.name, "linear", 1 if ranking else 2)]
        if self.state.get("itc"):
            dim = self.recipe.retrieval.itc_dim
            specs += [HeadSpec(fast.TEXT_HEAD, "linear", dim),
                      HeadSpec(fast.IMAGE_HEAD, "linear", dim)]
        return specs

    def legacy_heads(self, config: dict) -> list[tuple[str, HeadSpec]]:
        from vlp_cli.model import HeadSpec

        return [("match_head", HeadSpec(self.name, "linear", 2))]

    def dataset(self, ctx: Context, split: str, seed: int) -> TaskDataset:
        cfg = self.recipe.retrieval
        idx = split_indices(ctx.corpus, KIND, split)
        pairer = RetrievalTrainDataset(ctx.corpus, ctx.builder, idx, self.recipe.data.max_text_len,
                                       seed, cfg.shared_tag_negatives, bool(self.state.get("itc")))
        if self.state.get("loss") != "ranking":
            return pairer
        return fast.RankingDataset(ctx.corpus, ctx.builder, idx, self.recipe.data.max_text_len,
                                   cfg.sampled_negatives, pairer, seed)

    def collate(self, items: list[dict], batch: dict) -> None:
        batch["match"] = longs(items, "match")
        if "text_ids" in items[0]:
            rows = [i for i, x in enumerate(items) if "text_ids" in x]
            fast.collate_sides(items, batch, items[0]["pad"], rows)

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        from vlp_cli.losses import classification_loss

        cfg = self.recipe.retrieval
        if self.state.get("loss") == "ranking":
            n = cfg.sampled_negatives
            loss, ok = fast.ranking_loss(model, batch, self.name, n, cfg.hard_negatives,
                                         cfg.margin)
            stats = {"rank_loss": mean_stat(loss, len(ok)), "match_acc": count_stat(ok.sum(),
                                                                                  len(ok))}
        else:
            logits = model.cls_logits(self.name, encode(model, batch))
            loss = classification_loss(logits, batch["match"])
            b = logits.shape[0]
            acc = (logits.argmax(-1) == batch["match"]).sum()
            stats = {"match_acc": count_stat(acc, b)}
        if "side_rows" in batch and cfg.itc_weight > 0:
            itc = fast.itc_loss(model, batch, cfg.itc_temperature)
            stats["itc_loss"] = mean_stat(itc, len(batch["side_rows"]))
            loss = loss + cfg.itc_weight * itc
        stats["loss"] = mean_stat(loss, len(batch["match"]))
        return loss, stats

    def pair_score(self, model: VLPModel, batch: dict) -> torch.Tensor:
        """The cross-encoder's score of each pair: the matched-class probability (binary) or
        the sigmoid of the ranking score."""
        logits = model.cls_logits(self.name, encode(model, batch)).float()
        if self.state.get("loss") == "ranking":
            return logits[:, 0].sigmoid()
        return logits.softmax(-1)[:, 1]

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        """R@1/5/10 both ways: the cross-encoder on all pairs (Oscar, UNITER), the fast
        shortlist-and-re-score, or both on the same images (`retrieval.eval_mode`)."""
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
        if cfg.folds > 1 and n < 2 * cfg.folds:
            raise VlpError(f"retrieval.folds={cfg.folds} over {n} images leaves folds of under "
                           f"2 images; lower it, or evaluate more images (retrieval.eval_images"
                           f"=0 takes all {unique})")
        texts = [t for caps in captions for t in caps]
        text_to_image = np.array([i for i, caps in enumerate(captions) for _ in caps])
        images = [ctx.builder.regions(k) for k in keys]
        pairer = RetrievalTrainDataset(ctx.corpus, ctx.builder, np.zeros(0),
                                       self.recipe.data.max_text_len, 0)
        metrics: dict[str, Any] = {}
        scores = None
        if cfg.eval_mode in ("full", "both"):
            start = time.perf_counter()
            prob = sharded_map(accelerator, _Pairs(pairer, images, texts),
                               Collator(ctx.builder.pad_id),
                               lambda b: self.pair_score(model, b), cfg.eval_batch_size,
                               "retrieval eval")
            scores = prob.numpy().reshape(len(images), len(texts))
            metrics.update(retrieval_recall(scores, text_to_image),
                           cross_passes=len(images) * len(texts),
                           seconds=round(time.perf_counter() - start, 2))
            if cfg.folds > 1:
                metrics.update(fast.fold_recalls(scores, text_to_image, cfg.folds))
        if cfg.eval_mode in ("fast", "both"):
            got, a, b = self.fast_scores(ctx, model, accelerator, images, texts, pairer)
            i2t = retrieval_recall(a, text_to_image)
            t2i = retrieval_recall(b, text_to_image)
            part = {k: v for k, v in i2t.items() if k.startswith("i2t")}
            part.update({k: v for k, v in t2i.items() if k.startswith("t2i")})
            part["rsum"] = sum(part.values())
            prefix = "fast_" if scores is not None else ""
            if cfg.folds > 1:  # each direction's folds from its own re-scored matrix
                fa = fast.fold_recalls(a, text_to_image, cfg.folds)
                fb = fast.fold_recalls(b, text_to_image, cfg.folds)
                part.update({k: v for k, v in fa.items() if "i2t" in k or k == "fold_images"})
                part.update({k: v for k, v in fb.items() if "t2i" in k})
            metrics.update({prefix + k: v for k, v in part.items()})
            metrics.update({prefix + k: v for k, v in got.items()})
            if scores is None:
                scores = a
        metrics.update(images=len(images), texts=len(texts), unique_caption_images=unique,
                       split_images=total)
        ranked = [{"image": keys[i], "top_texts": [int(j) for j in np.argsort(-scores[i])[:5]]}
                  for i in range(len(images))]
        return metrics, ranked

    def fast_scores(self, ctx: Context, model: VLPModel, accelerator: Any,
                    images: list[ImageInput], texts: list[list[int]],
                    pairer: RetrievalTrainDataset) -> tuple[dict, np.ndarray, np.ndarray]:
        """The dual encoder embeds every image and text once; each image's `shortlist` texts
        and each text's `shortlist` images are re-scored by the cross-encoder."""
        import torch

        from vlp_cli.data.datasets import Collator

        if not self.state.get("itc"):
            raise VlpError("retrieval.eval_mode fast needs the dual-encoder head: fine-tune "
                           "with --set retrieval.itc_weight=0.1 (or more), or evaluate with "
                           "--set retrieval.eval_mode=full")
        cfg = self.recipe.retrieval
        start = time.perf_counter()
        b = self.recipe.data.max_text_len
        side = _Sides(ctx.builder, images, texts, b)
        pad = ctx.builder.pad_id

        def embed(batch: dict) -> torch.Tensor:
            if batch["is_text"][0]:
                return fast.embed_text(model, batch["side_text_ids"], batch["side_text_mask"])
            return fast.embed_image(model, batch["side_image_ids"], batch["side_image_types"],
                                    batch["side_image_mask"], batch["img_feats"],
                                    batch["img_pos"], batch["img_mask"])

        def collate(items: list[dict]) -> dict:
            batch = Collator(pad)(items)
            fast.collate_sides(items, batch, pad, list(range(len(items))))
            batch["is_text"] = torch.as_tensor([x["is_text"] for x in items])
            return batch

        v = sharded_map(accelerator, side.images(), collate, embed, cfg.eval_batch_size,
                        "image embeddings").numpy()
        t = sharded_map(accelerator, side.texts(), collate, embed, cfg.eval_batch_size,
                        "text embeddings").numpy()
        sim = v @ t.T
        i2t, t2i = fast.shortlist_pairs(sim, cfg.shortlist)
        pairs = sorted({(i, int(j)) for i, row in enumerate(i2t) for j in row}
                       | {(int(i), j) for j, col in enumerate(t2i) for i in col})
        prob = sharded_map(accelerator, _PairList(pairer, images, texts, pairs),
                           Collator(pad), lambda b: self.pair_score(model, b),
                           cfg.eval_batch_size, "re-scoring the shortlists").numpy()
        cross = dict(zip(pairs, prob.tolist()))
        a, b2 = fast.reranked(sim, cross, i2t, t2i)
        return {"cross_passes": len(pairs), "unimodal_passes": len(images) + len(texts),
                "seconds": round(time.perf_counter() - start, 2)}, a, b2

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
                out.append(self.pair_score(model, batch).cpu())
        return torch.cat(out).numpy().reshape(len(images), len(texts))


TASK = Retrieval()
