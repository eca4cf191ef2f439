"""UNITER's objectives: masking statistics, and each loss equal to a value computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LABELS, make_regions, tiny_recipe_obj
from vlp_cli.tasks import TASKS, Context


@pytest.fixture(scope="module")
def probs_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store whose regions carry class distributions (as a detector's do), and a corpus."""
    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.data.examples import ExampleBuilder
    from vlp_cli.stages import corpus
    from vlp_cli.stores.corpus import Corpus
    from vlp_cli.stores.features import FeatureStore, FeatureStoreWriter

    root = tmp_path_factory.mktemp("uniter")
    rng = np.random.default_rng(1)
    w = FeatureStoreWriter(root / "features", {"extractor": {"name": "synthetic"},
                                              "feature_dim": 16, "labels": LABELS})
    lines = []
    for i in range(12):
        w.put(f"i{i}", make_regions(rng, 5, 16, with_probs=True))
        lines.append({"image": f"i{i}", "caption": f"a thing number {i} with some words here",
                      "split": "train"})
    w.close()
    (root / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recipe = tiny_recipe_obj()
    corpus.run([str(root / "d.jsonl")], root / "features", root / "corpus", recipe)
    tok = load_tokenizer("embedded:minilm")
    builder = ExampleBuilder(tok, FeatureStore(root / "features"), recipe.data)
    return {"recipe": recipe, "tok": tok,
            "ctx": Context(recipe, Corpus(root / "corpus"), builder, tok)}


def _batch(world: dict, name: str, n: int = 6, recipe=None) -> tuple:
    from vlp_cli.data.datasets import Collator
    from vlp_cli.model import VLPModel

    recipe = recipe or world["recipe"]
    ctx = Context(recipe, world["ctx"].corpus, world["ctx"].builder, world["tok"])
    task = TASKS[name].bind(recipe)
    task = task.bind(recipe, task.prepare(ctx))
    ds = task.dataset(ctx, "train", 0)
    items = [ds[i] for i in range(n)]
    batch = Collator(ctx.builder.pad_id, task.collate)(items)
    torch.manual_seed(0)
    model = VLPModel.from_text_encoder("random:tiny", 16, task.heads(ctx),
                                       vocab_size=len(world["tok"]))
    model.eval()
    return task, model, batch, items


def test_conditional_masking_never_masks_both_and_rates_hold(probs_world: dict) -> None:
    """10,000 draws: the text objective masks words only, the region ones regions only; 15%
    +- 2 of the candidates; words split 80/10/10."""
    ctx, recipe = probs_world["ctx"], probs_world["recipe"]
    mask_id = ctx.builder.mask_id
    for name in ("mlm", "mrfr"):
        task = TASKS[name].bind(recipe)
        ds = task.dataset(ctx, "train", 0)
        cand = masked = 0
        kinds = [0, 0, 0]  # [MASK], random, kept
        for draw in range(10_000):
            ds.set_epoch(draw // len(ds))
            x = ds[draw % len(ds)]
            words = sum(1 for v in x["mlm_labels"] if v != -100)
            regions = int(x["region_masked"].sum())
            assert not (words and regions), "both modalities masked in one example"
            if name == "mlm":
                text = ctx.builder.text(ctx.corpus.get(int(ds.indices[draw % len(ds)]))
                                        ["segments"][0], [], recipe.data.max_text_len)
                cand += len(text.ids) - 2
                masked += words
                for p, label in enumerate(x["mlm_labels"]):
                    if label != -100:
                        kinds[0 if x["ids"][p] == mask_id else 2 if x["ids"][p] == label else 1] += 1
            else:
                cand += len(x["region_masked"]) - 1  # the whole-image region is never masked
                masked += regions
                assert not x["region_masked"][0]
        rate = masked / cand
        # "at least one per example" lifts the rate a little above 15% on short examples
        assert 0.13 <= rate <= 0.17 + 1.0 / (cand / 10_000), (name, rate)
        if name == "mlm":
            share = np.array(kinds) / sum(kinds)
            assert abs(share[0] - 0.8) < 0.02 and abs(share[1] - 0.1) < 0.02, share


def test_joint_masking_masks_both(probs_world: dict) -> None:
    from vlp_cli.config import load_recipe
    from conftest import tiny_recipe_sets

    recipe = load_recipe("tiny", tiny_recipe_sets() + ["pretrain.masking=joint"])
    ctx = Context(recipe, probs_world["ctx"].corpus, probs_world["ctx"].builder,
                  probs_world["tok"])
    ds = TASKS["mrc"].bind(recipe).dataset(ctx, "train", 0)
    both = sum(1 for i in range(len(ds)) if ds[i]["region_masked"].any()
               and any(v != -100 for v in ds[i]["mlm_labels"]))
    assert both == len(ds)


def test_mrfr_is_the_mean_squared_error_on_masked_regions_only(probs_world: dict) -> None:
    task, model, batch, items = _batch(probs_world, "mrfr")
    masked = batch["region_masked"]
    assert masked.any() and (batch["img_feats"][masked] == 0).all()  # zeroed inputs
    # The targets are the original features of exactly the masked regions.
    want = torch.cat([torch.from_numpy(x["feats"][x["region_masked"]].astype(np.float32))
                      for x in items])
    assert torch.equal(batch["feat_targets"], want)
    loss, stats = task.step(model, batch)
    hidden = model(*(batch[k] for k in ("input_ids", "token_type_ids", "text_mask",
                                        "img_feats", "img_pos", "img_mask")))
    t = batch["input_ids"].shape[1]
    head = model.heads["mrfr"]
    h = head.norm(head.act(head.dense(hidden[:, t:][masked])))
    pred = h @ model.img_embed.feat_linear.weight + head.bias  # tied to the image Linear
    assert torch.allclose(loss, ((pred - want) ** 2).mean(), atol=1e-6)
    assert pred.shape[0] == int(masked.sum()) < int(batch["img_mask"].sum())
    s, n = stats["mrfr_l2"]
    assert torch.allclose(s / n, ((pred - want) ** 2).mean(), atol=1e-6)  # per feature
    # No masked region in a batch: a zero loss, not NaN.
    empty = {k: v.clone() for k, v in batch.items()}
    empty["region_masked"][:] = False
    empty["feat_targets"] = batch["feat_targets"][:0]
    loss0, _ = task.step(model, empty)
    assert loss0.item() == 0.0


def test_mrc_kl_is_kl_of_the_detector_to_the_model(probs_world: dict) -> None:
    task, model, batch, items = _batch(probs_world, "mrckl")
    soft = batch["soft_targets"]
    assert soft.shape == (int(batch["region_masked"].sum()), len(LABELS))
    assert torch.allclose(soft.sum(-1), torch.ones(len(soft)), atol=2e-3)
    loss, stats = task.step(model, batch)
    hidden = model(*(batch[k] for k in ("input_ids", "token_type_ids", "text_mask",
                                        "img_feats", "img_pos", "img_mask")))
    logits = model.region_outputs("region_cls", hidden, batch["region_masked"])
    q = torch.softmax(logits, -1)
    p = soft
    by_hand = (p * (torch.log(p) - torch.log(q))).sum(-1)  # KL(p || q) per region
    assert torch.allclose(loss, by_hand.mean() / len(LABELS), atol=1e-6)  # UNITER: mean
    s, n = stats["mrckl_kl"]
    assert torch.allclose(s / n, by_hand.mean(), atol=1e-5)
    # MRC targets the top class of the same distribution (the stored class id).
    _, _, batch_c, _ = _batch(probs_world, "mrc")
    assert (batch_c["region_targets"] >= 0).all()


def test_mrc_is_cross_entropy_to_the_detector_class(probs_world: dict) -> None:
    task, model, batch, items = _batch(probs_world, "mrc")
    loss, stats = task.step(model, batch)
    hidden = model(*(batch[k] for k in ("input_ids", "token_type_ids", "text_mask",
                                        "img_feats", "img_pos", "img_mask")))
    logits = model.region_outputs("region_cls", hidden, batch["region_masked"])
    target = torch.cat([torch.from_numpy(x["region_classes"][x["region_masked"]])
                        for x in items])
    by_hand = -torch.log_softmax(logits, -1)[torch.arange(len(target)), target].mean()
    assert torch.allclose(loss, by_hand, atol=1e-6)


def test_region_classes_are_scored_within_their_own_store(probs_world: dict) -> None:
    """In a label space that is a union of several stores' (another detector's "bird" here),
    MRC and MRC-kl score a region among its own store's classes only: the loss is the one
    computed by hand over those classes, and no prediction is a class the store lacks."""
    from vlp_cli.data.datasets import Collator
    from vlp_cli.model import VLPModel

    world, recipe = probs_world, probs_world["recipe"]
    union = ["bird", *LABELS]
    ctx = Context(recipe, world["ctx"].corpus, world["ctx"].builder, world["tok"], union)
    for name in ("mrc", "mrckl"):
        task = TASKS[name].bind(recipe)
        task = task.bind(recipe, task.prepare(ctx))
        assert task.labels(ctx) == union
        ds = task.dataset(ctx, "train", 0)
        items = [ds[i] for i in range(6)]
        batch = Collator(ctx.builder.pad_id, task.collate)(items)
        assert batch["label_space"].tolist() == [False, True, True, True]
        torch.manual_seed(0)
        model = VLPModel.from_text_encoder("random:tiny", 16, task.heads(ctx),
                                           vocab_size=len(world["tok"]))
        model.eval()
        with torch.no_grad():
            model.heads["region_cls"][-1].bias[0] = 50.0  # "bird" would win every region
        loss, stats = task.step(model, batch)
        hidden = model(*(batch[k] for k in ("input_ids", "token_type_ids", "text_mask",
                                            "img_feats", "img_pos", "img_mask")))
        own = model.region_outputs("region_cls", hidden, batch["region_masked"])[:, 1:]
        if name == "mrc":
            target = batch["region_targets"] - 1
            by_hand = -torch.log_softmax(own, -1)[torch.arange(len(target)), target].mean()
        else:
            p = batch["soft_targets"][:, 1:]
            by_hand = (p * (torch.log(p) - torch.log_softmax(own, -1))).sum(-1).mean() / 4
        assert torch.allclose(loss, by_hand, atol=1e-5), name
        assert stats["mrc_acc"][0] == (own.argmax(-1) == (
            batch["region_targets"] - 1 if name == "mrc"
            else batch["soft_targets"].argmax(-1) - 1)).sum()


def test_each_corpus_runs_its_own_objectives(probs_world: dict, tiny_data: dict,
                                             tmp_path: Path) -> None:
    """pretrain.corpora entries without directories describe the command line's corpora in
    order (UNITER's per-dataset tasks and mix ratios): a stream exists only for an objective
    its corpus names; mistakes in the entries are one line each."""
    from vlp_cli import VlpError
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import pretrain
    from conftest import tiny_recipe_sets

    root = probs_world["ctx"].corpus.path.parent
    corpora = [tiny_data["corpus"], root / "corpus"]
    feats = [tiny_data["features"], root / "features"]
    base = tiny_recipe_sets() + ["pretrain.tasks={oscar: 1, mlm: 1, mrc: 1}",
                                 "pretrain.train.steps=4", "pretrain.train.eval_every=4"]
    sets = base + ["pretrain.corpora=[{tasks: {oscar: 2}, ratio: 3}, {tasks: {mlm: 1, mrc: 1}}]"]
    pretrain.run(load_recipe("tiny", sets), corpora, feats, tmp_path / "a")
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    names = {k.split("/")[0] for r in rows if r["split"] == "val" for k in r if "/" in k}
    assert names == {"oscar@corpus0", "mlm@corpus1", "mrc@corpus1"}, names
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert [(c["ratio"], c["mix"]) for c in meta["corpora"]] == [
        (3.0, {"oscar": 2.0}), (1.0, {"mlm": 1.0, "mrc": 1.0})]
    with pytest.raises(VlpError, match=r"corpora\[1\]\.tasks\.itm.*itm is not one"):
        load_recipe("tiny", base + ["pretrain.corpora=[{tasks: {oscar: 1}}, {tasks: {itm: 1}}]"])
    with pytest.raises(VlpError, match="every entry its directories, or none"):
        load_recipe("tiny", base + ["pretrain.corpora=[{corpus: a, features: b}, {ratio: 2}]"])
    with pytest.raises(VlpError, match=r"corpora\[0\]\.tasks\.nope': a corpus picks"):
        load_recipe("tiny", base + ["pretrain.corpora=[{tasks: {nope: 1}}]"])
    with pytest.raises(VlpError, match="mrc runs on no corpus"):
        load_recipe("tiny", base + ["pretrain.corpora=[{tasks: {oscar: 1}}, {tasks: {mlm: 1}}]"])
    with pytest.raises(VlpError, match="pretrain.corpora=\\[\\]"):
        load_recipe("tiny-mixed", ["pretrain.corpora=[{tasks: {mlm: 1}}]",
                                    "pretrain.tasks={oscar: 1}"])
    with pytest.raises(VlpError, match="no corpus"):
        pretrain.run(load_recipe("tiny", sets), None, None, tmp_path / "c")
    # One corpus given where the recipe describes two: the objectives of the second only
    # are left out (with a warning), the first corpus's run.
    pretrain.run(load_recipe("tiny", sets), corpora[:1], feats[:1], tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert list(meta["tasks"]) == ["oscar"] and meta["mix"] == {"oscar": 2.0}


def test_labels_of_several_stores_map_into_one_space() -> None:
    from vlp_cli.tasks.masking import label_map

    m = label_map(["dog", "cat"], ["cat", "bird", "dog"])
    assert m.tolist() == [2, 0, -1]  # the last entry maps class -1 (no class)


def test_every_objective_mixed_on_two_corpora_trains_and_resumes(
        probs_world: dict, tiny_data: dict, tmp_path: Path) -> None:
    """Oscar's and UNITER's objectives mixed on two corpora (each with its own store): every
    (objective, corpus) stream runs, held-out statistics per stream, and a run stopped after a
    save and resumed ends with the same weights as one that ran straight through."""
    from safetensors.torch import load_file

    from vlp_cli.config import load_recipe
    from vlp_cli.stages import pretrain
    from conftest import tiny_recipe_sets

    root = probs_world["ctx"].corpus.path.parent
    mix = "pretrain.tasks={oscar: 1, mlm: 1, mrfr: 1, mrc: 1, mrckl: 1, itm: 1}"
    sets = tiny_recipe_sets() + [mix, "pretrain.train.steps=12", "pretrain.train.eval_every=6",
                                 "pretrain.train.save_every=6", "itm.ot_iters=5"]
    recipe = load_recipe("tiny", sets)
    corpora = [tiny_data["corpus"], root / "corpus"]
    feats = [tiny_data["features"], root / "features"]
    pretrain.run(recipe, corpora, feats, tmp_path / "a")
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    names = {k.split("/")[0] for r in rows for k in r if "/" in k}
    for obj in ("oscar", "mlm", "mrfr", "mrc", "mrckl", "itm"):
        assert any(n.startswith(obj + "@") for n in names), (obj, names)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert len(meta["corpora"]) == 2 and meta["tasks"]["mrc"]["labels"] == LABELS
    # Saved at step 6, the later states removed (as if killed then), resumed to 12: the same
    # weights as the run that went straight through.
    import shutil

    from vlp_cli import runstate

    half = load_recipe("tiny", sets + ["pretrain.train.keep_states=5"])
    pretrain.run(half, corpora, feats, tmp_path / "b")
    for step, path in runstate.complete_states(tmp_path / "b"):
        if step > 6:
            shutil.rmtree(path)
    pretrain.run(half, corpora, feats, tmp_path / "b", resume=True)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_on_the_cpu_gradient_checkpointing_and_a_tracker(probs_world: dict,
                                                               tmp_path: Path) -> None:
    """bf16 autocast on the CPU trains every objective with finite losses; gradient
    checkpointing gives the gradients of the plain run; metrics rows reach TensorBoard."""
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import pretrain
    from conftest import tiny_recipe_sets

    mix = "pretrain.tasks={mlm: 1, mrfr: 1, mrc: 1, mrckl: 1, itm: 1}"
    root = probs_world["ctx"].corpus.path.parent
    recipe = load_recipe("tiny", tiny_recipe_sets() + [
        mix, "pretrain.train.steps=6", "pretrain.train.mixed_precision=bf16",
        "pretrain.train.trackers=[tensorboard]", "model.gradient_checkpointing=true"])
    from accelerate.state import AcceleratorState

    # One process, one Accelerate state: earlier tests made theirs in fp32 (a CLI run is a
    # process of its own).
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        pretrain.run(recipe, root / "corpus", root / "features", tmp_path / "bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    rows = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in rows for k, v in r.items() if k.endswith("/loss")]
    assert len(losses) >= 6 and all(np.isfinite(losses))
    assert list((tmp_path / "bf16" / "trackers").rglob("events.out.tfevents.*"))

    # Gradient checkpointing: same loss and gradients as without (dropout off to compare).
    task, model, batch, _ = _batch(probs_world, "mrfr")
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    loss, _ = task.step(model, batch)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_checkpointing()
    assert model.bert.is_gradient_checkpointing
    loss2, _ = task.step(model, batch)
    loss2.backward()
    assert torch.allclose(loss, loss2)
    for n, p in model.named_parameters():
        if n in plain:
            assert torch.allclose(plain[n], p.grad, atol=1e-6), n


def test_oscar_image_embedder_saves_and_reloads(probs_world: dict, tmp_path: Path) -> None:
    """Oscar's embedder (one Linear over features + 6 position numbers, no region type
    embedding) through a checkpoint, and MRFR tied to its feature columns."""
    from vlp_cli.checkpoint import load_checkpoint, save_checkpoint
    from vlp_cli.model import HeadSpec, OscarImageEmbeddings, VLPModel

    m = VLPModel.from_text_encoder("random:tiny", 16, [HeadSpec("mrfr", "features", 16)],
                                   vocab_size=len(probs_world["tok"]), pos_dim=6,
                                   image_embedder="oscar", seed=0)
    assert isinstance(m.img_embed, OscarImageEmbeddings)
    assert m.img_embed.linear.weight.shape[1] == 16 + 6
    assert m.img_embed.feature_weight().data_ptr() == m.img_embed.linear.weight.data_ptr()
    save_checkpoint(tmp_path / "ck", m, probs_world["tok"], {"task": "pretrain",
                                                             "tasks": {"mrfr": {}}},
                    probs_world["recipe"])
    again, _, _ = load_checkpoint(tmp_path / "ck")
    assert again.config.image_embedder == "oscar"
    for (n, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_region_classes_from_a_store_without_classes_is_one_line(tmp_path: Path) -> None:
    """MRC on a store that names no classes (grid boxes): one line naming the store and the
    way out, not a traceback."""
    from vlp_cli import VlpError
    from vlp_cli.stages import corpus, pretrain
    from vlp_cli.stores.features import FeatureStoreWriter

    rng = np.random.default_rng(3)
    w = FeatureStoreWriter(tmp_path / "f", {"extractor": {"name": "grid"}, "feature_dim": 16,
                                            "labels": []})
    lines = []
    for i in range(8):
        r = make_regions(rng, 4, 16)
        r.class_ids[:] = -1
        w.put(f"g{i}", r)
        lines.append({"image": f"g{i}", "caption": f"a grid of things {i}", "split": "train"})
    w.close()
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recipe = tiny_recipe_obj()
    corpus.run([str(tmp_path / "d.jsonl")], tmp_path / "f", tmp_path / "c", recipe)
    from vlp_cli.config import load_recipe
    from conftest import tiny_recipe_sets

    for name in ("mrc", "mrckl"):
        sets = tiny_recipe_sets() + [f"pretrain.tasks={{mlm: 1, {name}: 1}}"]
        with pytest.raises(VlpError, match=rf"{name} classifies regions, but feature store "
                                           rf".*names no region classes.*take {name} out"):
            pretrain.run(load_recipe("tiny", sets), [tmp_path / "c"], [tmp_path / "f"],
                         tmp_path / f"o-{name}")
        assert not (tmp_path / f"o-{name}" / "model.safetensors").exists()
    # MRFR needs no classes: it regresses the features.
    sets = tiny_recipe_sets() + ["pretrain.tasks={mrfr: 1}"]
    pretrain.run(load_recipe("tiny", sets), [tmp_path / "c"], [tmp_path / "f"], tmp_path / "m")


def test_a_run_identity_without_per_corpus_objectives_reads_as_0_4_0_wrote_it() -> None:
    """Runs that 0.4.0 started with pretrain.corpora (before entries had `tasks`) resume."""
    from vlp_cli.config import load_recipe
    from vlp_cli.stages.common import run_identity
    from conftest import tiny_recipe_sets

    sets = tiny_recipe_sets() + ["pretrain.corpora=[{corpus: a, features: b, ratio: 2}]"]
    ident = run_identity("pretrain", "x", load_recipe("tiny", sets), ["pretrain"], {})
    assert ident["recipe"]["pretrain"]["corpora"] == [{"corpus": "a", "features": "b",
                                                       "ratio": 2.0}]
    sets[-1] = "pretrain.corpora=[{corpus: a, features: b, tasks: {oscar: 1}}]"
    ident = run_identity("pretrain", "x", load_recipe("tiny", sets), ["pretrain"], {})
    assert ident["recipe"]["pretrain"]["corpora"][0]["tasks"] == {"oscar": 1.0}
