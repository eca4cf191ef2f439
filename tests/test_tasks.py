"""Every registered task, on the tiny random model: one battery, parametrised over the
registry, so that a new task is checked the day it is registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe_obj
from vlp_cli.tasks import TASKS, Context

NAMES = list(TASKS)


@pytest.fixture(scope="module")
def world(task_data: dict) -> dict:
    from accelerate import Accelerator

    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.data.examples import ExampleBuilder
    from vlp_cli.stores.corpus import Corpus
    from vlp_cli.stores.features import FeatureStore

    recipe = tiny_recipe_obj()
    tok = load_tokenizer("embedded:minilm")
    builder = ExampleBuilder(tok, FeatureStore(task_data["features"]), recipe.data)
    ctx = Context(recipe, Corpus(task_data["corpus"]), builder, tok)
    return {"recipe": recipe, "tok": tok, "ctx": ctx, "acc": Accelerator(cpu=True)}


def _setup(world: dict, name: str) -> tuple:
    from vlp_cli.data.datasets import Collator
    from vlp_cli.model import VLPModel

    recipe, ctx = world["recipe"], world["ctx"]
    task = TASKS[name].bind(recipe)
    task = task.bind(recipe, task.prepare(ctx))
    torch.manual_seed(0)
    model = VLPModel.from_text_encoder("random:tiny", 16, task.heads(ctx),
                                       vocab_size=len(world["tok"]))
    task.adapt_model(model)
    ds = task.dataset(ctx, "train", 0)
    batch = Collator(ctx.builder.pad_id, task.collate)([ds[i] for i in range(4)])
    return task, model, batch


@pytest.mark.parametrize("name", NAMES)
def test_inputs_step_and_gradients(world: dict, name: str) -> None:
    task, model, batch = _setup(world, name)
    b, t = batch["input_ids"].shape
    r = batch["img_feats"].shape[1]
    assert batch["token_type_ids"].shape == batch["text_mask"].shape == (b, t)
    assert batch["img_feats"].shape == (b, r, 16) and batch["img_mask"].shape == (b, r)
    assert batch["img_pos"].shape == (b, r, model.config.pos_dim)
    assert list(model.heads) == [h.name for h in task.heads(world["ctx"])]
    model.train()
    loss, stats = task.step(model, batch)
    assert torch.isfinite(loss) and "loss" in stats
    loss.backward()
    for head in task.heads(world["ctx"]):
        grads = [p.grad for p in model.heads[head.name].parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), head.name
    enc = model.bert.encoder.layer[0].attention.self.query.weight.grad
    assert enc is not None and enc.abs().sum() > 0
    if not task.uses_pooler:
        assert model.bert.pooler.dense.weight.grad is None  # frozen by the stages


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_give_identical_outputs(world: dict, name: str, tmp_path: Path) -> None:
    from vlp_cli.checkpoint import load_checkpoint, save_checkpoint

    task, model, batch = _setup(world, name)
    model.eval()
    save_checkpoint(tmp_path / "ck", model, world["tok"],
                    {"task": name, "tasks": {name: task.state}}, world["recipe"])
    again, _, meta = load_checkpoint(tmp_path / "ck")
    again.eval()
    with torch.no_grad():
        a, s1 = task.step(model, batch)
        b, s2 = task.step(again, batch)
    assert torch.equal(a, b)
    assert task.state_from_meta(meta) == task.state


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_returns_the_declared_metrics(world: dict, name: str) -> None:
    task, model, _ = _setup(world, name)
    model.eval()
    metrics, preds = task.evaluate(world["ctx"], model, "test", 3, world["acc"])
    assert set(task.metrics) <= set(metrics), (task.metrics, sorted(metrics))
    assert isinstance(preds, list)


def test_the_registry_gives_the_cli_its_choices() -> None:
    from typer.testing import CliRunner

    from vlp_cli.cli import app
    from vlp_cli.tasks import names

    out = CliRunner().invoke(app, ["finetune", "--help"]).output
    for n in names("finetune"):
        assert n in out
    res = CliRunner().invoke(app, ["finetune", "no-such-task", "-k", "x", "-c", "x", "-f", "x",
                                   "-o", "x"])
    assert res.exit_code == 1 and "choose one of" in res.output


def test_a_mixed_run_draws_one_task_per_step_by_ratio(world: dict, tmp_path: Path) -> None:
    """Two tasks in one run: each step runs one, drawn from (seed, step); statistics carry the
    task's name; the draw is the same in every run of the same seed."""
    import json

    from vlp_cli.config import TrainCfg
    from vlp_cli.data.datasets import Collator
    from vlp_cli.model import VLPModel
    from vlp_cli.training import TrainTask, train

    recipe, ctx = world["recipe"], world["ctx"]
    tasks = [TASKS[n].bind(recipe) for n in ("oscar", "retrieval")]
    tasks = [t.bind(recipe, t.prepare(ctx)) for t in tasks]
    heads = [h for t in tasks for h in t.heads(ctx)]
    cfg = TrainCfg(steps=12, batch_size=2, warmup_steps=1, eval_every=0, save_every=0,
                   save_minutes=0, log_every=1)

    def run(out: Path, c: TrainCfg = cfg, resume: object = None) -> tuple[list[dict], dict]:
        torch.manual_seed(0)
        model = VLPModel.from_text_encoder("random:tiny", 16, heads,
                                           vocab_size=len(world["tok"]))
        work = [TrainTask(t.name, t.dataset(ctx, "train", 0), Collator(ctx.builder.pad_id,
                          t.collate), t.step, ratio) for t, ratio in zip(tasks, (3.0, 1.0))]
        train(model, work, c, out, seed=7, identity={"stage": "test"}, cfg_key="x.train",
              resume_from=resume)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, {k: v.detach().clone() for k, v in model.state_dict().items()}

    rows, weights = run(tmp_path / "a")
    ran = ["oscar" if "oscar/loss" in r else "retrieval" for r in rows if r["split"] == "train"]
    assert len(ran) == 12 and set(ran) == {"oscar", "retrieval"}
    assert ran.count("oscar") > ran.count("retrieval")  # 3:1
    assert all("loss" not in r for r in rows)  # prefixed: oscar/loss, retrieval/loss
    again, _ = run(tmp_path / "b")
    assert ran == ["oscar" if "oscar/loss" in r else "retrieval" for r in again
                   if r["split"] == "train"]

    # Exact resume of a mixed run: saved at step 6, continued to 12, equal to the run above
    # (each task's position in its own data is part of the state; the draw needs none).
    import dataclasses
    import shutil

    from vlp_cli import runstate

    half = tmp_path / "half"
    run(half, dataclasses.replace(cfg, save_every=6, keep_states=5))
    for step, path in runstate.complete_states(half):
        if step > 6:
            shutil.rmtree(path)  # as if killed after the save at step 6
    state = runstate.check_resumable(half, {"stage": "test"})
    assert state is not None and state.trainer["step"] == 6
    assert [t for t in state.trainer["tasks"]] == ["oscar", "retrieval"]
    rows2, weights2 = run(half, cfg, state)
    assert [r for r in rows2 if r["split"] == "train"] == [
        {k: v for k, v in r.items() if k != "elapsed_s"} | {"elapsed_s": r2["elapsed_s"]}
        for r, r2 in zip([r for r in rows if r["split"] == "train"],
                         [r for r in rows2 if r["split"] == "train"])]
    for k in weights:
        assert torch.equal(weights[k], weights2[k]), k
