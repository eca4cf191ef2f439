"""The `collate` benchmark: examples/s per core through the generic Collator.

Items as a task dataset hands them over (Oscar pre-training's: ids, types, masked-token labels,
a contrastive label; regions as read-only float16 views, as the feature store gives them),
collated in batches of 64 on one torch thread (DataLoader workers run one each). Two sizes:
the demo's (text up to 35 tokens, 10 regions of the demo store's 1280-d features) against a
target of 10,000 examples/s, and the papers' (50 regions of 2048-d), reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vlp_cli.benches.common import combine, value_summary


@dataclass(frozen=True)
class CollateScale:
    max_text: int
    regions: int
    dim: int


SCALES = {"demo": CollateScale(35, 10, 1280), "paper": CollateScale(35, 50, 2048)}


def synthetic_items(n: int, scale: CollateScale, seed: int = 0) -> list[dict]:
    """Oscar pre-training items of varied text length, regions as read-only fp16 views."""
    rng = np.random.default_rng(seed)
    store = rng.normal(size=(n, scale.regions, scale.dim)).astype(np.float16)
    pos = rng.uniform(size=(n, scale.regions, 7)).astype(np.float32)
    store.flags.writeable = pos.flags.writeable = False
    items = []
    for i in range(n):
        t = int(rng.integers(scale.max_text // 2, scale.max_text + 1))
        labels = [-100] * t
        labels[int(rng.integers(1, t - 1))] = int(rng.integers(1000, 2000))
        items.append({"ids": rng.integers(1000, 2000, t).tolist(),
                      "types": [0] * (t // 2) + [1] * (t - t // 2),
                      "feats": store[i], "pos": pos[i], "mlm_labels": labels,
                      "contrast": int(rng.integers(0, 2))})
    return items


def bench_collate(reps: int, batch_size: int = 64, batches: int = 40,
                  scales: dict[str, CollateScale] | None = None,
                  target: float = 10_000.0) -> dict:
    """Examples/s per core through the Collator (with Oscar's hook): demo and Oscar sizes."""
    from vlp_cli import tasks as registry
    from vlp_cli.config import load_recipe
    from vlp_cli.data.datasets import Collator
    from vlp_cli.extractors.images import one_torch_thread

    # The demo's pre-training objective's hook (Oscar's: the items above are its items).
    recipe = load_recipe("tiny")
    task = registry.get(next(iter(recipe.pretrain.tasks)), "pretrain").bind(recipe)
    collate = Collator(0, task.collate)
    parts = {}
    for name, scale in (scales or SCALES).items():
        items = synthetic_items(batch_size * batches, scale)
        rates = []
        with one_torch_thread():
            for rep in range(reps + 1):  # repetition 0 is the warm-up
                start = time.perf_counter()
                for b in range(batches):
                    collate(items[b * batch_size:(b + 1) * batch_size])
                if rep:
                    rates.append(len(items) / (time.perf_counter() - start))
        part = value_summary(rates, target if name == "demo" else 0.0, ">=", "examples/s")
        part.update(scale=[scale.max_text, scale.regions, scale.dim], batch_size=batch_size)
        parts[name] = part
    result = combine({"demo": parts["demo"]} if "demo" in parts else parts, target)
    result["parts"] = parts
    result.update(name="collate", unit="examples/s",
                  what="examples/s on one core through the Collator (Oscar items)")
    return result
