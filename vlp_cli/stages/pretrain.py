"""vlp pretrain: a corpus and its features -> a pre-trained checkpoint directory.

The objectives are tasks of stage "pretrain" (tasks/), mixed by `pretrain.tasks`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp_cli import VlpError
from vlp_cli.checkpoint import is_checkpoint, load_tokenizer, quiet_transformers, save_checkpoint
from vlp_cli.config import Recipe
from vlp_cli.data.datasets import Collator
from vlp_cli.data.examples import ExampleBuilder
from vlp_cli.stages.common import (
    apply_model_options,
    check_tokenizer,
    corpus_meta,
    features_meta,
    freeze_unused,
    open_inputs,
    prepare_out,
    run_identity,
    seed_everything,
    warn_fixed_model_keys,
)
from vlp_cli.training import TrainTask, train

if TYPE_CHECKING:
    from vlp_cli.model import VLPModel

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """One corpus of the run: its directories, sampling ratio and objectives' ratios."""

    corpus: Path
    features: Path
    ratio: float
    tasks: dict[str, float]


def corpus_sources(recipe: Recipe, corpus: Path | list[Path] | None,
                   features: Path | list[Path] | None) -> list[Source]:
    """Each corpus of the run: the command line's (paired in order), or, without them, the
    recipe's `pretrain.corpora`. Recipe entries without directories describe the command
    line's corpora in order (ratio and objectives); a corpus with no entry gets ratio 1 and
    `pretrain.tasks`."""
    cfg = recipe.pretrain
    cs = [corpus] if isinstance(corpus, (str, Path)) else list(corpus or [])
    fs = [features] if isinstance(features, (str, Path)) else list(features or [])
    slots = [e for e in cfg.corpora if not e.corpus]
    if cs or fs:
        if len(cs) != len(fs):
            raise VlpError(f"{len(cs)} --corpus and {len(fs)} --features given: give one "
                           "--features (the store it was built on) per --corpus, in order")
        if cfg.corpora and not slots:
            logger.warning("--corpus/--features given: the recipe's pretrain.corpora (and "
                           "their ratios) are not used")
        out = [Source(Path(c), Path(f), slots[i].ratio if i < len(slots) else 1.0,
                      dict((slots[i].tasks if i < len(slots) else {}) or cfg.tasks))
               for i, (c, f) in enumerate(zip(cs, fs))]
        for i, src in enumerate(out):
            logger.info("--corpus %s: %s, ratio %g, objectives %s", src.corpus,
                        f"pretrain.corpora[{i}]" if i < len(slots) else "no pretrain.corpora "
                        "entry", src.ratio, ", ".join(f"{n} {r:g}" for n, r in src.tasks.items()))
        return out
    if not cfg.corpora or slots:
        raise VlpError("no corpus: pass --corpus DIR --features DIR, or list them in the "
                       "recipe under pretrain.corpora (with their corpus and features)")
    return [Source(Path(e.corpus), Path(e.features), e.ratio, dict(e.tasks or cfg.tasks))
            for e in cfg.corpora]


def _labels(paths: list[Path]) -> list[str]:
    """Short distinct names of the corpora (their folder names), for the mixed streams."""
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]



def continued(recipe: Recipe, features: Any, pos_dim: int, heads: list) -> VLPModel:
    """A vlp checkpoint as `model.init`: pre-training goes on from it (UNITER's second stage
    on VCR's text starts from the first stage's weights). Its encoder, region embedding and
    the heads whose spec the objectives repeat are kept; other heads start fresh. The
    architecture is the checkpoint's: the recipe's model keys that differ are named."""
    from vlp_cli.checkpoint import load_checkpoint

    path = recipe.model.init
    model, _, meta = load_checkpoint(path)
    c = model.config
    if c.img_feat_dim != features.feature_dim:
        raise VlpError(f"model.init {path}: its regions are {c.img_feat_dim}-d, the features "
                       f"{features.path} {features.feature_dim}-d: extract with the recipe it "
                       "was pre-trained with")
    if c.pos_dim != pos_dim:
        raise VlpError(f"model.init {path}: it reads {c.pos_dim} position numbers, "
                       f"data.pos_kind gives {pos_dim}: set data.pos_kind as it was trained")
    warn_fixed_model_keys(recipe, model, path)
    kept = [h.name for h in heads if any(h == g for g in c.head_specs())]
    model.with_heads(heads, keep=True, seed=recipe.seed)
    logger.info("continuing from %s (%s, step %s); heads kept: %s", path, meta.get("task"),
                meta.get("step"), ", ".join(kept) or "none")
    return model

def run(recipe: Recipe, corpus: Path | list[Path] | None, features: Path | list[Path] | None,
        out: Path, resume: bool = False, auto_resume: bool = False) -> Path:
    """Pre-train with the recipe's objectives (Oscar's by default) on one corpus or several.

    Each optimiser step draws one (objective, corpus) pair, with probability proportional to
    the objective's ratio times the corpus's. `resume` continues the run saved in `out` (an
    error when there is none); `auto_resume` continues it when there is one and starts
    otherwise (for schedulers that requeue a job).
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
    sources = corpus_sources(recipe, corpus, features)
    idle = [n for n in names if not any(n in s.tasks for s in sources)]
    if idle and not recipe.pretrain.corpora[len(sources):]:
        raise VlpError(f"pretrain.tasks: {', '.join(idle)} runs on no corpus (no "
                       "pretrain.corpora entry's tasks names it): add it to one or remove it")
    if idle:  # named only for corpora the command line did not give (the demo's, alone)
        logger.warning("%s: named only by pretrain.corpora entries %d and later, and %d "
                       "corpus given: not run (--set 'pretrain.corpora=[]' runs every "
                       "objective of pretrain.tasks on every corpus)", ", ".join(idle),
                       len(sources) + 1, len(sources))
        objectives = [t for t in objectives if t.name not in idle]
        names = [t.name for t in objectives]
    opened = [open_inputs(s.corpus, s.features) for s in sources]
    first = opened[0].features
    for src, inp in zip(sources[1:], opened[1:]):
        if inp.features.extractor_fingerprint != first.extractor_fingerprint:
            raise VlpError(f"features {src.features} were extracted in another feature space "
                           f"than {sources[0].features} (extractor "
                           f"{inp.features.extractor_fingerprint} vs "
                           f"{first.extractor_fingerprint}): extract every corpus's images "
                           "with the same recipe's extract section")
    random_init = recipe.model.init.startswith("random:")
    tok = load_tokenizer(recipe.corpus.tokenizer if random_init else recipe.model.init)
    for inp in opened:
        check_tokenizer(tok, inp.corpus, f"model.init {recipe.model.init!r}")
    identity = run_identity("pretrain", "+".join(names), recipe, ["pretrain", *names], {
        "corpus": "+".join(str(i.corpus.meta.get("fingerprint")) for i in opened),
        "features": "+".join(i.features.fingerprint for i in opened),
        "init": recipe.model.init,
        **({"ratios": [s.ratio for s in sources]} if len(sources) > 1 else {}),
        **({"mixes": [s.tasks for s in sources]} if any(s.tasks != cfg.tasks for s in sources)
           else {})})
    state = prepare_out(out, resume, identity, auto_resume)
    # The region classes of the union, in order of first appearance (MRC's label space).
    labels = list(dict.fromkeys(x for i in opened for x in i.features.labels))
    ctxs = [Context(recipe, i.corpus, ExampleBuilder(tok, i.features, recipe.data), tok, labels)
            for i in opened]
    objectives = [t.bind(recipe, t.prepare(ctxs[0])) for t in objectives]
    heads: list = []
    for t in objectives:
        for h in t.heads(ctxs[0]):
            same = [g for g in heads if g.name == h.name]
            if same and same[0] != h:
                raise VlpError(f"pretrain.tasks: {t.name} declares head '{h.name}' as {h}, "
                               f"another objective as {same[0]}: they cannot share it")
            if not same:
                heads.append(h)
    builder = ctxs[0].builder
    if not random_init and is_checkpoint(recipe.model.init):
        model = continued(recipe, first, builder.pos_dim, heads)
    else:
        model = VLPModel.from_text_encoder(
            resolve_text_encoder(recipe.model.init), first.feature_dim, heads,
            pos_dim=builder.pos_dim, img_dropout=recipe.model.img_dropout,
            vocab_size=len(tok), seed=recipe.seed, image_embedder=recipe.model.image_embedder,
            pos_fourier=recipe.model.pos_fourier)
    apply_model_options(model, recipe)
    freeze_unused(model, objectives)
    tags = _labels([s.corpus for s in sources]) if len(sources) > 1 else [""]
    # One stream per (objective, corpus running it), weighted by both ratios.
    work = [TrainTask(t.name + (f"@{tag}" if tag else ""), t.dataset(ctx, "train", recipe.seed),
                      Collator(builder.pad_id, t.collate), t.step, src.tasks[t.name] * src.ratio,
                      eval_dataset=t.dataset(ctx, "val", recipe.seed + 1))
            for t in objectives for ctx, tag, src in zip(ctxs, tags, sources)
            if t.name in src.tasks]
    meta = {"task": "pretrain", "tasks": {t.name: t.state for t in objectives},
            "objectives": [o for t in objectives
                           for o in getattr(t, "objectives", lambda r: [t.name])(recipe)],
            "init": recipe.model.init, "corpus": corpus_meta(opened[0].corpus),
            "features": features_meta(first)}
    if len(sources) > 1:
        meta["corpora"] = [{**corpus_meta(i.corpus), "features": features_meta(i.features),
                            "ratio": s.ratio, "mix": s.tasks} for i, s in zip(opened, sources)]
    else:
        meta["mix"] = sources[0].tasks  # the objectives that ran, with their ratios

    def save(m: object, step: int) -> None:
        save_checkpoint(out, m, tok, {**meta, "step": step}, recipe)

    logger.info("pre-training (%s) on %s examples (%s held out), %d steps of %d",
                ", ".join(w.name for w in work), "+".join(str(len(w.dataset)) for w in work),
                "+".join(str(len(w.eval_dataset)) for w in work), cfg.train.steps,
                cfg.train.batch_size)
    result = train(model, work, cfg.train, out, seed=recipe.seed, identity=identity,
                   cfg_key="pretrain.train", save_fn=save, resume_from=state,
                   description="pretrain")
    logger.info("pretrained %s in %.0fs; held-out %s", out, result.seconds,
                ", ".join(f"{k} {v:.4f}" for k, v in result.held_out.items()))
    return Path(out)
