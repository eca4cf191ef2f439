"""vlp ablate: variants x seeds through the real commands, cached per (variant, seed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_recipe_sets

pytestmark = pytest.mark.slow


def test_ablation_runs_caches_and_judges(tiny_data: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlp_cli.cli import app

    sets = [x for s in tiny_recipe_sets() + ["ablate.tasks=[vqa]", "vqa.train.steps=2",
                                             "pretrain.train.steps=2"] for x in ("--set", s)]
    args = ["ablate", "tiny", "-c", str(tiny_data["corpus"]), "-f", str(tiny_data["features"]),
            "-o", str(tmp_path / "ab"), "--seeds", "2", "--variant", "full",
            "--variant", "no-pretrain", *sets]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    assert set(summary["rows"]) == {"full", "no-pretrain"}
    assert summary["rows"]["full"]["vqa"]["n"] == 2
    claim = summary["claims"][0]
    assert claim["better"] == "full" and claim["reproduced"] in (True, False)  # 2 seeds
    assert "UNITER Table 2, L1 vs L5" in res.output
    # The no-pretrain start is the initial weights (one step at lr 1e-30).
    meta = json.loads((tmp_path / "ab" / "no-pretrain-seed42" / "pretrained" / "meta.json")
                      .read_text())
    assert meta["step"] == 1
    # A second run finds every (variant, seed) done and runs nothing.
    stamp = (tmp_path / "ab" / "full-seed42" / "result.json").stat().st_mtime_ns
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0 and "$ vlp" not in res.output
    assert (tmp_path / "ab" / "full-seed42" / "result.json").stat().st_mtime_ns == stamp
