"""vlp pretrain: a corpus and its features -> a pre-trained checkpoint directory.

The objectives are tasks of stage "pretrain" (tasks/), mixed by `pretrain.tasks`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.checkpoint import load_tokenizer, quiet_transformers, save_checkpoint
from vlp_cli.config import Recipe
from vlp_cli.data.datasets import Collator
from vlp_cli.data.examples import ExampleBuilder
from vlp_cli.stages.common import (
    check_tokenizer,
    corpus_meta,
    features_meta,
    freeze_unused,
    open_inputs,
    prepare_out,
    run_identity,
    seed_everything,
)
from vlp_cli.training import TrainTask, train

logger = logging.getLogger(__name__)


def run(recipe: Recipe, corpus: Path, features: Path, out: Path, resume: bool = False,
        auto_resume: bool = False) -> Path:
    """Pre-train with the recipe's objectives (Oscar's by default).

    `resume` continues the run saved in `out` (an error when there is none); `auto_resume`
    continues it when there is one and starts otherwise (for schedulers that requeue a job).
    """
    from vlp_cli import tasks as registry
    from vlp_cli.assets import resolve_text_encoder
    from vlp_cli.model import VLPModel
    from vlp_cli.tasks import Context

    quiet_transformers()
    seed_everything(recipe.seed)
    cfg = recipe.pretrain
    registry.check_mix(cfg.tasks)
    objectives = [registry.get(name, "pretrain").bind(recipe) for name in cfg.tasks]
    names = [t.name for t in objectives]
    inputs = open_inputs(corpus, features)
    c, store = inputs.corpus, inputs.features
    random_init = recipe.model.init.startswith("random:")
    tok = load_tokenizer(recipe.corpus.tokenizer if random_init else recipe.model.init)
    check_tokenizer(tok, c, f"model.init {recipe.model.init!r}")
    identity = run_identity("pretrain", "+".join(names), recipe, ["pretrain", *names], {
        "corpus": c.meta.get("fingerprint"), "features": store.fingerprint,
        "init": recipe.model.init})
    state = prepare_out(out, resume, identity, auto_resume)
    builder = ExampleBuilder(tok, store, recipe.data)
    ctx = Context(recipe, c, builder, tok)
    objectives = [t.bind(recipe, t.prepare(ctx)) for t in objectives]
    heads: list = []
    for t in objectives:
        for h in t.heads(ctx):
            same = [g for g in heads if g.name == h.name]
            if same and same[0] != h:
                raise VlpError(f"pretrain.tasks: {t.name} declares head '{h.name}' as {h}, "
                               f"another objective as {same[0]}: they cannot share it")
            if not same:
                heads.append(h)
    model = VLPModel.from_text_encoder(
        resolve_text_encoder(recipe.model.init), store.feature_dim, heads,
        pos_dim=builder.pos_dim, img_dropout=recipe.model.img_dropout, vocab_size=len(tok),
        seed=recipe.seed)
    freeze_unused(model, objectives)
    work = [TrainTask(t.name, t.dataset(ctx, "train", recipe.seed), Collator(builder.pad_id,
                      t.collate), t.step, cfg.tasks[t.name],
                      eval_dataset=t.dataset(ctx, "val", recipe.seed + 1)) for t in objectives]
    meta = {"task": "pretrain", "tasks": {t.name: t.state for t in objectives},
            "objectives": [o for t in objectives
                           for o in getattr(t, "objectives", lambda r: [t.name])(recipe)],
            "init": recipe.model.init, "corpus": corpus_meta(c),
            "features": features_meta(store)}

    def save(m: object, step: int) -> None:
        save_checkpoint(out, m, tok, {**meta, "step": step}, recipe)

    logger.info("pre-training (%s) on %s examples (%s held out), %d steps of %d",
                ", ".join(names), "+".join(str(len(w.dataset)) for w in work),
                "+".join(str(len(w.eval_dataset)) for w in work), cfg.train.steps,
                cfg.train.batch_size)
    result = train(model, work, cfg.train, out, seed=recipe.seed, identity=identity,
                   cfg_key="pretrain.train", save_fn=save, resume_from=state,
                   description="pretrain")
    logger.info("pretrained %s in %.0fs; held-out %s", out, result.seconds,
                ", ".join(f"{k} {v:.4f}" for k, v in result.held_out.items()))
    return Path(out)
