"""The layout rule of tasks/ and readers/ (see tasks/__init__.py): nothing outside them names
a task, and the modules on the task path stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

from vlp_cli.tasks import TASKS

PKG = Path(__file__).resolve().parent.parent / "vlp_cli"
# Where a task's name may be written: its own file and the registry, its recipe section,
# and the readers of data-set and feature formats (a format may share a name with a task,
# e.g. Oscar's feature TSV and Oscar's objective).
ALLOWED = ("tasks/", "config.py", "readers/", "stores/formats_", "stores/importers.py")
# The task path: no module over this many lines.
TASK_PATH = ("tasks/", "data/", "stages/", "model.py", "training.py")
MAX_LINES = 500


def _modules() -> list[tuple[str, Path]]:
    return [(str(p.relative_to(PKG)), p) for p in sorted(PKG.rglob("*.py"))]


def test_no_task_name_is_written_outside_tasks_config_and_readers() -> None:
    names = set(TASKS)
    found = []
    for rel, path in _modules():
        if rel.startswith(ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, "task names written outside tasks/:\n" + "\n".join(found)


def test_modules_on_the_task_path_stay_under_500_lines() -> None:
    long = [f"{rel}: {n} lines" for rel, path in _modules() if rel.startswith(TASK_PATH)
            for n in [len(path.read_text(encoding="utf-8").splitlines())] if n > MAX_LINES]
    assert not long, long


def test_every_task_has_its_recipe_section() -> None:
    import dataclasses

    from vlp_cli.config import Recipe

    fields = {f.name for f in dataclasses.fields(Recipe)}
    for name, task in TASKS.items():
        assert task.name == name and name in fields, name
        assert task.help and task.metrics, name
