"""Image captioning, Oscar's way: caption tokens masked and predicted under a left-to-right
mask in training; decoding appends [MASK], predicts it, and repeats until [SEP].

Recipe section `captioning` (config.CaptioningCfg). Reads captions (corpus kind "caption").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli.config import CaptioningCfg
from vlp_cli.data.examples import ExampleBuilder, ImageInput, TaskDataset, mask_tokens
from vlp_cli.stores.corpus import Corpus
from vlp_cli.tasks.base import (Context, Stats, Task, encode, masked_tokens, pad_labels,
                                sharded_map, split_indices)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vlp_cli.model import HeadSpec, VLPModel

KIND = "caption"
RESULTS_FILE = "captions_results.json"  # evaluate's COCO results file


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


def _seq2seq(items: list[dict], batch: dict) -> None:
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
        self.collate = Collator(ds.builder.pad_id, _seq2seq)
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

    def __init__(self, model: VLPModel, ds: CaptionDataset, images: list[ImageInput],
                 device: torch.device):
        import torch

        from vlp_cli.data.datasets import Collator
        from vlp_cli.model import KVCache

        self.model, self.ds, self.device = model, ds, device
        b = ds.builder
        self.a_len = a = ds.cfg.max_caption_len + 2
        # The training layout with an empty caption; everything from position a_len on is
        # the context: tags, their [SEP], regions.
        batch = Collator(b.pad_id, _seq2seq)([ds.build([], img)[0] for img in images])
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


class Captioning(Task):
    name = "captioning"
    help = "image captioning: BLEU-4, METEOR, ROUGE-L, CIDEr (greedy, beam or sampled decoding)"
    kinds = (KIND,)
    metrics = ("bleu4", "rouge_l", "cider", "images")
    report = ("bleu4", "meteor", "rouge_l", "cider", "images", "decoding")
    headline = "cider"
    uses_pooler = False
    _sampler: Any = None  # the sampling generator, seeded once per bound task

    @staticmethod
    def head_spec() -> HeadSpec:
        """The one head captioning trains and decodes through (BERT's masked-token head)."""
        from vlp_cli.model import HeadSpec

        return HeadSpec("mlm", "masked_tokens", init="bert_mlm")

    def heads(self, ctx: Context) -> list[HeadSpec]:
        return [self.head_spec()]

    def legacy_heads(self, config: dict) -> list[tuple[str, HeadSpec]]:
        from vlp_cli.model import HeadSpec

        return [("mlm_head", HeadSpec("mlm", "masked_tokens", init="bert_mlm"))]

    def max_text_len(self) -> int:
        """The text budget of an example: tags after a caption segment of fixed length."""
        return self.recipe.data.max_text_len + self.recipe.captioning.max_caption_len

    def dataset(self, ctx: Context, split: str, seed: int) -> CaptionDataset:
        idx = split_indices(ctx.corpus, KIND, split)
        return CaptionDataset(ctx.corpus, ctx.builder, idx, self.recipe.captioning,
                              self.max_text_len(), seed)

    def collate(self, items: list[dict], batch: dict) -> None:
        batch["mlm_labels"] = pad_labels(items, "mlm_labels", batch["input_ids"].shape[1])
        _seq2seq(items, batch)

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        hidden = encode(model, batch)
        loss, stats = masked_tokens(model, hidden, batch["mlm_labels"],
                                    self.recipe.captioning.label_smoothing)
        stats["loss"] = stats["mlm_loss"]
        return loss, stats

    def generate(self, model: VLPModel, builder: ExampleBuilder, images: list[ImageInput],
                 device: torch.device) -> list[list[int]]:
        """Caption ids for each image (at most `captioning.max_caption_len` pieces): greedy,
        or the best of a beam search when `captioning.beam_size` > 1."""
        import torch

        from vlp_cli.decoding import beam_search, constrained_beam_search, greedy, sample

        cfg = self.recipe.captioning
        ds = CaptionDataset(None, builder, np.zeros(0), cfg, self.max_text_len(), 0)
        decoder: CaptionDecoder | CachedCaptionDecoder = (
            CachedCaptionDecoder if cfg.incremental else CaptionDecoder)(model, ds, images, device)
        # Never emit padding, [CLS], [MASK] or [UNK]; [SEP] ends the caption.
        banned = torch.tensor(sorted(builder.special_ids - {builder.sep_id}), dtype=torch.long)
        if cfg.constrain_tags:
            constraints = [[builder.tag_pieces[c] for c in
                            list(dict.fromkeys(img.tag_classes))[: cfg.max_constraints]]
                           for img in images]
            hyps = constrained_beam_search(
                decoder.step, decoder.reorder, decoder.start(), len(images),
                cfg.max_caption_len, builder.sep_id, constraints,
                min_satisfied=cfg.min_constraints, beam=cfg.beam_size,
                length_penalty=cfg.length_penalty, banned=banned)
            return [h[0][0] if h else [] for h in hyps]
        if cfg.sample:
            if self._sampler is None:
                self._sampler = torch.Generator().manual_seed(self.recipe.seed)
            return sample(decoder.step, decoder.start(), len(images), cfg.max_caption_len,
                          builder.sep_id, top_k=cfg.top_k, top_p=cfg.top_p,
                          temperature=cfg.temperature, banned=banned, generator=self._sampler)
        if cfg.beam_size == 1:
            return greedy(decoder.step, decoder.start(), len(images), cfg.max_caption_len,
                          builder.sep_id, banned)
        hyps = beam_search(decoder.step, decoder.reorder, decoder.start(), len(images),
                           cfg.max_caption_len, builder.sep_id, beam=cfg.beam_size,
                           length_penalty=cfg.length_penalty, banned=banned)
        return [h[0][0] if h else [] for h in hyps]

    def caption(self, model: VLPModel, builder: ExampleBuilder, images: list[ImageInput],
                tokenizer: Any, device: torch.device, batch_size: int = 32,
                beam: int | None = None, constrain_tags: bool = False) -> list[str]:
        """Caption texts, `batch_size` images at a time (vlp caption); `beam` overrides the
        recipe's `captioning.beam_size`, `constrain_tags` turns its constrained search on."""
        from dataclasses import replace

        cfg = self.recipe.captioning
        cfg = replace(cfg, beam_size=cfg.beam_size if beam is None else beam,
                      constrain_tags=cfg.constrain_tags or constrain_tags)
        if cfg.constrain_tags and cfg.sample:
            from vlp_cli import VlpError

            raise VlpError("--constrain-tags is a beam search: drop --set captioning.sample")
        self.recipe = replace(self.recipe, captioning=cfg)
        model.eval()
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            ids = self.generate(model, builder, images[start: start + batch_size], device)
            out += [tokenizer.decode(w, skip_special_tokens=True).strip() for w in ids]
        return out

    def check_checkpoint(self, meta: dict) -> str | None:
        if meta.get("task") != self.name:
            # A pre-trained checkpoint "captions" with garbage; refuse instead of pretending.
            return (f"a '{meta.get('task')}' checkpoint: captions need one from `vlp finetune "
                    f"{self.name}`")
        return None

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        import torch

        from vlp_cli.metrics import caption_metrics

        refs: dict[str, list[str]] = {}
        for i in ctx.corpus.require(KIND, split):
            ex = ctx.corpus.get(int(i))
            refs.setdefault(ex["images"][0], []).append(ex["texts"][0])
        keys = sorted(refs)[:limit]
        budget = self.recipe.captioning.max_caption_len

        def generate(idx: torch.Tensor) -> torch.Tensor:
            images = [ctx.builder.regions(keys[i]) for i in idx.tolist()]
            ids = self.generate(model, ctx.builder, images, accelerator.device)
            rows = torch.full((len(ids), budget), -1, dtype=torch.long)
            for r, w in enumerate(ids):
                rows[r, : len(w)] = torch.as_tensor(w, dtype=torch.long)
            return rows.to(accelerator.device)

        rows = sharded_map(accelerator, list(range(len(keys))), None, generate, 32,
                           "captioning eval")
        preds = {k: ctx.tokenizer.decode([t for t in row if t >= 0],
                                         skip_special_tokens=True).strip()
                 for k, row in zip(keys, rows.tolist())}
        metrics = caption_metrics(preds, {k: refs[k] for k in keys}).as_dict()
        metrics["images"] = len(keys)
        metrics["decoding"] = self.decoding()
        return metrics, [{"image": k, "caption": preds[k], "references": refs[k]} for k in keys]

    def decoding(self) -> str:
        """How captions are decoded under this recipe, in words (for metrics.json)."""
        cfg = self.recipe.captioning
        if cfg.sample:
            return f"sampled (top_k {cfg.top_k}, top_p {cfg.top_p}, T {cfg.temperature})"
        if cfg.constrain_tags:
            return (f"constrained beam {cfg.beam_size} (>= {cfg.min_constraints} of "
                    f"{cfg.max_constraints} tags), length penalty {cfg.length_penalty}")
        if cfg.beam_size > 1:
            return f"beam {cfg.beam_size}, length penalty {cfg.length_penalty}"
        return "greedy"

    def result_files(self, predictions: list[dict]) -> dict[str, Any]:
        """COCO's results format: [{"image_id", "caption"}], image ids by the COCO reader's
        rule (the integer ending a key's file stem)."""
        from vlp_cli.readers.coco_captions import image_id

        return {RESULTS_FILE: [{"image_id": image_id(p["image"]), "caption": p["caption"]}
                               for p in predictions]}

    def score_files(self, predictions: Path, references: Path) -> tuple[dict, list[dict]]:
        """Any system's captions (COCO results JSON, or JSONL {"image", "caption"}) against
        references (a COCO captions file, or JSONL {"image", "caption"} lines)."""
        from vlp_cli import VlpError
        from vlp_cli.metrics import caption_metrics
        from vlp_cli.readers.coco_captions import read_references, read_results

        preds, refs = read_results(predictions), read_references(references)
        if not preds:
            raise VlpError(f"--predictions {predictions}: no captions in it")
        missing = [k for k in preds if k not in refs]
        if missing:
            raise VlpError(f"--predictions {predictions}: {len(missing)} of {len(preds)} images "
                           f"have no reference in {references} (first: {missing[0]!r}); "
                           "predictions and references must name images the same way")
        metrics = caption_metrics(preds, {k: refs[k] for k in preds}).as_dict()
        metrics["images"] = len(preds)
        return metrics, [{"image": k, "caption": preds[k], "references": refs[k]}
                         for k in sorted(preds)]


TASK = Captioning()
