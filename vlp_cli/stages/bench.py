"""vlp bench: speed as ratios against a baseline interleaved in the same process.

Absolute timings on shared machines drift by 3x from minute to minute; a ratio of two arms run
alternately, repetition by repetition, does not. Each benchmark reports the median of the
per-repetition ratios after one warm-up repetition, with its target.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vlp_cli import VlpError

logger = logging.getLogger(__name__)


def interleave(arms: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each arm once per repetition, in alternating order; each returns a rate (items/s)."""
    rates: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for rep in range(reps + 1):  # repetition 0 is the warm-up
        for name in (names if rep % 2 == 0 else names[::-1]):
            rate = arms[name]()
            if rep > 0:
                rates[name].append(rate)
    return rates


def ratio_summary(rates: dict[str, list[float]], num: str, den: str, target: float) -> dict:
    ratios = [a / b for a, b in zip(rates[num], rates[den])]
    med = statistics.median(ratios)
    return {"ratio": round(med, 3), "target": target, "met": med >= target,
            "ratios": [round(r, 3) for r in ratios],
            f"{num}_per_s": round(statistics.median(rates[num]), 2),
            f"{den}_per_s": round(statistics.median(rates[den]), 2)}


def _small_easy_vqa(tmp: Path, images: int) -> tuple[Path, Path, object]:
    """A feature store and corpus over the first `images` easy-VQA training images."""
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import corpus, extract

    import shutil

    from vlp_cli.readers.easyvqa import data_root as easy_vqa_root

    recipe = load_recipe("tiny")
    feats, corp = tmp / "features", tmp / "corpus"
    # Same keys as the full data set (train/images/N.png), so the easy-vqa corpus source
    # finds them; the rest of its examples are skipped.
    src = easy_vqa_root() / "train" / "images"
    (tmp / "images" / "train" / "images").mkdir(parents=True)
    for i in range(images):
        shutil.copy(src / f"{i}.png", tmp / "images" / "train" / "images" / f"{i}.png")
    boxes = tmp / "boxes.jsonl"
    from vlp_cli.readers import easyvqa

    anns = [a for a in easyvqa.derive_annotations("train") if a.image_id < images]
    easyvqa.write_boxes_jsonl(anns, boxes)
    extract.run(str(tmp / "images"), feats, recipe, boxes=boxes)
    corpus.run(["easy-vqa"], feats, corp, recipe, skip_missing=True)
    return feats, corp, recipe


def bench_pipeline(reps: int, steps: int = 8, images: int = 640) -> dict:
    """Training steps/s with the real data loader / on the same batches pre-collated in memory.

    The model, batch size and loader settings are the tiny recipe's pre-training ones.
    """
    from torch.utils.data import DataLoader

    from vlp_cli.checkpoint import load_tokenizer, quiet_transformers
    from vlp_cli.data.datasets import Collator, PretrainDataset
    from vlp_cli.data.examples import ExampleBuilder
    from vlp_cli.model import VLPModel
    from vlp_cli.assets import resolve_text_encoder
    from vlp_cli.stages.common import open_inputs
    from vlp_cli.tasks import pretrain_step

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        feats, corp, recipe = _small_easy_vqa(Path(tmp), images)
        inputs = open_inputs(corp, feats)
        tok = load_tokenizer(recipe.model.init)
        builder = ExampleBuilder(tok, inputs.features, recipe.data)
        cfg = recipe.pretrain
        idx = inputs.corpus.indices("caption", "train")
        ds = PretrainDataset(inputs.corpus, builder, idx, cfg, recipe.data.max_text_len, 0)
        collate = Collator(builder.pad_id)
        bs = cfg.train.batch_size
        if len(ds) < bs * steps:
            raise VlpError(f"bench needs {bs * steps} examples, has {len(ds)}")
        model = VLPModel.from_text_encoder(resolve_text_encoder(recipe.model.init),
                                           inputs.features.feature_dim, vocab_size=len(tok))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        step_fn = pretrain_step()
        model.train()

        def train_on(batches: object) -> float:
            start = time.perf_counter()
            n = 0
            for batch in batches:  # type: ignore[attr-defined]
                loss, _ = step_fn(model, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                n += 1
                if n == steps:
                    break
            return n / (time.perf_counter() - start)

        loader = DataLoader(ds, batch_size=bs, shuffle=True, collate_fn=collate,
                            num_workers=cfg.train.num_workers, drop_last=True)
        in_memory = [b for b, _ in zip(loader, range(steps))]
        rates = interleave({"loader": lambda: train_on(loader),
                            "in_memory": lambda: train_on(in_memory)}, reps)
    result = ratio_summary(rates, "loader", "in_memory", 0.9)
    result.update(name="pipeline", batch_size=bs, steps_per_rep=steps,
                  num_workers=cfg.train.num_workers,
                  what="training steps/s, real data loader / same batches pre-collated")
    return result


def _from_bench_features(name: str) -> Callable[..., dict]:
    """A benchmark of bench_features.py, imported when run (it imports this module)."""

    def run(reps: int) -> dict:
        from vlp_cli.stages import bench_features

        return getattr(bench_features, name)(reps)

    return run


BENCHES: dict[str, Callable[..., dict]] = {
    "pipeline": bench_pipeline,
    "extract": _from_bench_features("bench_extract"),
    "store-read": _from_bench_features("bench_store_read"),
    "extract-memory": _from_bench_features("bench_extract_memory"),
}


def run(name: str, reps: int = 5) -> dict:
    """Run one benchmark (or `all`) and print its ratios."""
    from vlp_cli.console import out

    if name != "all" and name not in BENCHES:
        raise VlpError(f"unknown benchmark {name!r}; available: {', '.join(BENCHES)}, all")
    results = {}
    for n, fn in BENCHES.items():
        if name in (n, "all"):
            r = fn(reps=reps)
            results[n] = r
            verdict = "met" if r["met"] else "MISSED"
            direction = r.get("direction", ">=")
            out.print(f"[bold]{n}[/]: ratio {r['ratio']} (target {direction} {r['target']}, "
                      f"{verdict}); per-rep {r['ratios']}")
            for part, pr in (r.get("parts") or {}).items():
                out.print(f"  {part}: ratio {pr.get('ratio')} per-rep {pr.get('ratios')}")
                if "checksum" in pr:  # store-read: what verifying each record costs
                    cs = pr["checksum"]
                    out.print(f"    record checksum: {cs['us_per_record']} us per "
                              f"{cs['record_kib']} KiB record, {cs['share_of_vlp_read']:.0%} "
                              "of a vlp read")
                    wp = pr.get("with_probs_over_uniter")
                    if wp:
                        out.print(f"    reading the class distribution too (MRC-kl): ratio "
                                  f"{wp['ratio']} per-rep {wp['ratios']}")
    return results
