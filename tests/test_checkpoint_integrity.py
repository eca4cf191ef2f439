"""Damaged checkpoints are refused with one line; diverged (NaN) weights are never evaluated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import tiny_recipe_sets
from vlp_cli.cli import app


@pytest.fixture(scope="module")
def vqa_ckpt(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlp_cli.config import load_recipe
    from vlp_cli.stages import finetune, pretrain

    root = tmp_path_factory.mktemp("ck")
    recipe = load_recipe("tiny", tiny_recipe_sets() + ["pretrain.train.steps=1",
                                                       "vqa.train.steps=1"])
    pretrain.run(recipe, tiny_data["corpus"], tiny_data["features"], root / "pre")
    finetune.run("vqa", root / "pre", tiny_data["corpus"], tiny_data["features"], root / "vqa",
                 recipe)
    return root / "vqa"


def _evaluate(tiny_data: dict, ckpt: Path) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["evaluate", "vqa", "-k", str(ckpt), "-c",
                                   str(tiny_data["corpus"]), "-f", str(tiny_data["features"]),
                                   "-o", str(ckpt.parent / f"{ckpt.name}-eval")])
    return res.exit_code, res.output


def _copy(src: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def test_intact_checkpoint_verifies_and_evaluates(tiny_data: dict, vqa_ckpt: Path,
                                                  tmp_path: Path) -> None:
    from vlp_cli.checkpoint import verify_checkpoint

    report = verify_checkpoint(vqa_ckpt)
    assert report["ok"] and report["files_checked"] >= 5 and report["training_states_checked"]
    code, out = _evaluate(tiny_data, _copy(vqa_ckpt, tmp_path, "ok"))
    assert code == 0, out


def _flip_bytes(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) // 2 + i * 97] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["weights-bytes", "weights-header", "weights-truncated",
                                  "config-truncated", "meta-garbage", "nan-weights"])
def test_damage_is_one_line(tiny_data: dict, vqa_ckpt: Path, tmp_path: Path, case: str) -> None:
    from vlp_cli.runstate import MANIFEST, write_manifest

    ck = _copy(vqa_ckpt, tmp_path, case)
    w = ck / "model.safetensors"
    if case == "weights-bytes":
        _flip_bytes(w)
        want = "model.safetensors is damaged"
    elif case == "weights-header":
        data = bytearray(w.read_bytes())
        data[10:30] = b"}{not json at all!!!"
        w.write_bytes(bytes(data))
        want = "model.safetensors"
    elif case == "weights-truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        want = "model.safetensors"
    elif case == "config-truncated":
        (ck / "config.json").write_text((ck / "config.json").read_text()[:40])
        want = "config.json"
    elif case == "meta-garbage":
        (ck / "meta.json").write_bytes(b"\xff\xfe garbage")
        want = "meta.json"
    else:  # a diverged run: NaN weights, files consistent with the manifest
        state = load_file(w)
        first = sorted(state)[0]
        state[first] = torch.full_like(state[first], float("nan"))
        save_file(state, str(w))
        names = [p.name for p in ck.iterdir() if p.is_file() and p.name != MANIFEST
                 and p.name in (ck / MANIFEST).read_text()]
        write_manifest(ck, names)
        want = "non-finite values"
    code, out = _evaluate(tiny_data, ck)
    assert code == 1, out
    assert want in out and "Traceback" not in out
    assert len([x for x in out.splitlines() if x.startswith("error")]) == 1, out
    assert not (ck.parent / f"{ck.name}-eval").exists()
    res = CliRunner().invoke(app, ["verify", str(ck)])
    assert res.exit_code == 1 and want in res.output and "Traceback" not in res.output


def test_a_full_disk_is_one_line_and_keeps_the_checkpoint_there(
        tiny_data: dict, vqa_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from conftest import one_error_line
    from vlp_cli.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint

    def full(*args, **kwargs):  # what safetensors raises when the disk fills mid-write
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    kept = _copy(vqa_ckpt, tmp_path, "kept")
    model, tok, meta = load_checkpoint(kept)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as exc:
        save_checkpoint(kept, model, tok, {**meta, "step": 99})
    assert exc.value.errno == errno.ENOSPC and exc.value.filename.endswith("model.safetensors")
    assert verify_checkpoint(kept)["ok"] and load_checkpoint(kept)[2]["step"] == meta["step"]
    res = CliRunner().invoke(app, ["finetune", "vqa", "-k", str(vqa_ckpt), "-c",
                                   str(tiny_data["corpus"]), "-f", str(tiny_data["features"]),
                                   "-o", str(tmp_path / "full"),
                                   *[a for x in tiny_recipe_sets() for a in ("--set", x)]])
    assert "no space left on device" in one_error_line(res)
