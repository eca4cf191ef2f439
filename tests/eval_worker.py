"""Run by test_distributed.py, alone or under `accelerate launch`: scores of a tiny random
model over N questions, split over the processes and gathered (not a test module)."""

from __future__ import annotations

import json
import sys

import torch


def main(corpus: str, features: str, n: int, out: str) -> None:
    from accelerate import Accelerator

    from conftest import tiny_recipe_obj
    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.data.datasets import Collator
    from vlp_cli.data.examples import ExampleBuilder
    from vlp_cli.model import VLPModel
    from vlp_cli.stores.corpus import Corpus
    from vlp_cli.stores.features import FeatureStore
    from vlp_cli.tasks import TASKS, Context
    from vlp_cli.tasks.base import encode, sharded_map

    acc = Accelerator(cpu=True)
    recipe = tiny_recipe_obj()
    tok = load_tokenizer("embedded:minilm")
    ctx = Context(recipe, Corpus(corpus), ExampleBuilder(tok, FeatureStore(features),
                                                         recipe.data), tok)
    task = TASKS["vqa"].bind(recipe)
    task = task.bind(recipe, task.prepare(ctx))
    torch.manual_seed(0)
    model = VLPModel.from_text_encoder("random:tiny", 16, task.heads(ctx), vocab_size=len(tok))
    model.eval()
    ds = task.dataset(ctx, "train", 0)
    ds.indices = ds.indices[:n]

    def score(b: dict) -> torch.Tensor:
        top = model.cls_logits("vqa", encode(model, b)).max(-1).values
        return torch.stack([b["index"].float(), top.float()], 1)

    rows = sharded_map(acc, ds, Collator(ctx.builder.pad_id, task.collate), score, 2, "scores")
    if acc.is_main_process:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"rows": rows.tolist(), "indices": ds.indices.tolist(),
                       "processes": acc.num_processes}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
