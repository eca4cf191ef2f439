"""vlp report: one table for a run folder (the demo's closing summary)."""

from __future__ import annotations

import json
from pathlib import Path

from vlp_cli import VlpError


def collect(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """(evaluation results, caption samples, provenance notes) found under run_dir."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VlpError(f"{run_dir} is not a folder")
    evals = []
    # evaluate's folders (metrics.json), and the eval-*.json files of vlp <= 0.2
    for p in sorted([*run_dir.rglob("metrics.json"), *run_dir.rglob("eval-*.json")]):
        try:
            e = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(e, dict) and "task" in e:
            evals.append(e)
    captions = []
    for p in sorted(run_dir.glob("*captions*.jsonl")):
        captions += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    from vlp_cli.readers import READERS

    notes = {}
    for reader in READERS.values():  # what a reader reports about the data it derived
        name, title, _ = getattr(reader, "REPORT_NOTE", (None, None, None))
        found = next(iter(sorted(run_dir.rglob(name))), None) if name else None
        if found is not None:
            notes[title] = json.loads(found.read_text())
    return evals, captions, notes


LEARNING_MARGIN = 15.0  # points over the higher baseline for a task to count as learning


def learning_rows(evals: list[dict]) -> list[dict]:
    """Per task with a model's evaluation and at least one baseline: the headline metric of
    the model, of the majority-class results file scored by `evaluate --predictions`, and of
    the text-only model (`inputs: text only`), the margin over the higher baseline and
    whether it is at least LEARNING_MARGIN."""
    from vlp_cli.tasks import TASKS

    rows = []
    for name in dict.fromkeys(e["task"] for e in evals):
        task = TASKS.get(name)
        if task is None:
            continue
        mine = [e for e in evals if e["task"] == name]
        model = next((e for e in mine if "checkpoint" in e
                      and e.get("inputs", "regions") == "regions"), {})
        value = model.get(task.headline)
        majority = next((e.get(task.headline) for e in mine if "predictions" in e), None)
        text = next((e.get(task.headline) for e in mine if e.get("inputs") == "text only"),
                    None)
        if value is None or (majority is None and text is None):
            continue
        base = max(b for b in (majority, text) if b is not None)
        # a model fine-tuned from another task's fine-tuning says so (make demo-tasks: NLVR2
        # from SNLI-VE's)
        source = model.get("init_task")
        rows.append({"task": name, "metric": task.headline, "value": value,
                     "from": source if source not in (None, "pretrain", name) else None,
                     "majority": majority, "text_only": text, "margin": value - base,
                     "learning": value - base >= LEARNING_MARGIN})
    return rows


def pretraining_curves(run_dir: Path) -> dict[str, list[dict]]:
    """The held-out rows of each pre-training run under run_dir (folder name -> rows)."""
    curves = {}
    for meta in sorted(Path(run_dir).rglob("meta.json")):
        log = meta.parent / "metrics.jsonl"
        try:
            if json.loads(meta.read_text()).get("task") != "pretrain" or not log.is_file():
                continue
            rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        rows = [r for r in rows if r.get("split") == "val"]
        if rows:
            curves[meta.parent.name] = rows
    return curves


def show(run_dir: Path) -> None:
    from rich.table import Table

    from vlp_cli.console import out

    evals, captions, notes = collect(run_dir)
    if not evals and not captions and not pretraining_curves(run_dir):
        raise VlpError(f"{run_dir} holds no evaluation (metrics.json), *captions*.jsonl or "
                       "pre-training run")
    table = Table(title=f"vlp results in {run_dir}", show_lines=False)
    table.add_column("task")
    table.add_column("split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    from vlp_cli.readers import READERS
    from vlp_cli.tasks import TASKS

    for e in evals:
        task = TASKS.get(e.get("task"))
        for k in task.report if task is not None else []:
            if e.get(k) is None:
                continue
            v = e[k]
            table.add_row(e["task"], e.get("split", ""), k,
                          f"{v:.2f}" if isinstance(v, float) else str(v))
    if evals:
        out.print(table)
    learning = learning_rows(evals)
    if learning:
        lt = Table(title=f"does each task learn? (model vs the higher baseline; learning: "
                         f"+{LEARNING_MARGIN:g} points or more)")
        for col in ("task", "metric", "value", "majority class", "text only", "margin",
                    "learning"):
            lt.add_column(col, justify="left" if col in ("task", "metric") else "right")
        for r in learning:
            name = r["task"] + ("*" if r["from"] else "")
            lt.add_row(name, r["metric"], *(f"{r[k]:.2f}" if r[k] is not None else "-"
                                            for k in ("value", "majority", "text_only",
                                                      "margin")),
                       {True: "yes", False: "NO"}.get(r["learning"], "-"))
        lt.caption = "; ".join(f"* {r['task']}: fine-tuned from the {r['from']} fine-tuning"
                               for r in learning if r["from"]) or None
        out.print(lt)
    if captions:
        ct = Table(title="generated captions vs references")
        ct.add_column("image")
        ct.add_column("generated")
        ct.add_column("reference")
        for c in captions:
            ct.add_row(c["image"], c["caption"], " | ".join(c.get("references", [])))
        out.print(ct)
    for name, rows in pretraining_curves(run_dir).items():
        pt = Table(title=f"pre-training held-out statistics ({name}): first and last evaluation")
        pt.add_column("statistic")
        first, last = rows[0], rows[-1]
        pt.add_column(f"step {first['step']}", justify="right")
        pt.add_column(f"step {last['step']}", justify="right")
        for k in sorted(k for k in last if k not in ("step", "split")
                        and not k.endswith("loss") and k in first):
            pt.add_row(k, f"{first[k]:.4g}", f"{last[k]:.4g}")
        out.print(pt)
    for k, v in notes.items():
        out.print(f"[bold]{k}[/]: {v}")
    for reader in READERS.values():
        _, title, footnote = getattr(reader, "REPORT_NOTE", (None, None, None))
        if title in notes and footnote:
            out.print(footnote)


def show_ablation(summary: dict, recipe: object) -> None:
    """The ablation table: mean +- sd per variant and task, then each claim's verdict."""
    from rich.table import Table

    from vlp_cli.console import out
    from vlp_cli.tasks import TASKS

    tasks = recipe.ablate.tasks
    table = Table(title="ablation (test split; mean +- sd over seeds)")
    table.add_column("variant")
    for t in tasks:
        table.add_column(f"{t} {TASKS[t].headline}", justify="right")
    for variant, row in summary["rows"].items():
        table.add_row(variant, *[f"{row[t]['mean']:.2f} +- {row[t]['sd']:.2f} (n={row[t]['n']})"
                                 for t in tasks])
    out.print(table)
    for c in summary["claims"]:
        gaps = "; ".join(f"{t}: gap {v['gap']:+.2f}, 2 x pooled sd {2 * v['pooled_sd']:.2f}"
                         for t, v in c["tasks"].items())
        verdict = {True: "REPRODUCED", False: "not reproduced"}.get(
            c["reproduced"], "cannot be judged (fewer than 2 seeds)")
        out.print(f"{c['claim']} ({c['better']} vs {c['worse']}): {verdict} ({gaps})")
    out.print(f"{summary['runs']} finished runs; wall time: {summary['seconds_this_run']:.0f} s "
              f"this run, {summary['seconds_total']:.0f} s over all runs")
