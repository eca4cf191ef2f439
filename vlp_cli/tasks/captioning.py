"""Image captioning, Oscar's way: caption tokens masked and predicted under a left-to-right
mask in training; decoding appends [MASK], predicts it, and repeats until [SEP].

Recipe section `captioning` (config.CaptioningCfg). Reads captions (corpus kind "caption").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli.config import CaptioningCfg
from vlp_cli.data.examples import ExampleBuilder, ImageInput
from vlp_cli.tasks.caption_decoding import (CachedCaptionDecoder, CaptionDataset, CaptionDecoder,
                                            caption_attention, seq2seq)
from vlp_cli.tasks.scst import ScstDataset, ScstReward, images_and_refs
from vlp_cli.tasks.base import (Context, Stats, Task, encode, longs, masked_tokens,
                                mean_stat, pad_labels, sharded_map, split_indices)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from vlp_cli.model import HeadSpec, VLPModel

__all__ = ["CachedCaptionDecoder", "CaptionDataset", "CaptionDecoder", "Captioning",
           "ScstReward", "caption_attention", "TASK"]

KIND = "caption"
RESULTS_FILE = "captions_results.json"  # evaluate's COCO results file


class Captioning(Task):
    name = "captioning"
    help = "image captioning: BLEU-4, METEOR, ROUGE-L, CIDEr (greedy, beam or sampled decoding)"
    kinds = (KIND,)
    metrics = ("bleu4", "rouge_l", "cider", "images")
    report = ("bleu4", "meteor", "rouge_l", "cider", "images", "decoding")
    headline = "cider"
    select = "mlm_acc"
    uses_pooler = False
    _sampler: Any = None  # the sampling generator, seeded once per bound task
    _reward: ScstReward | None = None  # SCST: made by `dataset`, read by `scst_step`
    _decode_ds: CaptionDataset | None = None

    def bind(self, recipe: Any, state: dict | None = None) -> Captioning:
        task = super().bind(recipe, state)
        assert isinstance(task, Captioning)
        task._sampler = task._reward = task._decode_ds = None  # nothing carried between runs
        return task

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
        cfg = self.recipe.captioning
        if not cfg.scst:
            return CaptionDataset(ctx.corpus, ctx.builder, idx, cfg, self.max_text_len(), seed)
        # SCST: the reward (and its document frequencies, from the training captions) is made
        # once per bound task, on the first split asked for; each split adds its references.
        if self._reward is None:
            _, train_refs = images_and_refs(ctx.corpus, split_indices(ctx.corpus, KIND,
                                                                       "train"))
            self._reward = ScstReward(ctx.tokenizer, train_refs)
            self._decode_ds = CaptionDataset(None, ctx.builder, np.zeros(0), cfg,
                                             self.max_text_len(), 0)
        first, refs = images_and_refs(ctx.corpus, idx)
        return ScstDataset(ctx.corpus, ctx.builder, np.asarray(first, dtype=np.int64), cfg,
                           self.max_text_len(), seed, self._reward.add(refs))

    def collate(self, items: list[dict], batch: dict) -> None:
        if self.recipe.captioning.scst:
            batch["refs"], batch["draw"] = longs(items, "refs"), longs(items, "draw")
        else:
            batch["mlm_labels"] = pad_labels(items, "mlm_labels", batch["input_ids"].shape[1])
        seq2seq(items, batch)

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        if self.recipe.captioning.scst:
            return self.scst_step(model, batch)
        hidden = encode(model, batch)
        loss, stats = masked_tokens(model, hidden, batch["mlm_labels"],
                                    self.recipe.captioning.label_smoothing)
        stats["loss"] = stats["mlm_loss"]
        return loss, stats

    def scst_step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        """Self-critical sequence training as Oscar ran it: the greedy caption of each image
        (eval mode, no gradient) is the baseline; `scst_samples` captions per image are
        sampled in training mode; the loss is -mean((reward - baseline) x mean log-prob).
        Under no gradient (held-out statistics) only the greedy captions are scored."""
        import torch

        from vlp_cli.decoding import greedy, sample_with_log_probs

        cfg, ds, reward = self.recipe.captioning, self._decode_ds, self._reward
        if reward is None:
            raise RuntimeError("scst_step before dataset(): the reward is made with the data")
        b = ds.builder
        rows = batch["refs"].tolist()
        n, device = len(rows), batch["input_ids"].device
        banned = torch.tensor(sorted(b.special_ids - {b.sep_id}), dtype=torch.long)
        was_training = model.training
        base: np.ndarray | None = None
        if cfg.scst_baseline == "greedy" or not torch.is_grad_enabled():
            model.eval()
            with torch.no_grad():
                dec = CachedCaptionDecoder(model, ds, None, device, batch=batch)
                base = reward(greedy(dec.step, dec.start(), n, cfg.max_caption_len, b.sep_id,
                                     banned), rows)
            model.train(was_training)
        if not torch.is_grad_enabled():
            value = torch.tensor(float(base.mean()), device=device)  # type: ignore[union-attr]
            return -value, {"loss": mean_stat(-value, n), "reward_greedy": mean_stat(value, n)}
        k = cfg.scst_samples
        expand = torch.arange(n).repeat_interleave(k)
        gen = torch.Generator().manual_seed(int(batch["draw"][0]))
        # Sampled in training mode with the graph of every step kept, as Oscar's SCST does.
        # (Scoring the samples afterwards in one teacher-forced pass was tried: no faster on
        # the CPU, and with dropout drawing other masks than the sampling pass it lowered
        # held-out CIDEr where this raised it, one run each.)
        dec = CachedCaptionDecoder(model, ds, None, device, batch=batch)
        state = dec.reorder(dec.start(), expand.to(device))
        ids, logp = sample_with_log_probs(dec.step, state, n * k, cfg.max_caption_len,
                                          b.sep_id, top_k=cfg.top_k, top_p=cfg.top_p,
                                          temperature=cfg.temperature, banned=banned,
                                          generator=gen)
        got = reward(ids, [rows[i] for i in expand.tolist()]).reshape(n, k)
        if base is not None:
            baseline = np.repeat(base[:, None], k, axis=1)
        else:  # the mean of the image's other samples
            baseline = (got.sum(1, keepdims=True) - got) / (k - 1)
        advantage = torch.as_tensor((got - baseline).reshape(-1), dtype=torch.float32,
                                    device=logp.device)
        loss = -(logp * advantage).mean()
        stats = {"loss": mean_stat(loss, n),
                 "reward": mean_stat(torch.tensor(float(got.mean()), device=device), n)}
        if base is not None:
            stats["reward_greedy"] = mean_stat(torch.tensor(float(base.mean()), device=device),
                                               n)
        return loss, stats

    def generate(self, model: VLPModel, builder: ExampleBuilder, images: list[ImageInput],
                 device: torch.device, cfg: CaptioningCfg | None = None) -> list[list[int]]:
        """Caption ids for each image (at most `captioning.max_caption_len` pieces): greedy,
        or the best of a beam search when `captioning.beam_size` > 1; `cfg` in place of the
        recipe's section (one call's overrides)."""
        import torch

        from vlp_cli.decoding import beam_search, constrained_beam_search, greedy, sample

        cfg = cfg or self.recipe.captioning
        ds = CaptionDataset(None, builder, np.zeros(0), cfg, self.max_text_len(), 0)
        decoder: CaptionDecoder | CachedCaptionDecoder = (
            CachedCaptionDecoder if cfg.incremental else CaptionDecoder)(model, ds, images, device)
        # Never emit padding, [CLS], [MASK] or [UNK]; [SEP] ends the caption.
        banned = torch.tensor(sorted(builder.special_ids - {builder.sep_id}), dtype=torch.long)
        if cfg.constrain_tags:
            constraints = [[builder.tag_forms[c] for c in
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
        model.eval()
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            ids = self.generate(model, builder, images[start: start + batch_size], device, cfg)
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
