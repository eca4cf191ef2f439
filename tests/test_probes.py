"""The region-collapse probe (probes.py): measured at every held-out evaluation, warned about
at pre-training, fine-tuning and evaluation."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cli, tiny_recipe_sets

SETS = [a for x in tiny_recipe_sets() for a in ("--set", x)]


def test_spread_is_the_mean_std_across_an_image_s_regions() -> None:
    from vlp_cli.probes import spread

    hidden = torch.zeros(3, 2 + 3, 2)  # 2 text positions, 3 regions, 2 units
    hidden[0, 2:4] = torch.tensor([[0.0, 0.0], [2.0, 4.0]])  # std 1 and 2 -> 1.5
    hidden[0, 4] = 100.0  # padding: not a region of image 0
    hidden[1, 2:5] = 7.0  # three regions, one state: 0
    hidden[2, 2] = 5.0  # a single region: no spread to measure, not counted
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    total, n = spread(hidden, 2, mask)
    assert n.item() == 2 and total.item() == pytest.approx(1.5)


def test_blanked_regions_are_not_measured() -> None:
    """A text-only baseline's regions are identical as inputs: their states say nothing."""
    from vlp_cli.tasks.base import region_spread

    b = {"input_ids": torch.zeros(2, 1, dtype=torch.long),
         "token_type_ids": torch.zeros(2, 1, dtype=torch.long),
         "text_mask": torch.ones(2, 1, dtype=torch.bool),
         "img_feats": torch.zeros(2, 2, 3), "img_pos": torch.zeros(2, 2, 4),
         "img_mask": torch.ones(2, 2, dtype=torch.bool)}
    b["img_feats"][0, 1] = 1.0  # image 0's regions differ, image 1's (blanked) do not

    def model(*inputs, **_) -> torch.Tensor:
        return torch.cat([torch.zeros(2, 1, 2), torch.ones(2, 2, 2)], 1) * torch.tensor(
            [0.0, 0.0, 1.0])[None, :, None]  # the second region differs in every image

    total, n = region_spread(model, b)
    assert n.item() == 1 and total.item() == pytest.approx(0.5)
    assert region_spread(model, {"input_ids": b["input_ids"]}) is None


def test_collapse_note_names_the_spread_and_ignores_healthy_ones() -> None:
    from vlp_cli.probes import collapse_note

    assert collapse_note({"loss": 1.0}) is None
    assert collapse_note({"oscar/region_spread": 0.08, "mrc/region_spread": 0.1}) is None
    note = collapse_note({"oscar/region_spread": 0.08, "mrc/region_spread": 4.6e-5})
    assert "4.6e-05" in note and "Region collapse" in note


def test_pretraining_records_the_spread_and_fine_tuning_warns_of_a_collapse(
        tiny_data: dict, task_data: dict, tmp_path: Path) -> None:
    io_ = ["-c", tiny_data["corpus"], "-f", tiny_data["features"]]
    pre = tmp_path / "pre"
    res = cli("pretrain", "recipes/tiny.yaml", *io_, "-o", pre, *SETS)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
    spreads = [r["region_spread"] for r in rows if r["split"] == "val"]
    assert spreads and all(s > 0.01 for s in spreads), spreads  # a fresh tiny model: healthy
    assert "collapsed onto" not in res.output
    res = cli("evaluate", "oscar", "-k", pre, *io_, "-o", tmp_path / "ev")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["region_spread"] > 0.01

    # The same checkpoint as if its pre-training had ended collapsed.
    io_ = ["-c", task_data["corpus"], "-f", task_data["features"]]
    collapsed = tmp_path / "collapsed"
    shutil.copytree(pre, collapsed)
    rows[-1] = {**rows[-1], "split": "val", "region_spread": 5e-5}
    (collapsed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = cli("finetune", "snli-ve", "-k", collapsed, *io_, "-o", tmp_path / "ft", *SETS)
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "collapsed onto one final state (region_spread 5e-05" in said, res.output
    res = cli("finetune", "snli-ve", "-k", collapsed, *io_, "-o", tmp_path / "ft-text", *SETS,
              "--set", "data.blank_regions=true")
    assert res.exit_code == 0 and "collapsed onto" not in res.output, res.output
