"""Length-bucketed batches (UNITER's input-unit budget): the sampler, the datasets' lengths,
the recipe keys, and an exact resume of a run batched by units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_recipe_obj
from vlp_cli import VlpError
from vlp_cli.data.buckets import BucketBatches, bucket_batches
from vlp_cli.tasks import TASKS, Context


def _lengths(n: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(8, 35, n) + rng.integers(10, 51, n)


def test_every_example_once_within_the_budget_in_multiples_of_8() -> None:
    lengths = _lengths()
    batches = bucket_batches(lengths, 1024, 256, np.random.default_rng(3))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert lengths[b].max() * len(b) <= 1024
    # Every batch but each bucket's last holds a multiple of 8 (4 buckets of 256 here).
    assert sum(len(b) % 8 != 0 for b in batches) <= 4
    # Sorted buckets: little padding, far less than random batches of the same mean size.
    pad = sum(lengths[b].max() * len(b) - lengths[b].sum() for b in batches) / \
        sum(lengths[b].max() * len(b) for b in batches)
    assert pad < 0.05


def test_one_example_over_a_tiny_budget_and_the_longest_example_checked() -> None:
    lengths = np.array([5, 9, 7])
    batches = bucket_batches(lengths, 10, 8, np.random.default_rng(0))
    assert sorted(len(b) for b in batches) == [1, 1, 1]
    with pytest.raises(ValueError, match="9 input units"):
        BucketBatches(lengths, 8, 0, 0, 1, 1)


def test_ranks_take_distinct_batches_the_same_number_and_resume_mid_epoch() -> None:
    lengths = _lengths(700)
    world, accum = 3, 2
    samplers = [BucketBatches(lengths, 600, 5, r, world, accum, bucket_size=128)
                for r in range(world)]
    for epoch in (0, 1):
        per = set()
        got = []
        for s in samplers:
            s.set_position(epoch, 0)
            per.add(s.per_rank)
            got.append(list(s))
            assert len(got[-1]) == s.per_rank == len(s)
        assert len(per) == 1 and per.pop() % accum == 0
        flat = [i for batches in got for b in batches for i in b]
        assert len(flat) == len(set(flat))  # no example twice in an epoch
    s = samplers[1]
    s.set_position(1, 0)
    whole = list(s)
    s.set_position(1, 4)
    assert list(s) == whole[4:] and len(s) == len(whole) - 4
    # The order depends on (seed, epoch) alone: a new sampler gives the same batches.
    again = BucketBatches(lengths, 600, 5, 1, world, accum, bucket_size=128)
    again.set_position(1, 0)
    assert list(again) == whole
    s.set_position(0, 0)
    assert list(s) != whole


# Tasks whose kinds only the task corpus has (readers of released formats); the others keep
# the draws of the tiny corpus their bounds were checked on.
RELEASED_ONLY = ("nlvr2", "snli-ve", "refcoco", "vcr")


@pytest.fixture(scope="module")
def contexts(tiny_data: dict, task_data: dict) -> dict[str, Context]:
    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.data.examples import ExampleBuilder
    from vlp_cli.stores.corpus import Corpus
    from vlp_cli.stores.features import FeatureStore

    recipe = tiny_recipe_obj()
    tok = load_tokenizer("embedded:minilm")
    return {k: Context(recipe, Corpus(d["corpus"]), ExampleBuilder(
        tok, FeatureStore(d["features"]), recipe.data), tok)
        for k, d in (("tiny", tiny_data), ("tasks", task_data))}


@pytest.fixture
def ctx(contexts: dict[str, Context], name: str) -> Context:
    return contexts["tasks" if name in RELEASED_ONLY else "tiny"]


@pytest.mark.parametrize("name", list(TASKS))
def test_dataset_lengths_are_the_items_lengths(ctx: Context, name: str) -> None:
    """Exact where an item is its example as stored; a bound, never exceeded in two epochs,
    where a task may take a part from another example (Oscar's polluted tags, ITM's and a
    retrieval negative's other image), so that `max_units` is a hard limit."""
    task = TASKS[name].bind(ctx.recipe)
    task = task.bind(ctx.recipe, task.prepare(ctx))
    ds = task.dataset(ctx, "train", 0)
    lengths = ds.lengths()
    assert lengths.shape == (len(ds),) and lengths.dtype.kind == "i" and (lengths > 0).all()
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        actual = []
        for i in range(len(ds)):
            item = ds[i]
            members = item if isinstance(item, list) else [item]
            actual.append(sum(len(x["ids"]) + len(x["feats"]) for x in members))
        actual = np.array(actual)
        if name in ("vqa", "gqa", "captioning", "mlm", "mrfr", "mrc", "mrckl", "snli-ve",
                    "refcoco"):
            np.testing.assert_array_equal(lengths, actual)
        else:
            assert (actual <= lengths).all(), name
            if name != "retrieval":  # its negative's part: the dataset's largest, twice
                assert np.abs(lengths - actual).mean() <= 0.25 * actual.mean()


@pytest.mark.parametrize("name", list(TASKS))
def test_a_batch_by_units_never_pads_past_max_units(ctx: Context, name: str) -> None:
    """Text and regions are padded separately (and a retrieval item is two sequences), so the
    budget holds for count x (longest text + most regions), over two epochs of draws."""
    from vlp_cli.data.datasets import Collator

    task = TASKS[name].bind(ctx.recipe)
    task = task.bind(ctx.recipe, task.prepare(ctx))
    ds = task.dataset(ctx, "train", 0)
    units = ds.units()
    budget = int(units.sum(1).max()) * 3
    collate = Collator(ctx.builder.pad_id, task.collate)
    sizes = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for b in bucket_batches(units, budget, 64, np.random.default_rng(epoch)):
            batch = collate([ds[int(i)] for i in b])
            rows, text = batch["input_ids"].shape
            padded = rows * (text + batch["img_feats"].shape[1])
            assert padded <= budget, (name, len(b), padded, budget)
            sizes.append(len(b))
    assert max(sizes) > 1


def test_recipe_keys_and_their_one_line_errors() -> None:
    from vlp_cli.config import load_recipe

    r = load_recipe("tiny", ["pretrain.train.batching=units", "pretrain.train.max_units=4096"])
    assert (r.pretrain.train.batching, r.pretrain.train.max_units,
            r.pretrain.train.bucket_size) == ("units", 4096, 8192)
    with pytest.raises(VlpError, match="'pretrain.train.batching' must be one of fixed, units"):
        load_recipe("tiny", ["pretrain.train.batching=tokens"])
    with pytest.raises(VlpError, match="'vqa.train.max_units' .* at least one example"):
        load_recipe("tiny", ["vqa.train.batching=units", "vqa.train.max_units=4"])


def _pretrain(tiny_data: dict, out: Path, extra: list[str] = (), **kw: object) -> None:
    from conftest import tiny_recipe_sets
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import pretrain

    recipe = load_recipe("tiny", tiny_recipe_sets() + [
        "pretrain.train.steps=12", "pretrain.train.save_every=0", "pretrain.train.log_every=1",
        "pretrain.train.eval_every=0", "pretrain.train.batching=units",
        "pretrain.train.max_units=40", *extra])
    pretrain.run(recipe, tiny_data["corpus"], tiny_data["features"], out, **kw)


def test_a_run_batched_by_units_resumes_exactly(tiny_data: dict, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from test_resume import _signal_at
    from vlp_cli.training import Interrupted

    ref = tmp_path / "ref"
    _pretrain(tiny_data, ref)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        # 8 batches an epoch here (of 1 or 2 examples): saved at step 10, in the second epoch.
        _signal_at(m, "step:mid", 9)
        with pytest.raises(Interrupted, match="at step 10"):
            _pretrain(tiny_data, out)
    _pretrain(tiny_data, out, resume=True)
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}
             for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, out)]
    assert rows[0] == rows[1] and len([r for r in rows[1] if r["split"] == "train"]) == 12
    with pytest.raises(VlpError, match="pretrain.train.max_units \\(10\\) is less than the "
                                       "longest oscar example"):
        _pretrain(tiny_data, tmp_path / "small", ["pretrain.train.max_units=10"])


def test_parts_padded_separately_are_budgeted_by_their_maxima() -> None:
    """Long texts with few regions and short texts with many have the same total, but a batch
    mixing them pads both parts: the budget counts count x (max text + max regions)."""
    parts = np.array([[30, 2], [2, 30]] * 40)
    for b in bucket_batches(parts, 320, 80, np.random.default_rng(0)):
        padded = len(b) * parts[b].max(0).sum()
        assert padded <= 320, (len(b), padded)
    # The total alone would put eight in a batch (8 x 32 <= 320, a multiple of 8) and pad
    # it to 8 x 60 = 480.
    assert max(len(b) for b in bucket_batches(parts.sum(1), 320, 80,
                                             np.random.default_rng(0))) == 8


def test_parts_are_sorted_as_a_snake_so_neighbours_are_close_in_both() -> None:
    """Two parts: by the one of wider range, descending, then the other up and down in turn;
    on COCO-like lengths that pads less than a third of what sorting by the total pads."""
    from vlp_cli.benches.padding import coco_like, padded_fraction
    from vlp_cli.data.buckets import snake_order

    parts = np.array([[1, 5], [2, 5], [3, 4], [1, 4], [9, 3], [3, 5]])
    # part 0 has the wider range: 9 (down) | 3 (rest 4, 5: up) | 2 (down) | 1 (rest 4, 5: up)
    assert snake_order(parts).tolist() == [4, 2, 5, 1, 3, 0]
    assert snake_order(parts[:, :1]).tolist() == [4, 2, 5, 1, 0, 3]  # one part: stable
    text, regions = coco_like(8000)
    both = np.stack([text, regions], 1)
    budget = int(round(128 * float((text + regions).mean())))
    ours = padded_fraction(text, regions, bucket_batches(both, budget, 8192,
                                                         np.random.default_rng(0)))
    by_total = padded_fraction(text, regions, bucket_batches(
        np.stack([text + regions], 1), budget, 8192, np.random.default_rng(0)))
    assert ours < by_total / 3, (ours, by_total)
