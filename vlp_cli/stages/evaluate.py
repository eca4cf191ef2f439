"""vlp evaluate TASK: a checkpoint + a corpus split -> metrics and predictions.

Runs under Accelerate like training: scoring is split over the processes (`accelerate launch
-m vlp_cli evaluate ...`) and gathered with `gather_for_metrics`, each example once. Results go
to a folder of their own (`--out`, default a new `eval-CHECKPOINT-SPLIT` folder beside the
checkpoint): nothing is written inside the checkpoint being read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vlp_cli import VlpError, probes
from vlp_cli.checkpoint import checkpoint_fingerprint, quiet_transformers
from vlp_cli.config import Recipe, recipe_to_dict
from vlp_cli.data.examples import ExampleBuilder
from vlp_cli.outputs import check_writable
from vlp_cli.stages.common import open_checkpoint_inputs
from vlp_cli.stores.integrity import fingerprint

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"


def default_out(checkpoint: Path, split: str) -> Path:
    """A new `eval-NAME-SPLIT` folder beside the checkpoint (numbered when taken)."""
    ckpt = Path(checkpoint).resolve()
    base = ckpt.parent / f"eval-{ckpt.name}-{split}"
    out, n = base, 1
    while out.exists() and any(out.iterdir()):
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def score_files(task_name: str, predictions: Path, references: Path,
                out: Path | None = None) -> dict:
    """Score another system's output file against references (no checkpoint): metrics.json
    and predictions.jsonl into `out` (default: a new `eval-PREDICTIONS` folder beside it)."""
    from vlp_cli import tasks as registry

    task = registry.get(task_name)
    out = Path(out) if out is not None else default_out(Path(predictions).with_suffix(""),
                                                        "scored")
    check_writable(out / METRICS_FILE, file=True)
    metrics, preds = task.score_files(Path(predictions), Path(references))
    result = {"task": task.name, "predictions": str(predictions),
              "references": str(references), **metrics}
    _write(out, result, preds, {})
    return result


def run(task_name: str, checkpoint: Path, corpus: Path, features: Path, recipe: Recipe,
        split: str = "test", out: Path | None = None, limit: int | None = None) -> dict:
    """Score `checkpoint` on a task over a corpus split; write metrics.json and predictions."""
    from accelerate import Accelerator

    from vlp_cli import tasks as registry
    from vlp_cli.tasks import Context

    task = registry.get(task_name)
    out = Path(out) if out is not None else default_out(checkpoint, split)
    if out.resolve() == Path(checkpoint).resolve() or \
            Path(checkpoint).resolve() in out.resolve().parents:
        raise VlpError(f"--out {out} is inside the checkpoint {checkpoint}: evaluation results "
                       "go to a folder of their own (omit --out for one beside it)")
    if out.suffix == ".json":
        raise VlpError(f"--out {out}: evaluate writes a folder (metrics.json and "
                       "predictions.jsonl), not a file; pass a folder name")
    # Refused now, not after the whole evaluation has run.
    check_writable(out / METRICS_FILE, file=True)
    quiet_transformers()
    o = open_checkpoint_inputs(checkpoint, corpus, features)
    model, tok, meta, c, store = o.model, o.tokenizer, o.meta, o.corpus, o.features
    why = task.check_checkpoint(meta)
    if why is not None:
        raise VlpError(f"checkpoint {checkpoint} is {why}")
    task = task.bind(recipe, task.state_from_meta(meta))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.to(accelerator.device).eval()
    ctx = Context(recipe, c, ExampleBuilder(tok, store, recipe.data), tok)
    metrics, preds = task.evaluate(ctx, model, split, limit, accelerator)
    note = probes.collapse_note(metrics)
    if note is not None:
        logger.warning("%s: %s", checkpoint, note)
    result = {"task": task.name, "split": split, "checkpoint": str(checkpoint),
              # a text-only baseline (data.blank_regions) says so: `vlp report` compares
              "inputs": "text only" if recipe.data.blank_regions else "regions",
              # what the checkpoint was fine-tuned from (`vlp report` names a task it was
              # fine-tuned for before this one), and what this evaluation read
              "init": meta.get("init"), "init_task": meta.get("init_task"),
              "fingerprints": {"checkpoint": checkpoint_fingerprint(checkpoint),
                               "corpus": c.meta.get("fingerprint"),
                               "features": store.fingerprint,
                               "recipe": fingerprint(recipe_to_dict(recipe))},
              **metrics}
    if accelerator.is_main_process:
        _write(out, result, preds, task.result_files(preds))
    accelerator.wait_for_everyone()
    return result


def _write(out: Path, result: dict, preds: list[dict], extra: dict) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
        with (out / PREDICTIONS_FILE).open("w", encoding="utf-8") as f:
            for p in preds:
                f.write(json.dumps(p) + "\n")
        for name, content in extra.items():
            # JSON, or a data set's own text format (NLVR2's CSV) as it is
            (out / name).write_text(content if isinstance(content, str) else
                                    json.dumps(content), encoding="utf-8")
    except OSError as exc:
        # The folder was writable when the run started; keep the metrics an evaluation cost.
        from vlp_cli.console import out as stdout

        stdout.print_json(json.dumps(result))
        raise VlpError(f"could not write {exc.filename or out} ({exc.strerror or exc}); the "
                       "metrics are printed above") from None
    logger.info("%s: metrics and %d predictions", out, len(preds))
