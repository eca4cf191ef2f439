"""The `pipeline` benchmark: training steps/s with the real data loader / pre-collated batches."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from vlp_cli import VlpError
from vlp_cli.benches.common import interleave, ratio_summary


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

    from vlp_cli import tasks as registry
    from vlp_cli.assets import resolve_text_encoder
    from vlp_cli.checkpoint import load_tokenizer, quiet_transformers
    from vlp_cli.data.datasets import Collator
    from vlp_cli.data.examples import ExampleBuilder
    from vlp_cli.model import VLPModel
    from vlp_cli.stages.common import open_inputs

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        feats, corp, recipe = _small_easy_vqa(Path(tmp), images)
        inputs = open_inputs(corp, feats)
        tok = load_tokenizer(recipe.model.init)
        builder = ExampleBuilder(tok, inputs.features, recipe.data)
        cfg = recipe.pretrain
        # The recipe's first pre-training objective (Oscar's in the tiny recipe).
        ctx = registry.Context(recipe, inputs.corpus, builder, tok)
        task = registry.get(next(iter(cfg.tasks)), "pretrain").bind(recipe)
        task = task.bind(recipe, task.prepare(ctx))
        ds = task.dataset(ctx, "train", 0)
        collate = Collator(builder.pad_id, task.collate)
        bs = cfg.train.batch_size
        if len(ds) < bs * steps:
            raise VlpError(f"bench needs {bs * steps} examples, has {len(ds)}")
        model = VLPModel.from_text_encoder(resolve_text_encoder(recipe.model.init),
                                           inputs.features.feature_dim, task.heads(ctx),
                                           vocab_size=len(tok))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        step_fn = task.step
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
