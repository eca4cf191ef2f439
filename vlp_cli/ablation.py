"""vlp ablate: the papers' ablations at our scale, one factor changed per variant, several
seeds, one table.

Each (variant, seed) runs the real commands (`vlp pretrain`, `vlp finetune`, `vlp evaluate`) in
its own folder, as a user would; its result is written last (`result.json`, atomically), so an
interrupted ablation picks up where it stopped: finished runs are read back, a half-finished
one resumes its stages (`--auto-resume`). A claim counts as reproduced only where the mean gap
between its two variants exceeds twice their pooled standard deviation, on every task.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.config import Recipe

logger = logging.getLogger(__name__)


def _vlp(*args: str) -> None:
    cmd = [sys.executable, "-m", "vlp_cli", *args]
    logger.info("$ vlp %s", " ".join(args))
    done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise VlpError(f"`vlp {' '.join(args)}` failed (exit {done.returncode}); its output is "
                       "above. Rerun `vlp ablate` to continue from the finished runs")


def _once(marker: Path, *args: str) -> None:
    """Run a command unless its marker says it finished (a kill leaves no marker: the next
    run resumes it with --auto-resume or redoes it)."""
    if not marker.is_file():
        _vlp(*args)
        marker.write_text("done\n")


def run_one(recipe_path: Path, corpus: Path, features: Path, d: Path, sets: list[str],
            pretrain: bool, tasks: list[str]) -> dict:
    """One (variant, seed): pre-train (unless not), fine-tune and evaluate each task."""
    from vlp_cli.tasks import get

    d.mkdir(parents=True, exist_ok=True)
    common = ["--recipe", str(recipe_path)] + [x for s in sets for x in ("--set", s)]
    io = ["-c", str(corpus), "-f", str(features)]
    start = d / "pretrained"
    if not pretrain:
        # The initial weights as a checkpoint (text encoder + fresh image embedder): one step
        # at a learning rate of 1e-30 moves no weight by more than ~1e-29.
        sets = [*sets, "pretrain.train.steps=1", "pretrain.train.warmup_steps=0",
                "pretrain.train.lr=1e-30", "pretrain.train.eval_every=0",
                "pretrain.train.eval_batches=1"]
    _once(d / ".pretrained.done", "pretrain", str(recipe_path), *io, "-o", str(start),
          "--auto-resume", *[x for s in sets for x in ("--set", s)])
    result: dict = {}
    for name in tasks:
        ck, ev = d / name, d / f"eval-{name}"
        _once(d / f".{name}.done", "finetune", name, "-k", str(start), *io, "-o", str(ck),
              "--auto-resume", *common)
        _once(d / f".eval-{name}.done", "evaluate", name, "-k", str(ck), *io, "-o", str(ev),
              *common)
        metrics = json.loads((ev / "metrics.json").read_text())
        result[name] = metrics[get(name).headline]
    return result


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def table(results: dict[str, dict[int, dict]], recipe: Recipe) -> dict:
    """Mean and standard deviation per variant and task, and each claim's verdict."""
    tasks = recipe.ablate.tasks
    rows = {}
    for variant, by_seed in results.items():
        rows[variant] = {}
        for t in tasks:
            vals = [r[t] for r in by_seed.values() if t in r]
            rows[variant][t] = {"mean": statistics.fmean(vals) if vals else math.nan,
                                "sd": statistics.stdev(vals) if len(vals) > 1 else math.nan,
                                "n": len(vals), "values": vals}
    claims = []
    for better, worse, source in recipe.ablate.claims:
        if better not in rows or worse not in rows:
            continue
        verdicts = {}
        for t in tasks:
            a, b = rows[better][t], rows[worse][t]
            pooled = math.sqrt((a["sd"] ** 2 + b["sd"] ** 2) / 2)
            gap = a["mean"] - b["mean"]
            # Fewer than two seeds on a side: no spread, so no verdict (None).
            verdicts[t] = {"gap": gap, "pooled_sd": pooled,
                           "reproduced": None if math.isnan(pooled) else bool(gap > 2 * pooled)}
        judged = [v["reproduced"] for v in verdicts.values()]
        claims.append({"claim": source, "better": better, "worse": worse, "tasks": verdicts,
                       "reproduced": None if None in judged else all(judged)})
    return {"rows": rows, "claims": claims}


def run(recipe: Recipe, recipe_path: Path, corpus: Path, features: Path, out: Path,
        seeds: int | None = None, variants: list[str] | None = None,
        sets: list[str] | None = None, run_missing: bool = True) -> dict:
    """Every (variant, seed) not yet finished, then the table (written to out/ablation.json).
    `sets` (the command line's --set) apply to every run, before each variant's own;
    `run_missing=False` tabulates the finished runs only."""
    from vlp_cli.tasks import get

    cfg = recipe.ablate
    for t in cfg.tasks:
        if not get(t, "finetune").headline:
            raise VlpError(f"ablate.tasks: '{t}' has no headline metric to compare")
    names = variants or list(cfg.variants)
    unknown = [v for v in names if v not in cfg.variants]
    if unknown:
        raise VlpError(f"unknown variant(s) {unknown}; the recipe's ablate.variants are "
                       f"{', '.join(cfg.variants)}")
    from vlp_cli.config import load_recipe

    for variant in names:  # a typo in a variant's overrides: refused before any run
        load_recipe(recipe_path, [*(sets or []), *cfg.variants[variant]])
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, dict[int, dict]] = {v: {} for v in names}
    # Seed by seed, every variant: an ablation stopped early has compared every variant.
    for i in range(seeds or cfg.seeds):
        for variant in names:
            seed = recipe.seed + i
            d = out / f"{variant}-seed{seed}"
            done = d / "result.json"
            run_sets = [*(sets or []), *cfg.variants[variant], f"seed={seed}"]
            if done.is_file():
                kept = json.loads(done.read_text())
                if kept.get("overrides") != run_sets:
                    raise VlpError(f"{done} was run with other settings ({kept.get('overrides')}"
                                   f", not {run_sets}): give another --out, or remove it")
                results[variant][seed] = kept["metrics"]
                continue
            if not run_missing:
                continue
            t0 = time.time()
            metrics = run_one(recipe_path, corpus, features, d, run_sets,
                              pretrain=variant != "no-pretrain", tasks=cfg.tasks)
            _write_atomic(done, {"variant": variant, "seed": seed, "metrics": metrics,
                                 "overrides": run_sets,
                                 "seconds": round(time.time() - t0, 1)})
            results[variant][seed] = metrics
    summary = table(results, recipe)
    summary["seconds_this_run"] = round(time.time() - started, 1)
    summary["seconds_total"] = round(sum(
        json.loads(p.read_text())["seconds"] for p in out.glob("*-seed*/result.json")), 1)
    summary["runs"] = sum(len(r) for r in results.values())
    _write_atomic(out / "ablation.json", summary)
    return summary
