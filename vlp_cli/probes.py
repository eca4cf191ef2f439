"""Probes of what a model has become, cheap enough to run at every held-out evaluation.

`region_spread` (measured by tasks/base.py's `region_spread`): how far apart the final states of
one image's regions are. A pre-training can collapse them onto one vector per image (README,
"Region collapse": the scene set's mixture did, spread 5e-5 where a fresh model has 0.13); every
later task then sees the image as a bag of tags and a task that must pick a region (RefCOCO)
cannot learn. Caught here instead of trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Below this the regions of an image are one state for any head: the collapsed pre-training
# measured 5e-5, healthy ones 0.08 (scene set) to 0.13 (a fresh region embedding).
COLLAPSED = 1e-2


def spread(hidden: torch.Tensor, text_len: int,
           img_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) over images with two or more regions of the mean over hidden units of the
    standard deviation across the image's regions. `hidden` [B, T + R, H], `img_mask` [B, R]."""
    keep = img_mask.bool().sum(1) >= 2  # [B]
    return per_image(hidden[:, text_len:].float(), img_mask)[keep].sum(), keep.sum().float()


def per_image(regions: torch.Tensor, img_mask: torch.Tensor) -> torch.Tensor:
    """[B]: the mean over units of the standard deviation across each image's valid regions
    (`regions` [B, R, H]); 0 for an image with fewer than two."""
    w = img_mask.bool()[..., None].float()
    n = w.sum(1).clamp(min=1)  # [B, 1]
    mean = (regions * w).sum(1) / n  # [B, H]
    var = (((regions - mean[:, None]) ** 2) * w).sum(1) / n
    return var.sqrt().mean(-1)


def collapse_note(stats: dict) -> str | None:
    """The warning a set of statistics deserves when any `region_spread` in it (a mixture's
    rows are prefixed `task/region_spread`) is under COLLAPSED; None otherwise."""
    spreads = [v for k, v in stats.items() if k.split("/")[-1] == "region_spread"
               and isinstance(v, (int, float))]
    if not spreads or min(spreads) >= COLLAPSED:
        return None
    return (f"the regions of an image have collapsed onto one final state (region_spread "
            f"{min(spreads):.2g}, under {COLLAPSED:g}): tasks that must tell regions apart "
            "cannot learn from this model; README, \"Region collapse\"")


def checkpoint_note(checkpoint: Path) -> str | None:
    """`collapse_note` of the last held-out row in a checkpoint's metrics.jsonl (a checkpoint
    trained before the probe existed, or without held-out data, has none to judge)."""
    path = Path(checkpoint) / "metrics.jsonl"
    last: dict = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if isinstance(row, dict) and row.get("split") == "val":
                last = row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # a log, not a part of the checkpoint's verified files
    return collapse_note(last)
