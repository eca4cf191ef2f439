"""The layout rule of tasks/ and readers/ (see tasks/__init__.py): nothing outside them names
a task, and the modules on the task path stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

from vlp_cli.tasks import TASKS

PKG = Path(__file__).resolve().parent.parent / "vlp_cli"
# Where a task's name may be written: its own file and the registry, its recipe section, the
# readers of data-set formats; and Oscar's feature formats, which share a name with Oscar's
# objective (`import-features oscar`), for that one name.
ALLOWED = ("tasks/", "config.py", "readers/")
# The model's `image_embedder: oscar` names Oscar's region embedding (a model family).
# The retrieval-eval benchmark measures that task's own evaluation modes (issue 10).
ALLOWED_NAME = {"oscar": ("stores/formats_oscar.py", "stores/importers.py", "model.py"),
                "retrieval": ("benches/retrieval_eval.py",)}
# The task path: no module over this many lines.
TASK_PATH = ("tasks/", "data/", "stages/", "model.py", "training.py")
MAX_LINES = 500


def _modules() -> list[tuple[str, Path]]:
    return [(str(p.relative_to(PKG)), p) for p in sorted(PKG.rglob("*.py"))]


def test_no_task_name_is_written_outside_tasks_config_and_readers() -> None:
    """No string equal to a task's name, no dotted recipe key of a task's section
    (`vqa.max_answers`) and no attribute named after a task (`recipe.vqa`) outside the
    allowed places."""
    import re

    names = set(TASKS)
    dotted = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")\.[a-z_]")
    found = []
    for rel, path in _modules():
        if rel.startswith(ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            hit = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in names:
                    hit = node.value
                elif (m := dotted.search(node.value)) is not None:
                    hit = m.group(1)
            elif isinstance(node, ast.Attribute) and node.attr in names:
                hit = node.attr
            if hit is not None and not rel.startswith(ALLOWED_NAME.get(hit, ("//",))):
                found.append(f"{rel}:{node.lineno} {hit!r}")
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
        assert task.name == name and task.key in fields, name
        assert task.help and task.metrics, name
