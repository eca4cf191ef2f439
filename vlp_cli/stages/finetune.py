"""vlp finetune TASK: a checkpoint + a task corpus -> a fine-tuned checkpoint.

The task (tasks/) supplies everything task-specific; this stage knows no task.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlp_cli import probes
from vlp_cli.checkpoint import checkpoint_fingerprint, quiet_transformers, save_checkpoint
from vlp_cli.config import Recipe
from vlp_cli.data.datasets import Collator
from vlp_cli.data.examples import ExampleBuilder
from vlp_cli.stages.common import (
    corpus_meta,
    features_meta,
    apply_model_options,
    freeze_unused,
    open_checkpoint_inputs,
    prepare_out,
    run_identity,
    seed_everything,
    warn_fixed_model_keys,
)
from vlp_cli.training import TrainTask, train

logger = logging.getLogger(__name__)

BEST = "best"  # the sub-folder of the best held-out checkpoint


def run(task_name: str, checkpoint: Path, corpus: Path, features: Path, out: Path,
        recipe: Recipe, resume: bool = False, auto_resume: bool = False) -> Path:
    """Fine-tune `checkpoint` on a task with the train split; score the val split as it goes."""
    from vlp_cli import tasks as registry
    from vlp_cli.tasks import Context

    task = registry.get(task_name, "finetune").bind(recipe)
    quiet_transformers()
    seed_everything(recipe.seed)
    o = open_checkpoint_inputs(checkpoint, corpus, features)
    model, tok, src_meta, c, store = o.model, o.tokenizer, o.meta, o.corpus, o.features
    warn_fixed_model_keys(recipe, model, checkpoint)
    note = probes.checkpoint_note(checkpoint)
    if note is not None and not recipe.data.blank_regions:
        logger.warning("%s, by its pre-training's last held-out evaluation: %s", checkpoint,
                       note)
    if src_meta.get("task") not in (None, "pretrain", task.name):
        # Intended when one task's fine-tuning is the start of another (make demo-tasks:
        # NLVR2 from SNLI-VE's), a slip otherwise: said either way.
        logger.warning("%s was fine-tuned for %s: %s starts from that fine-tuning's encoder "
                       "(its %s heads are dropped)", checkpoint, src_meta.get("task"),
                       task.name, src_meta.get("task"))
    identity = run_identity("finetune", task.name, recipe, [task.key], {
        "corpus": c.meta.get("fingerprint"), "features": store.fingerprint,
        "init": checkpoint_fingerprint(checkpoint)})
    state = prepare_out(out, resume, identity, auto_resume)
    builder = ExampleBuilder(tok, store, recipe.data)
    ctx = Context(recipe, c, builder, tok)
    task = task.bind(recipe, task.prepare(ctx))
    # A head the source checkpoint already has for this task is kept when the task's state
    # (an answer vocabulary...) is the same; otherwise it starts fresh. A head of the
    # pre-training that the task reads as it is (VQA's answers from the masked-token head) is
    # kept whatever the state.
    had = {h["name"] for h in model.config.heads}
    for name in task.pretrained_heads:
        if name not in had:
            logger.warning("%s has no '%s' head (pre-trained without a masked-token "
                           "objective): %s's starts fresh", checkpoint, name, task.name)
    model.with_heads(task.heads(ctx), keep=task.state_from_meta(src_meta) == task.state,
                     seed=recipe.seed, always_keep=task.pretrained_heads)
    task.adapt_model(model)
    apply_model_options(model, recipe)
    freeze_unused(model, [task])
    seed = recipe.seed
    cfg = task.train_cfg(recipe)
    work = TrainTask(task.name, task.dataset(ctx, "train", seed),
                     Collator(builder.pad_id, task.collate), task.step,
                     eval_dataset=task.dataset(ctx, "val", seed + 1))
    meta = {"task": task.name, "tasks": {task.name: task.state},
            "init": str(Path(checkpoint).resolve()),
            # the task the source was fine-tuned for ("pretrain": a pre-training; None: not
            # recorded, as in imported checkpoints)
            "init_task": src_meta.get("task"), "corpus": corpus_meta(c),
            "features": features_meta(store)}

    def save(m: object, n: int) -> None:
        save_checkpoint(out, m, tok, {**meta, "step": n}, recipe)

    def save_best(m: object, n: int, value: float) -> None:
        # The checkpoint of the best held-out score so far, beside the last one in OUT.
        save_checkpoint(Path(out) / BEST, m, tok, {**meta, "step": n, "best": {
            "metric": f"val {task.select}", "value": value}}, recipe)
        logger.info("step %d: best held-out %s so far (%.4f), saved in %s", n, task.select,
                    value, Path(out) / BEST)

    logger.info("fine-tuning %s for %s on %d examples (%d held out), %d steps", checkpoint,
                task.name, len(work.dataset), len(work.eval_dataset), cfg.steps)
    result = train(model, [work], cfg, out, seed=seed, identity=identity,
                   cfg_key=f"{task.key}.train", save_fn=save, resume_from=state,
                   description=task.name, best_key=task.select,
                   best_fn=save_best if task.select else None)
    logger.info("fine-tuned %s in %.0fs; held-out %s", out, result.seconds,
                ", ".join(f"{k} {v:.4f}" for k, v in result.held_out.items()))
    return Path(out)
