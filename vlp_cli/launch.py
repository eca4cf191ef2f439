"""The Accelerator a training run uses: precision, data-parallel settings, trackers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vlp_cli import VlpError
from vlp_cli.config import TrainCfg

logger = logging.getLogger(__name__)


def make_accelerator(cfg: TrainCfg, mixed: bool = False, out_dir: Path | None = None) -> Any:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    precision = cfg.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        logger.warning("fp16 needs a GPU; training in fp32 on the CPU")
        precision = "no"
    # Without a GPU, several processes (torchrun, accelerate launch) only form a gloo group
    # when accelerate is told it is on the CPU; alone, this changes nothing.
    # In a mixed run one task's heads sit idle in another's step: DDP must be told, or it
    # waits for their gradients forever. A single task's model holds only its own heads, and
    # every parameter gets a gradient: the search for unused ones (a pass over the graph every
    # step) is skipped.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=mixed)
    trackers = {}
    if cfg.trackers:  # Accelerate's experiment trackers, writing under OUT/trackers
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

        have = {str(getattr(t, "value", t)) for t in get_available_trackers()}
        for name in cfg.trackers:
            if name not in LOGGER_TYPE_TO_CLASS:
                raise VlpError(f"train.trackers: unknown tracker {name!r}; Accelerate's are "
                               f"{', '.join(LOGGER_TYPE_TO_CLASS)}")
            if name not in have:
                raise VlpError(f"train.trackers: {name!r} is not installed here (pip install "
                               f"{name}), or remove it from the recipe")
        trackers = {"log_with": list(cfg.trackers),
                    "project_dir": str(Path(out_dir or ".") / "trackers")}
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                       cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp], **trackers)
