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
    for p in sorted(run_dir.rglob("eval-*.json")):
        try:
            evals.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            continue
    captions = []
    for p in sorted(run_dir.glob("*captions*.jsonl")):
        captions += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    notes = {}
    agreement = next(iter(sorted(run_dir.rglob("easy-vqa-agreement.json"))), None)
    if agreement is not None:
        notes["easy-VQA annotations vs answers"] = json.loads(agreement.read_text())
    return evals, captions, notes


def show(run_dir: Path) -> None:
    from rich.table import Table

    from vlp_cli.console import out

    evals, captions, notes = collect(run_dir)
    if not evals and not captions:
        raise VlpError(f"{run_dir} holds no eval-*.json or *captions*.jsonl")
    table = Table(title=f"vlp results in {run_dir}", show_lines=False)
    table.add_column("task")
    table.add_column("split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    order = {"vqa": ["vqa_accuracy", "yes/no", "other", "questions"],
             "retrieval": ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                           "images", "unique_caption_images", "split_images"],
             "captioning": ["bleu4", "meteor", "rouge_l", "cider", "images"]}
    for e in evals:
        for k in order.get(e.get("task"), []):
            if e.get(k) is None:
                continue
            v = e[k]
            table.add_row(e["task"], e.get("split", ""), k,
                          f"{v:.2f}" if isinstance(v, float) else str(v))
    out.print(table)
    if captions:
        ct = Table(title="generated captions (greedy) vs references")
        ct.add_column("image")
        ct.add_column("generated")
        ct.add_column("reference")
        for c in captions:
            ct.add_row(c["image"], c["caption"], " | ".join(c.get("references", [])))
        out.print(ct)
    for k, v in notes.items():
        out.print(f"[bold]{k}[/]: {v}")
    if notes:
        out.print("Object tags here are ground-truth shape names derived from the pixels: the "
                  "upper-bound setting of the Oscar paper, not detector tags.")
