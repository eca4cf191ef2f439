"""Several processes through `accelerate launch` on the CPU (gloo): extraction shards and
data-parallel training. Slow: each launch starts fresh interpreters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_recipe_sets

pytestmark = pytest.mark.slow


def launch(*args: str | Path, procs: int = 2) -> None:
    # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs the
    # processes form a gloo group on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(procs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
           "no", "-m", "vlp_cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_extraction_on_two_processes_writes_two_shards(tmp_path: Path) -> None:
    from vlp_cli.readers.easyvqa import data_root as easy_vqa_root
    from vlp_cli.stores.features import FeatureStore

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(9):
        shutil.copy(easy_vqa_root() / "train" / "images" / f"{i}.png", imgs / f"{i}.png")
    launch("extract-features", imgs, "-o", tmp_path / "f", "--set", "extract.detector=grid",
           "--set", "extract.min_size=64")
    shards = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert shards == ["shard-00000-of-00002", "shard-00001-of-00002"]
    store = FeatureStore(tmp_path / "f")
    assert sorted(store.keys()) == sorted(f"{i}.png" for i in range(9))


def test_pretraining_on_two_processes(tiny_data: dict, tmp_path: Path) -> None:
    sets = []
    for s in tiny_recipe_sets() + ["pretrain.train.steps=4", "pretrain.train.save_every=2"]:
        sets += ["--set", s]
    out = tmp_path / "pre"
    launch("pretrain", "recipes/tiny.yaml", "-c", tiny_data["corpus"], "-f",
           tiny_data["features"], "-o", out, *sets)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["step"] == 4
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # One log line per step (main process only), not one per process.
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    # Resume on two processes continues from the saved state.
    launch("pretrain", "recipes/tiny.yaml", "-c", tiny_data["corpus"], "-f",
           tiny_data["features"], "-o", out, "--resume", *sets[:-2],
           "--set", "pretrain.train.steps=6")
    assert json.loads((out / "meta.json").read_text())["step"] == 6
    # ...and on one process: it works, and says the result will differ.
    res = subprocess.run([sys.executable, "-m", "vlp_cli", "pretrain", "recipes/tiny.yaml", "-c",
                          str(tiny_data["corpus"]), "-f", str(tiny_data["features"]), "-o",
                          str(out), "--resume", *sets[:-2], "--set", "pretrain.train.steps=8"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming a 2-process run on 1 processes" in " ".join(res.stderr.split())
    assert json.loads((out / "meta.json").read_text())["step"] == 8


def test_two_processes_evaluate_each_example_once_with_the_same_scores(
        tiny_data: dict, tmp_path: Path) -> None:
    """Scoring split over two processes and gathered: every example once, in order, with the
    scores one process gives (7 examples in batches of 2: the last batch is uneven)."""
    worker = Path(__file__).parent / "eval_worker.py"
    args = [tiny_data["corpus"], tiny_data["features"], 7]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(worker), *map(str, args), str(tmp_path / "1.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(worker), *map(str, args), str(tmp_path / "2.json")]
    two = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "1.json").read_text())
    r2 = json.loads((tmp_path / "2.json").read_text())
    assert r1["processes"] == 1 and r2["processes"] == 2
    want = r1["indices"]
    assert len(want) == 7
    for r in (r1, r2):
        assert [int(row[0]) for row in r["rows"]] == want  # each once, in dataset order
    for a, b in zip(r1["rows"], r2["rows"]):
        assert abs(a[1] - b[1]) <= 1e-5


def test_vlp_evaluate_on_two_processes(tiny_data: dict, tmp_path: Path) -> None:
    """`vlp evaluate` under accelerate launch: one folder of results, each question once."""
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import finetune, pretrain

    recipe = load_recipe("tiny", tiny_recipe_sets() + ["pretrain.train.steps=1",
                                                       "vqa.train.steps=1"])
    pretrain.run(recipe, tiny_data["corpus"], tiny_data["features"], tmp_path / "pre")
    finetune.run("vqa", tmp_path / "pre", tiny_data["corpus"], tiny_data["features"],
                 tmp_path / "vqa", recipe)
    common = ["evaluate", "vqa", "-k", tmp_path / "vqa", "-c", tiny_data["corpus"], "-f",
              tiny_data["features"]]
    launch(*common, "-o", tmp_path / "e2")
    res = subprocess.run([sys.executable, "-m", "vlp_cli", *map(str, common), "-o",
                          str(tmp_path / "e1")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    p1, p2 = ([json.loads(x) for x in (tmp_path / e / "predictions.jsonl").read_text()
               .splitlines()] for e in ("e1", "e2"))
    assert [p["qid"] for p in p1] == [p["qid"] for p in p2]
    assert len({p["qid"] for p in p2}) == len(p2)
    m1, m2 = (json.loads((tmp_path / e / "metrics.json").read_text()) for e in ("e1", "e2"))
    assert m1["questions"] == m2["questions"] == len(p1)
    # A pre-training objective's statistics with one example: the second process has none,
    # and still reduces the same statistics as the first (before: mismatched keys).
    launch("evaluate", "oscar", "-k", tmp_path / "pre", "-c", tiny_data["corpus"], "-f",
           tiny_data["features"], "--limit", "1", "-o", tmp_path / "e3")
    m3 = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert {"loss", "mlm_loss", "contrast_acc", "region_spread"} <= set(m3), m3



def _train_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_two_processes_follow_one_process_with_twice_the_batch(tiny_data: dict,
                                                               tmp_path: Path) -> None:
    """2 processes x batch 2 give the per-step losses and final weights of 1 process x batch 4.

    Step k of rank r takes batch 2k+r of the epoch's permutation (streams.EpochBatches), so the
    two ranks together see exactly the 1-process batch k, and each example's masking comes
    from (seed, epoch, index): the same inputs. Two things would still make the runs differ
    beyond rounding, and the recipe here removes both:
    - dropout (other RNG streams, other tensor shapes): off (model.img_dropout=0, and
      train_worker.py turns off the tiny BERT's);
    - DDP averages per-process mean losses, one process takes the mean over all masked tokens:
      the two differ when the processes hold different numbers of masked tokens.
      oscar.mask_prob=0 masks exactly one token per example (mask_tokens' at_least_one), so
      both processes hold 2 and the objectives (and their gradients) are the same function.
    What is left is float32 summation order (other batch shapes, the gradient all-reduce).
    Measured over 8 steps (14 examples: 3 steps an epoch, so two epoch boundaries): losses at
    most 1.7e-7 apart (relative; most steps bit-equal), final weights 7e-8 (relative norm of
    the difference; largest element 1.3e-6, lr 2e-4). The tolerance, 1e-5, leaves room for
    other CPUs' rounding; what it guards against is far above it: both ranks on the same batch
    moves mlm_loss by 7.5e-3 at step 1 and the weights by 1.1e-2. For comparison, with the
    tiny recipe's own dropout and masking the losses differ by up to 8e-3 and the weights by
    1e-2 (dropout), and without dropout but with mask_prob 0.15 the logged loss by up to 1.9e-3
    (the per-process mean; mlm_loss and contrast_loss, reduced as sums, by 5e-5).
    """
    import torch
    from safetensors.torch import load_file

    tol = 1e-5
    worker = Path(__file__).parent / "train_worker.py"
    steps, b = 8, 2
    sets = tiny_recipe_sets() + [f"pretrain.train.steps={steps}", "pretrain.train.eval_every=0",
                                 "pretrain.train.save_every=0", "pretrain.train.save_minutes=0",
                                 "model.img_dropout=0", "oscar.mask_prob=0"]
    args = [str(worker), "pretrain", "recipes/tiny.yaml", "-c", str(tiny_data["corpus"]), "-f",
            str(tiny_data["features"]), *(f for s in sets for f in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args,
         "-o", str(tmp_path / "two"), "--set", f"pretrain.train.batch_size={b}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args, "-o", str(tmp_path / "one"), "--set",
                          f"pretrain.train.batch_size={2 * b}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    r1, r2 = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == list(range(1, steps + 1))
    for x, y in zip(r1, r2):
        assert x["lr"] == y["lr"]
        for k in ("loss", "mlm_loss", "contrast_loss"):
            assert abs(x[k] - y[k]) <= tol * abs(x[k]), (x["step"], k, x[k], y[k])
    w1 = load_file(str(tmp_path / "one" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    diff = torch.cat([(w1[k] - w2[k]).flatten() for k in w1]).norm()
    assert diff <= tol * torch.cat([w.flatten() for w in w1.values()]).norm()
