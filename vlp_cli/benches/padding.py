"""The `padding` benchmark: padded positions in length-bucketed batches / fixed random batches.

A batch costs the model (text positions + region positions) x (batch size), as the collator
pads text and regions each to the batch's own longest. The padded share of those positions is
measured epoch by epoch (one epoch a repetition) for UNITER's bucketed batches
(`data.buckets`, budget = the fixed batch's size x the mean example) and for fixed-size batches
of shuffled examples, over two length distributions:

- easy-vqa: the demo corpus's training examples (captions and questions), from a feature
  store and corpus built in a temporary folder over the first easy-VQA images (the demo's
  extraction and corpus code, ~10 s).
- coco-like: sampled, as Oscar / UNITER pre-training sees COCO with VinVL regions: caption word
  pieces ~ N(11.5, 2.5) in [6, 30], `[CLS] a [SEP] b [SEP]` within 35 tokens, tags the
  labels of the boxes (~1.2 pieces each, at most 15); regions log-normal around 28 boxes
  (VinVL at conf >= 0.2, 10 to 100, 49 kept) plus the whole image.

"packed" (under `also`) counts what a layout that packs each example's text and regions
together before padding would pay (UNITER gathers them so), its buckets sorted and sized by
the total: the collator's layout pads text and regions each to its own maximum, so its
buckets are sorted part by part (`buckets.snake_order`), which leaves a little more.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from vlp_cli.benches.common import combine, value_summary
from vlp_cli.data.buckets import bucket_batches


def padded_fraction(text: np.ndarray, regions: np.ndarray, batches: list[np.ndarray],
                    packed: bool = False) -> float:
    """Padded share of the positions the collator builds: per batch B x (max T + max R).

    With `packed`, per batch B x max(T + R): what a layout that gathers each example's text
    and regions side by side before padding (UNITER's `gather_index`) would pay.
    """
    if packed:
        total = sum(len(b) * int((text[b] + regions[b]).max()) for b in batches)
    else:
        total = sum(len(b) * (int(text[b].max()) + int(regions[b].max())) for b in batches)
    real = sum(int(text[b].sum() + regions[b].sum()) for b in batches)
    return 1.0 - real / total


def fixed_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def coco_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(text tokens, regions) of `n` sampled COCO-like pre-training examples."""
    rng = np.random.default_rng(seed)
    words = np.clip(np.rint(rng.normal(11.5, 2.5, n)), 6, 30).astype(np.int64)
    boxes = np.clip(np.rint(np.exp(rng.normal(np.log(27), 0.45, n))), 10, 100).astype(np.int64)
    boxes = np.minimum(boxes, 49)  # 50 regions with the whole-image one, which has no tag
    tags = np.minimum(np.rint(1.2 * boxes), 15).astype(np.int64)  # ~1.2 pieces a label
    text = np.minimum(words + tags, 35 - 3) + 3
    return text, boxes + 1


def easy_vqa_sizes(images: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(text tokens, regions) of the demo corpus's training examples (every kind) over
    `images` images, and the demo's pre-training batch size."""
    from vlp_cli.benches.pipeline import _small_easy_vqa
    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.data.examples import ExampleBuilder, TaskDataset
    from vlp_cli.stages.common import open_inputs

    with tempfile.TemporaryDirectory() as tmp:
        feats, corp, recipe = _small_easy_vqa(Path(tmp), images)
        inputs = open_inputs(corp, feats)
        c = inputs.corpus
        kinds = sorted({key.split("/")[0] for key in c.meta.get("counts", {})})
        ds = TaskDataset(c, ExampleBuilder(load_tokenizer(recipe.model.init), inputs.features,
                                           recipe.data),
                         np.concatenate([c.indices(k, "train") for k in kinds]), 0)
        ds.max_text_len = recipe.data.max_text_len
        text, regions = ds.sizes()
        inputs.features.close()
        return text, regions, recipe.pretrain.train.batch_size


def _part(text: np.ndarray, regions: np.ndarray, batch_size: int, bucket_size: int,
          reps: int, target: float) -> dict:
    units = text + regions
    max_units = int(round(batch_size * float(units.mean())))
    runs: dict[str, list[float]] = {"bucketed": [], "fixed": [], "bucketed, packed": [],
                                    "fixed, packed": []}
    for epoch in range(1, reps + 1):
        rng = np.random.default_rng([0, epoch])
        # Sized as training sizes them: count x (longest text + most regions).
        bucketed = bucket_batches(np.stack([text, regions], 1), max_units, bucket_size, rng)
        fixed = fixed_batches(len(units), batch_size, np.random.default_rng([1, epoch]))
        # A packing layout sizes and sorts by the total (UNITER's own buckets).
        packed = bucket_batches(units, max_units, bucket_size, np.random.default_rng([2, epoch]))
        runs["bucketed"].append(padded_fraction(text, regions, bucketed))
        runs["fixed"].append(padded_fraction(text, regions, fixed))
        runs["bucketed, packed"].append(padded_fraction(text, regions, packed, packed=True))
        runs["fixed, packed"].append(padded_fraction(text, regions, fixed, packed=True))
    part = value_summary(runs.pop("bucketed"), target, "<=", "padded fraction")
    part.update(examples=len(units), batch_size=batch_size, max_units=max_units,
                bucket_size=bucket_size, units_mean=round(float(units.mean()), 2),
                units_range=[int(units.min()), int(units.max())],
                also={arm: value_summary(v, target, "<=", "padded fraction")
                      for arm, v in runs.items()})
    return part


def bench_padding(reps: int, images: int = 96, coco_examples: int = 40_000,
                  target: float = 0.03) -> dict:
    """Padded share of batch positions, length buckets (target <= 3%) vs fixed batches."""
    text, regions, bs = easy_vqa_sizes(images)
    parts = {"easy-vqa": _part(text, regions, bs, 8192, reps, target)}
    text, regions = coco_like(coco_examples)
    parts["coco-like"] = _part(text, regions, 128, 8192, reps, target)
    result = combine(parts, target, direction="<=")
    result.update(name="padding", unit="padded fraction",
                  what="padded share of (text + region) positions, length buckets; fixed "
                       "random batches under 'also'")
    return result
