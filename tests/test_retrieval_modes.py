"""Retrieval beyond Oscar's classifier: UNITER's ranking loss with mined hard negatives, the
dual-encoder head and fast (shortlist + re-score) evaluation, COCO's 1K folds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, one_error_line, tiny_recipe_sets
from vlp_cli.tasks import TASKS, Context

SETS = [a for x in tiny_recipe_sets() for a in ("--set", x)]


def _world(tiny_data: dict, *sets: str) -> tuple:
    from accelerate import Accelerator

    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.config import load_recipe
    from vlp_cli.data.datasets import Collator
    from vlp_cli.data.examples import ExampleBuilder
    from vlp_cli.model import VLPModel
    from vlp_cli.stores.corpus import Corpus
    from vlp_cli.stores.features import FeatureStore

    recipe = load_recipe("tiny", tiny_recipe_sets() + list(sets))
    tok = load_tokenizer("embedded:minilm")
    ctx = Context(recipe, Corpus(tiny_data["corpus"]),
                  ExampleBuilder(tok, FeatureStore(tiny_data["features"]), recipe.data), tok)
    task = TASKS["retrieval"].bind(recipe)
    task = task.bind(recipe, task.prepare(ctx))
    torch.manual_seed(0)
    model = VLPModel.from_text_encoder("random:tiny", 16, task.heads(ctx),
                                       vocab_size=len(tok)).eval()
    collate = Collator(ctx.builder.pad_id, task.collate)
    return task, ctx, model, collate, Accelerator(cpu=True)


def test_ranking_trains_on_the_hardest_mined_negatives(tiny_data: dict) -> None:
    from vlp_cli.tasks.base import encode

    task, ctx, model, collate, _ = _world(tiny_data, "retrieval.loss=ranking",
                                          "retrieval.sampled_negatives=4",
                                          "retrieval.hard_negatives=2")
    ds = task.dataset(ctx, "train", 0)
    batch = collate([ds[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 3 * (1 + 2 * 4)
    loss, stats = task.step(model, batch)  # eval mode: mining and training see one function
    with torch.no_grad():
        s = model.cls_logits("retrieval", encode(model, batch))[:, 0].float().sigmoid()
    s = s.view(3, 9)
    neg = torch.cat([s[:, 1:5].topk(2, dim=1).values, s[:, 5:].topk(2, dim=1).values], 1)
    expected = torch.clamp(0.2 + neg - s[:, :1], min=0).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert model.heads["retrieval"].weight.grad.abs().sum() > 0
    assert set(stats) >= {"loss", "rank_loss", "match_acc"}


def test_fast_mode_with_a_full_shortlist_equals_full_scoring(tiny_data: dict) -> None:
    """Shortlists as long as the lists themselves re-score every pair: the same recalls; a
    short one scores far fewer pairs."""
    task, ctx, model, collate, acc = _world(tiny_data, "retrieval.itc_weight=0.5",
                                            "retrieval.eval_mode=both",
                                            "retrieval.shortlist=1000")
    ds = task.dataset(ctx, "train", 0)
    batch = collate([ds[i] for i in range(4)])
    model.train()
    loss, stats = task.step(model, batch)
    assert "itc_loss" in stats and torch.isfinite(loss)
    loss.backward()
    assert model.heads["retrieval_text"].weight.grad.abs().sum() > 0
    model.eval()
    m, _ = task.evaluate(ctx, model, "test", None, acc)
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum"):
        assert m["fast_" + k] == pytest.approx(m[k]), k
    assert m["fast_cross_passes"] == m["cross_passes"] == m["images"] * m["texts"]
    assert m["fast_unimodal_passes"] == m["images"] + m["texts"]
    r = task.recipe
    short = task.bind(replace(r, retrieval=replace(r.retrieval, shortlist=2)), task.state)
    m2, _ = short.evaluate(ctx, model, "test", None, acc)
    assert m2["fast_cross_passes"] <= 2 * 2 * m2["images"] < m2["cross_passes"]


def test_coco_1k_folds_are_the_mean_over_folds() -> None:
    from vlp_cli.metrics import retrieval_recall
    from vlp_cli.tasks.retrieval_fast import fold_recalls

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 12))
    t2i = np.repeat(np.arange(6), 2)
    got = fold_recalls(scores, t2i, 2)
    a = retrieval_recall(scores[:3, :6], t2i[:6])
    b = retrieval_recall(scores[3:, 6:], t2i[6:] - 3)
    assert got["folds_i2t_r1"] == pytest.approx((a["i2t_r1"] + b["i2t_r1"]) / 2)
    assert got["folds_t2i_r5"] == pytest.approx((a["t2i_r5"] + b["t2i_r5"]) / 2)
    assert got["fold_images"] == 3


def test_cli_ranking_with_the_dual_encoder_and_both_evaluations(tiny_data: dict,
                                                                tmp_path: Path) -> None:
    io_ = ["-c", tiny_data["corpus"], "-f", tiny_data["features"]]
    res = cli("pretrain", "recipes/tiny.yaml", *io_, "-o", tmp_path / "pre", *SETS)
    assert res.exit_code == 0, res.output
    res = cli("finetune", "retrieval", "-k", tmp_path / "pre", *io_, "-o", tmp_path / "r", *SETS,
              "--set", "retrieval.loss=ranking", "--set", "retrieval.sampled_negatives=3",
              "--set", "retrieval.hard_negatives=1", "--set", "retrieval.itc_weight=0.1")
    assert res.exit_code == 0, res.output
    res = cli("evaluate", "retrieval", "-k", tmp_path / "r", *io_, "-o", tmp_path / "e",
              "--set", "retrieval.eval_mode=both", "--set", "retrieval.shortlist=2",
              "--set", "retrieval.folds=2")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert {"i2t_r1", "fast_i2t_r1", "folds_t2i_r1", "fast_cross_passes"} <= set(m)
    # A checkpoint without the dual-encoder head cannot evaluate fast: one line.
    res = cli("finetune", "retrieval", "-k", tmp_path / "pre", *io_, "-o", tmp_path / "b", *SETS)
    assert res.exit_code == 0, res.output
    err = one_error_line(cli("evaluate", "retrieval", "-k", tmp_path / "b", *io_, "-o",
                             tmp_path / "e2", "--set", "retrieval.eval_mode=fast"))
    assert "retrieval.itc_weight" in err
