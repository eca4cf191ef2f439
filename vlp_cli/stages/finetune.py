"""vlp finetune TASK: a checkpoint + a task corpus -> a fine-tuned checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.checkpoint import quiet_transformers, save_checkpoint
from vlp_cli.config import Recipe
from vlp_cli.data.datasets import CaptionDataset, Collator, RetrievalTrainDataset, VqaDataset
from vlp_cli.data.examples import ExampleBuilder
from vlp_cli.stages.common import (
    corpus_meta,
    features_meta,
    open_checkpoint_inputs,
    prepare_out,
    run_identity,
    seed_everything,
)
from vlp_cli.tasks import caption_step, retrieval_step, vqa_step
from vlp_cli.training import train

logger = logging.getLogger(__name__)
TASKS = ("vqa", "retrieval", "captioning")


def run(task: str, checkpoint: Path, corpus: Path, features: Path, out: Path, recipe: Recipe,
        resume: bool = False, auto_resume: bool = False) -> Path:
    """Fine-tune `checkpoint` on `task` with the train split; score the val split as it goes."""
    if task not in TASKS:
        raise VlpError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    quiet_transformers()
    seed_everything(recipe.seed)
    o = open_checkpoint_inputs(checkpoint, corpus, features)
    model, tok, src_meta, c, store = o.model, o.tokenizer, o.meta, o.corpus, o.features
    if src_meta.get("task") not in (None, "pretrain", task):
        logger.warning("%s was fine-tuned for %s; fine-tuning it again for %s", checkpoint,
                       src_meta.get("task"), task)
    from vlp_cli.checkpoint import checkpoint_fingerprint

    identity = run_identity("finetune", task, recipe, task, {
        "corpus": c.meta.get("fingerprint"), "features": store.fingerprint,
        "init": checkpoint_fingerprint(checkpoint)})
    state = prepare_out(out, resume, identity, auto_resume)
    builder = ExampleBuilder(tok, store, recipe.data)
    seed = recipe.seed
    meta = {"task": task, "init": str(Path(checkpoint).resolve()),
            "corpus": corpus_meta(c),
            "features": features_meta(store)}
    collate = Collator(builder.pad_id)

    if task == "vqa":
        cfg = recipe.vqa
        answers = c.answers
        if not answers:
            raise VlpError(f"corpus {corpus} has no VQA answers: build it from questions")
        if model.vqa_head is None or src_meta.get("answers") != answers:
            model.set_vqa_head(len(answers), cfg.classifier)
        meta["answers"] = answers
        collate = Collator(builder.pad_id, num_answers=len(answers))
        train_ds = VqaDataset(c, builder, c.require("vqa", "train"), cfg.max_text_len, seed)
        val_ds = VqaDataset(c, builder, c.indices("vqa", "val"), cfg.max_text_len, seed)
        step = vqa_step
    elif task == "retrieval":
        cfg = recipe.retrieval
        max_len = recipe.data.max_text_len
        neg = cfg.shared_tag_negatives
        train_ds = RetrievalTrainDataset(c, builder, c.require("caption", "train"), max_len, seed,
                                         neg)
        val_ds = RetrievalTrainDataset(c, builder, c.indices("caption", "val"), max_len, seed + 1,
                                       neg)
        step = retrieval_step
    else:
        cfg = recipe.captioning
        max_len = recipe.data.max_text_len + cfg.max_caption_len
        train_ds = CaptionDataset(c, builder, c.require("caption", "train"), cfg, max_len, seed)
        val_ds = CaptionDataset(c, builder, c.indices("caption", "val"), cfg, max_len, seed + 1)
        step = caption_step(cfg.label_smoothing)

    def save(m: object, n: int) -> None:
        save_checkpoint(out, m, tok, {**meta, "step": n}, recipe)

    logger.info("fine-tuning %s for %s on %d examples (%d held out), %d steps", checkpoint,
                task, len(train_ds), len(val_ds), cfg.train.steps)
    result = train(model, train_ds, collate, step, cfg.train, out, seed=seed, identity=identity,
                   cfg_key=f"{task}.train", eval_dataset=val_ds, save_fn=save,
                   resume_from=state, description=task)
    logger.info("fine-tuned %s in %.0fs; held-out %s", out, result.seconds,
                ", ".join(f"{k} {v:.4f}" for k, v in result.held_out.items()))
    return Path(out)
