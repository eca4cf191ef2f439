"""The task registry: every task vlp trains or evaluates, one file each in this folder.

Adding a task: one file here (a `Task` subclass and `TASK = ...`), its recipe section (the
dataclass of the same name in config.py, a field of `Recipe`), one entry below, and a block
in the recipes that use it. Nothing outside this folder names a task.
"""

from __future__ import annotations

from vlp_cli import VlpError
from vlp_cli.tasks import (captioning, gqa, itm, mlm, mrc, mrckl, mrfr, nlvr2, oscar, refcoco,
                           retrieval, snli_ve, vcr, vqa)
from vlp_cli.tasks.base import Context, Stats, Step, Task

TASKS: dict[str, Task] = {
    oscar.TASK.name: oscar.TASK,
    mlm.TASK.name: mlm.TASK,
    mrfr.TASK.name: mrfr.TASK,
    mrc.TASK.name: mrc.TASK,
    mrckl.TASK.name: mrckl.TASK,
    itm.TASK.name: itm.TASK,
    vqa.TASK.name: vqa.TASK,
    retrieval.TASK.name: retrieval.TASK,
    captioning.TASK.name: captioning.TASK,
    gqa.TASK.name: gqa.TASK,
    nlvr2.TASK.name: nlvr2.TASK,
    snli_ve.TASK.name: snli_ve.TASK,
    refcoco.TASK.name: refcoco.TASK,
    vcr.TASK.name: vcr.TASK,
}


def names(stage: str) -> list[str]:
    """The tasks of a stage: "pretrain" (objectives) or "finetune"."""
    return [n for n, t in TASKS.items() if t.stage == stage]


def get(name: str, stage: str | None = None) -> Task:
    """A task by name, or one line naming the choices."""
    task = TASKS.get(name)
    if task is None or (stage is not None and task.stage != stage):
        choices = names(stage) if stage else list(TASKS)
        what = {"pretrain": "pre-training objective", "finetune": "task"}.get(stage or "", "task")
        raise VlpError(f"unknown {what} {name!r}; choose one of {', '.join(choices)}")
    return task


def check_mix(mix: dict[str, float], source: str = "recipe") -> None:
    """Refuse a `pretrain.tasks` entry that is not a pre-training objective, naming the key."""
    for name in mix:
        if name not in names("pretrain"):
            raise VlpError(f"{source}: 'pretrain.tasks.{name}' is not a pre-training objective; "
                           f"choose among {', '.join(names('pretrain'))}")


__all__ = ["check_mix", "TASKS", "Context", "Stats", "Step", "Task", "get", "names"]
