"""Crash safety of training runs: exact resume, run identity, no pickle, non-finite losses.

Kills with SIGKILL at named moments run in subprocesses in test_faults.py (slow); here the
same code paths are driven in-process through SIGTERM, which the loop turns into a save.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe_sets
from vlp_cli import VlpError


def _recipe(extra: list[str] = ()) -> object:
    from vlp_cli.config import load_recipe

    return load_recipe("tiny", tiny_recipe_sets() + [
        "pretrain.train.steps=8", "pretrain.train.save_every=0", "pretrain.train.log_every=1",
        "pretrain.train.eval_every=3", *extra])


def _pretrain(tiny_data: dict, out: Path, extra: list[str] = (), **kw: object) -> None:
    from vlp_cli.stages import pretrain

    pretrain.run(_recipe(extra), tiny_data["corpus"], tiny_data["features"], out, **kw)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def _signal_at(monkeypatch: pytest.MonkeyPatch, point: str, nth: int,
               signum: int = signal.SIGTERM) -> None:
    """Deliver `signum` to this process the nth time the loop reaches `point`."""
    from vlp_cli import faults

    seen = {"n": 0}
    real = faults.point

    def fake(name: str) -> None:
        if name == point:
            seen["n"] += 1
            if seen["n"] == nth:
                os.kill(os.getpid(), signum)
        real(name)

    monkeypatch.setattr(faults, "point", fake)


def test_sigterm_saves_and_resume_is_bit_exact(tiny_data: dict, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp_cli.training import Interrupted

    ref = tmp_path / "ref"
    _pretrain(tiny_data, ref)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at(m, "step:mid", 3)  # read at the next step: 4, mid-epoch
        with pytest.raises(Interrupted, match="SIGTERM at step 4") as info:
            _pretrain(tiny_data, out)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert (out / "state" / "step-00000004" / "manifest.json").is_file()
    _pretrain(tiny_data, out, resume=True)
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _rows(ref), _rows(out)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa
    assert strip(ra) == strip(rb)  # each step once, the same losses
    assert [r["step"] for r in rb if r["split"] == "train"] == list(range(1, 9))


def test_resume_needs_a_state_and_auto_resume_starts(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(VlpError, match="holds no saved training state.*--auto-resume"):
        _pretrain(tiny_data, out, ["pretrain.train.steps=2"], resume=True)
    assert not out.exists()  # a refusal leaves no empty folder
    _pretrain(tiny_data, out, ["pretrain.train.steps=2"], auto_resume=True)
    assert json.loads((out / "meta.json").read_text())["step"] == 2
    _pretrain(tiny_data, out, ["pretrain.train.steps=3"], auto_resume=True)  # continues
    assert [r["step"] for r in _rows(out) if r["split"] == "train"] == [1, 2, 3]
    with pytest.raises(VlpError, match=r"at step 3, past pretrain\.train\.steps=2"):
        _pretrain(tiny_data, out, ["pretrain.train.steps=2"], resume=True)


def test_resume_refuses_another_run(tiny_data: dict, tmp_path: Path) -> None:
    """`finetune retrieval -o <a pre-training dir> --resume` must not touch the checkpoint."""
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import finetune

    pre = tmp_path / "pre"
    _pretrain(tiny_data, pre, ["pretrain.train.steps=2"])
    before = (pre / "model.safetensors").read_bytes()
    recipe = load_recipe("tiny", tiny_recipe_sets())
    with pytest.raises(VlpError, match=r"holds a pre-training run \(oscar\), not a fine-tuning run "
                                       "for retrieval"):
        finetune.run("retrieval", pre, tiny_data["corpus"], tiny_data["features"], pre, recipe,
                     resume=True)
    with pytest.raises(VlpError, match=r"recipe\.pretrain\.train\.lr: 0\.0002 in the saved "
                                       r"run, 0\.001 now"):
        _pretrain(tiny_data, pre, ["pretrain.train.steps=2", "pretrain.train.lr=1e-3"],
                  resume=True)
    assert (pre / "model.safetensors").read_bytes() == before


def test_legacy_pickled_state_is_not_read(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "old"
    (out / "state").mkdir(parents=True)
    (out / "state" / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04.")
    (out / "state" / "progress.json").write_text('{"step": 1, "epoch": 0}')
    with pytest.raises(VlpError, match="pickled Accelerate state"):
        _pretrain(tiny_data, out, ["pretrain.train.steps=2"], resume=True)


def _payload(marker: Path) -> bytes:
    """A pickle that would create `marker` if anything unpickled it."""
    import pickle  # noqa: S403  (the test writes the attack; vlp must never read it)

    class Attack:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    return pickle.dumps(Attack(), protocol=2)


@pytest.mark.parametrize("fix_manifest", [False, True])
def test_planted_pickles_are_refused(tiny_data: dict, tmp_path: Path, fix_manifest: bool) -> None:
    """Each state file replaced in turn by a pickle payload: resume refuses it, naming the
    file, and nothing runs (with the manifest left as it was, or rewritten to match)."""
    import shutil

    from vlp_cli.runstate import MANIFEST, write_manifest

    good = tmp_path / "good"
    _pretrain(tiny_data, good, ["pretrain.train.steps=2", "pretrain.train.keep_states=1"])
    marker = tmp_path / "marker"
    state = good / "state" / "step-00000002"
    names = sorted(p.name for p in state.iterdir())
    for name in names:
        run = tmp_path / f"run-{name}"
        shutil.copytree(good, run)
        target = run / "state" / "step-00000002"
        (target / name).write_bytes(_payload(marker))
        if fix_manifest and name != MANIFEST:
            write_manifest(target, [n for n in names if n != MANIFEST])
        with pytest.raises(VlpError) as info:
            _pretrain(tiny_data, run, ["pretrain.train.steps=3", "pretrain.train.keep_states=1"],
                      resume=True)
        assert name in str(info.value), (name, str(info.value))
        assert "\n" not in str(info.value)
        assert not marker.exists()


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(
        tiny_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp_cli.tasks.oscar import Oscar

    real = Oscar.step
    calls = {"n": 0}

    def poisoned(self, model, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        loss, stats = real(self, model, batch)
        if calls["n"] in (2, 3):  # steps 2 and 3: NaN (as damaged features gave)
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(Oscar, "step", poisoned)
    out = tmp_path / "nan"
    _pretrain(tiny_data, out, ["pretrain.train.steps=5"])
    rows = [r for r in _rows(out) if r["split"] == "train"]
    skipped = [r for r in _rows(out) if r["split"] == "skipped"]
    assert [r["step"] for r in skipped] == [2, 3]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # each step once
    assert rows[-1]["nonfinite_skipped"] == 2
    w = _weights(out)
    assert all(torch.isfinite(v).all() for v in w.values())
    calls["n"] = 0
    with pytest.raises(VlpError, match=r"step 3: the loss was not finite for 2 steps in a row.*"
                                       r"state/step-0000000\d"):
        _pretrain(tiny_data, tmp_path / "nan2", ["pretrain.train.steps=5",
                                                  "pretrain.train.max_nonfinite=2",
                                                  "pretrain.train.save_every=1"])


def test_batch_larger_than_the_data_is_one_line(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "big"
    with pytest.raises(VlpError, match=r"lower pretrain\.train\.batch_size"):
        _pretrain(tiny_data, out, ["pretrain.train.batch_size=4096"])
    assert not out.exists()


def test_no_pickle_in_package_code() -> None:
    """Nothing vlp runs may unpickle: no pickle module, no torch.load without
    weights_only=True, no Accelerate save_state/load_state (they pickle)."""
    import re

    root = Path(__file__).resolve().parent.parent / "vlp_cli"
    # RefCOCO's refs file is a Python 2 pickle: readers/refcoco.py may name the pickle module
    # for a restricted Unpickler (containers only, find_class refuses every other name) and its
    # error; never pickle.load / loads / Unpickler used as it is. It also writes one
    # (export-scenes): dumping builtins loads nothing.
    restricted = {"import pickle", "class _ContainersOnly(pickle.Unpickler):",
                  "path.write_bytes(pickle.dumps(refs, protocol=2))",
                  "except pickle.UnpicklingError as exc:",
                  'raise pickle.UnpicklingError(f"it names {module}.{name}")'}
    bad = []
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if path.relative_to(root).as_posix() == "readers/refcoco.py" and \
                    code.strip() in restricted:
                continue
            if re.search(r"\bimport pickle\b|\bpickle\.|cPickle|dill\b|joblib", code):
                bad.append(f"{path.name}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                bad.append(f"{path.name}:{n}: {line.strip()}")
            if re.search(r"\.(save_state|load_state)\(|register_for_checkpointing", code):
                bad.append(f"{path.name}:{n}: {line.strip()}")
            if re.search(r"allow_pickle\s*=\s*True|yaml\.load\(|yaml\.unsafe_load", code):
                bad.append(f"{path.name}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_error_from_a_dataloader_worker_is_one_line() -> None:
    """A damaged record found by a worker process reaches the user as its own line."""
    from torch.utils.data import DataLoader, Dataset

    from vlp_cli.errors import user_message

    class Damaged(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> int:
            raise VlpError("features/ record 'a.png' is damaged (checksum mismatch)")

    with pytest.raises(VlpError) as info:
        next(iter(DataLoader(Damaged(), num_workers=1)))
    assert "Traceback" in str(info.value)  # torch's wrapping, which the CLI unwraps
    assert user_message(info.value, []) == \
        "features/ record 'a.png' is damaged (checksum mismatch)"


def test_dataloader_workers_read_the_stores(tiny_data: dict, tmp_path: Path) -> None:
    """Worker processes open their own store handles (py-lmdb refused the inherited ones), and
    the run is the same as without workers."""
    _pretrain(tiny_data, tmp_path / "w0", ["pretrain.train.steps=3"])
    _pretrain(tiny_data, tmp_path / "w2", ["pretrain.train.steps=3",
                                            "pretrain.train.num_workers=2"])
    a, b = _weights(tmp_path / "w0"), _weights(tmp_path / "w2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_and_verify_a_training_state(tiny_data: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlp_cli.cli import app

    out = tmp_path / "run"
    _pretrain(tiny_data, out, ["pretrain.train.steps=2"])
    state = out / "state" / "step-00000002"
    info = json.loads(CliRunner().invoke(app, ["inspect", str(state), "--json"]).stdout)
    assert info["kind"] == "training state" and info["step"] == 2
    assert info["run"] == "a pre-training run (oscar)"
    ck = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert [s["step"] for s in ck["training_states"]] == [2]
    res = CliRunner().invoke(app, ["verify", str(state)])
    assert res.exit_code == 0 and res.stdout.strip().endswith("OK"), res.output
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0 and "training states checked: 1" in res.stdout, res.output
    (state / "trainer.json").write_text("{}")
    res = CliRunner().invoke(app, ["verify", str(state)])
    assert res.exit_code == 1 and "trainer.json is damaged" in res.output


def test_a_run_started_by_vlp_0_2_is_refused_on_resume(
        tiny_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """States of 0.2 runs (no "layout" in their identity) hold other head and recipe names."""
    from vlp_cli.stages import pretrain

    real = pretrain.run_identity

    def old_identity(*a, **k):  # noqa: ANN002, ANN003, ANN202
        ident = real(*a, **k)
        ident.pop("layout")
        return ident

    out = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(pretrain, "run_identity", old_identity)
        _pretrain(tiny_data, out, ["pretrain.train.steps=1"])
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(VlpError, match="started by vlp 0.2 or older"):
        _pretrain(tiny_data, out, ["pretrain.train.steps=2"], resume=True)
    assert (out / "model.safetensors").read_bytes() == before  # nothing written
