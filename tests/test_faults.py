"""Runs killed with SIGKILL at named moments, then resumed: bit-equal to uninterrupted runs.

Each kill is a real SIGKILL in a subprocess (`VLP_FAULT=NAME[@N]`, faults.py): before, inside
and after each file of a state save and of a checkpoint save, mid-step, mid-epoch and at an
epoch boundary, plus kills at random moments. The resumed run must give the same final
weights and the same metrics rows, each step once, as a run never interrupted, and leave no
temporary files. Slow: every run starts a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe_sets

pytestmark = pytest.mark.slow

STEPS = 8
SETS = tiny_recipe_sets()
for _t in ("pretrain", "vqa"):
    SETS += [f"{_t}.train.steps={STEPS}", f"{_t}.train.save_every=3",
             f"{_t}.train.eval_every=4", f"{_t}.train.log_every=1"]


def _cmd(stage: list[str], data: dict, out: Path, resume: bool) -> list[str]:
    args = [sys.executable, "-m", "vlp_cli", *stage, "-c", str(data["corpus"]), "-f",
            str(data["features"]), "-o", str(out)]
    for s in SETS:
        args += ["--set", s]
    return args + (["--resume"] if resume else [])


def _env(fault: str = "") -> dict:
    # Bit-equality holds for one thread count: fix it for every run.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VLP_FAULT": fault}


def _run(stage: list[str], data: dict, out: Path, fault: str = "", resume: bool = False
         ) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(stage, data, out, resume), capture_output=True, text=True,
                          env=_env(fault), timeout=600)


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def _same(ref: Path, out: Path) -> None:
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ in {diff[:3]}"
    assert _rows(ref) == _rows(out)
    assert json.loads((out / "meta.json").read_text())["step"] == STEPS
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers


def _kill_and_resume(stage: list[str], data: dict, out: Path, ref: Path, fault: str) -> None:
    first = _run(stage, data, out, fault)
    assert first.returncode == -signal.SIGKILL, (fault, first.returncode, first.stderr[-2000:])
    if fault.startswith("checkpoint:"):
        # The checkpoint itself is usable before any resume: an interrupted move is completed.
        res = subprocess.run([sys.executable, "-m", "vlp_cli", "verify", str(out)],
                             capture_output=True, text=True, env=_env(), timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
    second = _run(stage, data, out, resume=True)
    assert second.returncode == 0, (fault, second.stderr[-2000:])
    _same(ref, out)


PRETRAIN_FAULTS = [
    "step:mid@2",            # before the first save: resume has nothing... see below
    "step:mid@5",            # mid-step, mid-epoch, after the step-3 save
    "epoch:end@1",           # at an epoch boundary
    "epoch:start@3",         # the start of the third epoch
    "save:before@2", "save:rank@2", "save:weights@2", "save:optimizer@2", "save:trainer@2",
    "save:manifest@2", "save:renamed@2",
    "inside:trainer.json@2", "inside:rank-00000.json@2", "inside:manifest.json@3",
    "checkpoint:written@1", "checkpoint:half-moved@2",
]


@pytest.fixture(scope="module")
def pre_ref(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "pre"
    res = _run(["pretrain", "tiny"], tiny_data, ref)
    assert res.returncode == 0, res.stderr[-2000:]
    return ref


@pytest.mark.parametrize("fault", PRETRAIN_FAULTS)
def test_pretrain_killed_at(fault: str, tiny_data: dict, pre_ref: Path, tmp_path: Path) -> None:
    out = tmp_path / "pre"
    if fault == "step:mid@2":  # killed before any save: --resume says so, a rerun starts over
        first = _run(["pretrain", "tiny"], tiny_data, out, fault)
        assert first.returncode == -signal.SIGKILL
        again = _run(["pretrain", "tiny"], tiny_data, out, resume=True)
        assert again.returncode == 1 and "nothing to resume" in again.stderr
        assert _run(["pretrain", "tiny"], tiny_data, out).returncode == 0
        _same(pre_ref, out)
        return
    _kill_and_resume(["pretrain", "tiny"], tiny_data, out, pre_ref, fault)


def test_pretrain_killed_at_random_moments(tiny_data: dict, pre_ref: Path,
                                           tmp_path: Path) -> None:
    """Kills at moments the test does not choose: after the first rows appear, a random wait."""
    rng = random.Random(1234)
    for trial in range(3):
        out = tmp_path / f"rand{trial}"
        proc = subprocess.Popen(_cmd(["pretrain", "tiny"], tiny_data, out, False),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=_env())
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not any((out / "state").glob("step-*")):
            res = _run(["pretrain", "tiny"], tiny_data, out, resume=True)
            assert res.returncode == 1 and "nothing to resume" in res.stderr
            continue
        res = _run(["pretrain", "tiny"], tiny_data, out, resume=True)
        assert res.returncode == 0, res.stderr[-2000:]
        _same(pre_ref, out)


@pytest.fixture(scope="module")
def vqa_ref(tiny_data: dict, pre_ref: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "vqa"
    res = _run(["finetune", "vqa", "-k", str(pre_ref)], tiny_data, ref)
    assert res.returncode == 0, res.stderr[-2000:]
    return ref


@pytest.mark.parametrize("fault", ["step:mid@5", "epoch:end@1", "save:weights@2",
                                   "save:optimizer@2", "save:manifest@2", "save:renamed@1",
                                   "checkpoint:half-moved@1"])
def test_finetune_killed_at(fault: str, tiny_data: dict, pre_ref: Path, vqa_ref: Path,
                            tmp_path: Path) -> None:
    _kill_and_resume(["finetune", "vqa", "-k", str(pre_ref)], tiny_data, tmp_path / "vqa",
                     vqa_ref, fault)


def test_sigterm_then_resume(tiny_data: dict, pre_ref: Path, tmp_path: Path) -> None:
    """What a batch scheduler sends before it kills: the run saves, exits 143, resumes."""
    out = tmp_path / "term"
    proc = subprocess.Popen(_cmd(["pretrain", "tiny"], tiny_data, out, False),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env())
    while proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:  # finished before the signal landed
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "continue with --resume" in err
    res = _run(["pretrain", "tiny"], tiny_data, out, resume=True)
    assert res.returncode == 0, res.stderr[-2000:]
    _same(pre_ref, out)


UNITER_SETS = ["pretrain.tasks={oscar: 1, mlm: 1, mrfr: 1, mrc: 1, mrckl: 1, itm: 1}",
               "pretrain.train.batching=units", "pretrain.train.max_units=120",
               "itm.ot_iters=5"]


@pytest.mark.parametrize("fault", ["step:mid@5", "epoch:end@1", "save:optimizer@2"])
def test_mixed_uniter_run_with_length_buckets_killed_at(fault: str, tiny_data: dict,
                                                       tmp_path: Path) -> None:
    """Every objective mixed, batches by input units: the task draw and each stream's bucket
    position come back from the saved state, and the resumed run is bit-equal."""
    global SETS
    saved = SETS
    SETS = saved + UNITER_SETS
    try:
        ref = tmp_path / "ref"
        assert _run(["pretrain", "tiny"], tiny_data, ref).returncode == 0
        rows = _rows(ref)
        assert {k.split("/")[0] for r in rows for k in r if "/" in k} >= {"mrfr", "itm"}
        _kill_and_resume(["pretrain", "tiny"], tiny_data, tmp_path / "pre", ref, fault)
    finally:
        SETS = saved
