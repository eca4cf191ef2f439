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
