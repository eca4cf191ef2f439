"""The `train-step` benchmark: forward + backward examples/s, vlp's batching / Oscar's padding.

Both arms run the same model (a BERT-mini-sized `VLPModel`: hidden 256, 4 layers, 4 heads,
random weights; the same weights in both) over the same examples:

- padded: `transformers.BertModel` with eager attention, every example padded to the recipe's
  maximum text length and region count, fixed batches of 32: as the Oscar code pads.
- vlp: SDPA attention (transformers' default), length-bucketed batches (`data.buckets`, budget
  32 x (max text + max regions) units: the fixed batch's size) padded to each batch's own
  lengths, sized and sorted as training does (text and regions padded each to its maximum).

Two length distributions: the demo corpus's own training examples (the tiny recipe: 35 + 10,
1280-d features; the target), and the padding benchmark's COCO-like one (35 + 50, 2048-d;
reported).

A repetition is one pass over the examples in each arm, interleaved (`common.interleave`).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from vlp_cli.benches.common import interleave, ratio_summary
from vlp_cli.benches.padding import coco_like, fixed_batches
from vlp_cli.data.buckets import bucket_batches

MINI = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 1024}


def _batch(text: np.ndarray, regions: np.ndarray, t: int, r: int, dim: int,
           g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Inputs of one batch padded to (t, r): the model's forward arguments."""
    b = len(text)
    ids = torch.randint(1000, 2000, (b, t), generator=g)
    text_mask = torch.arange(t)[None] < torch.as_tensor(text)[:, None]
    img_mask = torch.arange(r)[None] < torch.as_tensor(regions)[:, None]
    return (ids, torch.zeros_like(ids), text_mask, torch.randn(b, r, dim, generator=g),
            torch.rand(b, r, 7, generator=g), img_mask)


def bench_train_step(reps: int, examples: int = 128, batch_size: int = 32,
                     bert: dict | None = None, target: float = 1.5,
                     demo_images: int = 96) -> dict:
    """The demo corpus's lengths (judged) and COCO-like lengths (reported)."""
    from vlp_cli.benches.padding import easy_vqa_sizes

    text, regions, _ = easy_vqa_sizes(demo_images)
    pick = np.random.default_rng(2).choice(len(text), size=min(examples, len(text)),
                                           replace=False)
    demo = _measure(reps, text[pick], regions[pick], batch_size, bert, 1280, 35, 10, target)
    ct, cr = coco_like(examples, seed=1)
    coco = _measure(reps, ct, cr, batch_size, bert, 2048, 35, 50, target)
    demo["coco_like"] = {k: coco[k] for k in ("ratio", "ratios", "spread", "positions_ratio")
                         if k in coco}
    return demo


def _measure(reps: int, text: np.ndarray, regions: np.ndarray, batch_size: int,
             bert: dict | None, dim: int, max_text: int, max_regions: int,
             target: float) -> dict:
    """Forward + backward examples/s: bucketed batches at their own lengths with SDPA /
    fixed batches padded to the maxima with eager attention."""
    from vlp_cli.model import ModelConfig, VLPModel, tiny_bert

    examples = len(text)
    units = text + regions
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    fixed = [_batch(text[b], regions[b], max_text, max_regions, dim, g)
             for b in fixed_batches(examples, batch_size, rng)]
    budget = batch_size * (max_text + max_regions)
    # Sized and sorted as training does: text and regions are padded each to its maximum.
    ours = [_batch(text[b], regions[b], int(text[b].max()), int(regions[b].max()), dim, g)
            for b in bucket_batches(np.stack([text, regions], 1), budget, 8192, rng)]
    config = {**tiny_bert(30522), **(bert or MINI), "hidden_dropout_prob": 0.1,
              "attention_probs_dropout_prob": 0.1}
    torch.manual_seed(0)
    model = VLPModel(ModelConfig(bert=config, img_feat_dim=dim, pos_dim=7, heads=[]), seed=0)
    baseline = copy.deepcopy(model)
    baseline.bert.set_attn_implementation("eager")
    model.train()
    baseline.train()

    def run(m: VLPModel, batches: list[tuple[torch.Tensor, ...]]) -> float:
        start = time.perf_counter()
        n = 0
        for inputs in batches:
            m(*inputs).mean().backward()
            n += len(inputs[0])
        m.zero_grad(set_to_none=True)
        return n / (time.perf_counter() - start)

    rates = interleave({"vlp": lambda: run(model, ours),
                        "padded": lambda: run(baseline, fixed)}, reps)
    result = ratio_summary(rates, "vlp", "padded", target)
    fixed_pos = sum(x[0].numel() + x[5].numel() for x in fixed)
    ours_pos = sum(x[0].numel() + x[5].numel() for x in ours)
    result.update(name="train-step", examples=examples, batch_size=batch_size,
                  max_units=budget, bucketed_batches=len(ours),
                  positions_ratio=round(fixed_pos / ours_pos, 3),
                  attention=[model.bert.config._attn_implementation,
                             baseline.bert.config._attn_implementation],
                  model={k: config[k] for k in MINI} | {"img_feat_dim": dim},
                  what="forward+backward examples/s: length buckets at their own lengths "
                       f"(SDPA) / Oscar-style padding to {max_text} + {max_regions} (eager)")
    return result
