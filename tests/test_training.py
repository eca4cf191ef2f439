import json
from pathlib import Path

import pytest

from conftest import tiny_recipe_obj


def _run_pretrain(tiny_data: dict, out: Path, steps: int, resume: bool = False,
                  extra: list[str] | None = None) -> None:
    from conftest import tiny_recipe_sets
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import pretrain

    recipe = load_recipe("tiny", tiny_recipe_sets() + [f"pretrain.train.steps={steps}",
                                                       "pretrain.train.save_every=2",
                                                       *(extra or [])])
    pretrain.run(recipe, tiny_data["corpus"], tiny_data["features"], out, resume=resume)


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_writes_checkpoint_and_resumes(tiny_data: dict, tmp_path: Path) -> None:
    from vlp_cli import VlpError
    from vlp_cli.checkpoint import read_meta

    out = tmp_path / "pre"
    _run_pretrain(tiny_data, out, steps=2)
    meta = read_meta(out)
    assert meta["task"] == "pretrain" and meta["step"] == 2
    assert meta["features"]["feature_dim"] == 16
    assert (out / "state" / "step-00000002" / "manifest.json").is_file()
    with pytest.raises(VlpError, match="--resume"):
        _run_pretrain(tiny_data, out, steps=4)
    _run_pretrain(tiny_data, out, steps=4, resume=True)
    assert read_meta(out)["step"] == 4
    steps = [r["step"] for r in _records(out) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # continued, not restarted
    val = [r for r in _records(out) if r["split"] == "val"]
    assert val and {"mlm_acc", "contrast_acc", "loss"} <= set(val[-1])
    assert all(0 <= r["mlm_acc"] <= 1 for r in val)


def test_loss_goes_down_on_repeated_data(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "pre"
    _run_pretrain(tiny_data, out, steps=30,
                  extra=["pretrain.train.lr=2e-3", "pretrain.train.warmup_steps=3",
                         "pretrain.train.log_every=5", "pretrain.train.eval_every=0",
                         "pretrain.train.save_every=0"])
    losses = [r["loss"] for r in _records(out) if r["split"] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses  # from ln(30522) ~ 10.3 nats down


def test_oscar_plus_three_way(tiny_data: dict, tmp_path: Path) -> None:
    import json as _json

    out = tmp_path / "pre3"
    _run_pretrain(tiny_data, out, steps=2, extra=["oscar.caption_pollute_prob=0.25"])
    cfg = _json.loads((out / "config.json").read_text())
    assert {h["name"]: h["size"] for h in cfg["heads"]}["contrast"] == 3


def test_schedule_warmup_then_linear_decay() -> None:
    from vlp_cli.config import TrainCfg
    from vlp_cli.training import _schedule

    f = _schedule(TrainCfg(steps=10, warmup_steps=2))
    assert [round(f(s), 3) for s in range(11)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5,
                                                   0.375, 0.25, 0.125, 0.0]
    assert tiny_recipe_obj().pretrain.train.steps == 3


def test_same_seed_same_weights(tiny_data: dict, tmp_path: Path) -> None:
    """A recipe's seed fixes the run: new heads' initial values included (they are drawn
    when the model is built, before the training loop seeds itself)."""
    import torch
    from safetensors.torch import load_file

    from vlp_cli.config import load_recipe
    from vlp_cli.stages import finetune

    outs = []
    for name in ("a", "b"):
        pre = tmp_path / f"pre-{name}"
        _run_pretrain(tiny_data, pre, steps=2)
        torch.manual_seed(len(name) + ord(name))  # whatever ran before must not matter
        from conftest import tiny_recipe_sets

        recipe = load_recipe("tiny", tiny_recipe_sets() + ["vqa.train.steps=2"])
        vqa = tmp_path / f"vqa-{name}"
        finetune.run("vqa", pre, tiny_data["corpus"], tiny_data["features"], vqa, recipe)
        outs.append((load_file(pre / "model.safetensors"), load_file(vqa / "model.safetensors")))
    for a, b in zip(*outs):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluating_does_not_change_what_is_trained(tiny_data: dict, tmp_path: Path) -> None:
    """Held-out passes leave the global RNG (dropout's) alone: a run that evaluates every step
    trains the same weights as one that never does."""
    from safetensors.torch import load_file

    runs = {}
    for every in (1, 0):
        out = tmp_path / f"every{every}"
        _run_pretrain(tiny_data, out, steps=3,
                      extra=[f"pretrain.train.eval_every={every}", "pretrain.train.save_every=0",
                             "pretrain.train.eval_at_start=false"])
        runs[every] = load_file(out / "model.safetensors")
    val = {e: sum(r["split"] == "val" for r in _records(tmp_path / f"every{e}")) for e in runs}
    assert val[1] > val[0], val
    assert runs[1].keys() == runs[0].keys()
    for k in runs[0]:
        assert (runs[1][k] == runs[0][k]).all(), k


def test_head_lr_mult_gives_the_heads_their_own_learning_rate() -> None:
    """UNITER's VQA head learns 10x faster; without a multiplier the optimizer keeps the two
    groups (decay, no decay) that earlier versions saved, so their states resume."""
    from vlp_cli.config import TrainCfg
    from vlp_cli.model import HeadSpec, VLPModel
    from vlp_cli.training import _optimizer

    model = VLPModel.from_text_encoder("random:tiny", 16, [HeadSpec("vqa", "mlp", 5)],
                                       vocab_size=100)
    plain = _optimizer(model, TrainCfg(lr=1e-4))
    assert [g["lr"] for g in plain.param_groups] == [1e-4, 1e-4]
    opt = _optimizer(model, TrainCfg(lr=1e-4, head_lr_mult=10))
    heads = {id(p) for p in model.heads.parameters()}
    for g in opt.param_groups:
        inside = {id(p) in heads for p in g["params"]}
        assert len(inside) == 1  # a group is all heads or none
        assert g["lr"] == pytest.approx(1e-3 if inside.pop() else 1e-4)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
