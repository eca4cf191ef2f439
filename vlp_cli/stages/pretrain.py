"""vlp pretrain: a corpus and its features -> a pre-trained checkpoint directory (Oscar)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vlp_cli import VlpError
from vlp_cli.checkpoint import load_tokenizer, quiet_transformers, save_checkpoint
from vlp_cli.config import Recipe
from vlp_cli.data.datasets import Collator, PretrainDataset
from vlp_cli.data.examples import ExampleBuilder
from vlp_cli.stages.common import (
    check_tokenizer,
    corpus_meta,
    features_meta,
    open_inputs,
    prepare_out,
    run_identity,
    seed_everything,
)
from vlp_cli.tasks import pretrain_step
from vlp_cli.training import train

logger = logging.getLogger(__name__)


def run(recipe: Recipe, corpus: Path, features: Path, out: Path, resume: bool = False,
        auto_resume: bool = False) -> Path:
    """Pre-train with Oscar's objectives: masked tokens over words and tags + polluted tags.

    `resume` continues the run saved in `out` (an error when there is none); `auto_resume`
    continues it when there is one and starts otherwise (for schedulers that requeue a job).
    """
    from vlp_cli.assets import resolve_text_encoder
    from vlp_cli.model import VLPModel

    quiet_transformers()
    seed_everything(recipe.seed)
    cfg = recipe.pretrain
    inputs = open_inputs(corpus, features)
    c, store = inputs.corpus, inputs.features
    random_init = recipe.model.init.startswith("random:")
    tok = load_tokenizer(recipe.corpus.tokenizer if random_init else recipe.model.init)
    check_tokenizer(tok, c, f"model.init {recipe.model.init!r}")
    identity = run_identity("pretrain", "pretrain", recipe, "pretrain", {
        "corpus": c.meta.get("fingerprint"), "features": store.fingerprint,
        "init": recipe.model.init})
    state = prepare_out(out, resume, identity, auto_resume)

    def indices(split: str) -> np.ndarray:
        parts = [c.indices(kind, split) for kind in cfg.text]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    train_idx, val_idx = indices("train"), indices("val")
    if len(train_idx) == 0:
        raise VlpError(f"corpus {corpus} has no train examples of kinds {cfg.text}")
    builder = ExampleBuilder(tok, store, recipe.data)
    n_cls = 3 if cfg.caption_pollute_prob > 0 else 2
    model = VLPModel.from_text_encoder(
        resolve_text_encoder(recipe.model.init), store.feature_dim, pos_dim=builder.pos_dim,
        img_dropout=recipe.model.img_dropout, num_contrast_classes=n_cls,
        vocab_size=len(tok))
    train_ds = PretrainDataset(c, builder, train_idx, cfg, recipe.data.max_text_len, recipe.seed)
    val_ds = PretrainDataset(c, builder, val_idx, cfg, recipe.data.max_text_len, recipe.seed + 1)
    meta = {"task": "pretrain", "objectives": ["mlm", f"contrastive-{n_cls}way"],
            "init": recipe.model.init, "corpus": corpus_meta(c),
            "features": features_meta(store)}

    def save(model: object, step: int) -> None:
        save_checkpoint(out, model, tok, {**meta, "step": step}, recipe)

    logger.info("pre-training on %d examples (%d held out), %d steps of %d", len(train_ds),
                len(val_ds), cfg.train.steps, cfg.train.batch_size)
    result = train(model, train_ds, Collator(builder.pad_id), pretrain_step(cfg.contrastive_weight),
                   cfg.train, out, seed=recipe.seed, identity=identity,
                   cfg_key="pretrain.train", eval_dataset=val_ds, save_fn=save,
                   resume_from=state, description="pretrain")
    logger.info("pretrained %s in %.0fs; held-out %s", out, result.seconds,
                ", ".join(f"{k} {v:.4f}" for k, v in result.held_out.items()))
    return Path(out)
