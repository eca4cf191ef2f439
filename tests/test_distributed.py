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
