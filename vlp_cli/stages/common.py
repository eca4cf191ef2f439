"""What the training and evaluation stages share: opening inputs and checking they match."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlp_cli import VlpError
from vlp_cli.checkpoint import is_checkpoint, tokenizer_identity
from vlp_cli.config import Recipe, load_recipe, load_recipe_data
from vlp_cli.stores.corpus import Corpus
from vlp_cli.stores.features import FeatureStore

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def device() -> torch.device:
    """Where evaluation and captioning run: the GPU when there is one, else the CPU."""
    import torch  # here, not at the top: most users of this module never need it

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Inputs:
    corpus: Corpus
    features: FeatureStore


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch before a stage makes anything random.

    New parameters (the image embedder and heads in pre-training, a fresh task head in
    fine-tuning) take their initial values from torch's global generator when the model is
    built, before the training loop seeds itself: without this, two runs of one recipe
    started from different weights.
    """
    from accelerate.utils import set_seed

    set_seed(seed)


def open_inputs(corpus: Path, features: Path) -> Inputs:
    """Open a corpus and a feature store and check that the corpus was built on these features."""
    c = Corpus(corpus)
    # An unfinished extraction was accepted, or refused, when this corpus was built from it
    # (build-corpus --allow-incomplete); the content fingerprint below pins that very store.
    f = FeatureStore(features, allow_incomplete=True, warn=False)
    want = c.meta.get("features", {})
    if want.get("fingerprint") != f.fingerprint:
        raise VlpError(
            f"corpus {corpus} was built on features {want.get('fingerprint')} "
            f"({want.get('path')}), but {features} holds {f.fingerprint}: pass the matching "
            "--features, or rebuild the corpus on these")
    return Inputs(c, f)


@dataclass
class Opened:
    """A checkpoint and the corpus and features it is about to be used with, checked."""

    model: Any
    tokenizer: Any
    meta: dict
    corpus: Corpus
    features: FeatureStore


def open_checkpoint_inputs(checkpoint: Path, corpus: Path, features: Path) -> Opened:
    """Load a checkpoint and open its inputs, refusing any that do not match it."""
    from vlp_cli.checkpoint import load_checkpoint

    inputs = open_inputs(corpus, features)
    model, tok, meta = load_checkpoint(checkpoint)
    check_tokenizer(tok, inputs.corpus, f"checkpoint {checkpoint}")
    check_features(meta, inputs.features, checkpoint)
    return Opened(model, tok, meta, inputs.corpus, inputs.features)


def check_tokenizer(tok: Any, corpus: Corpus, where: str) -> None:
    """The model's vocabulary must be the one the corpus was tokenised with."""
    have = tokenizer_identity(tok)["vocab_sha"]
    want = corpus.meta.get("tokenizer", {}).get("vocab_sha")
    if have != want:
        raise VlpError(
            f"{where} uses a different vocabulary ({have}) from the one corpus {corpus.path} was "
            f"tokenised with ({want}): rebuild the corpus with `--set corpus.tokenizer=...` "
            "naming this model's tokenizer")


def check_features(meta: dict, store: FeatureStore, checkpoint: Path) -> None:
    """A checkpoint only understands features from the extractor it was trained on."""
    want = meta.get("features", {})
    if want.get("feature_dim") != store.feature_dim:
        raise VlpError(f"checkpoint {checkpoint} expects {want.get('feature_dim')}-d features, "
                       f"{store.path} holds {store.feature_dim}-d ones")
    # The extractor's identity, not the content's: a checkpoint serves any images extracted
    # the same way. Checkpoints written before stores had content fingerprints recorded the
    # extractor's under "fingerprint".
    have = store.extractor_fingerprint
    if want.get("extractor_fingerprint", want.get("fingerprint")) != have:
        raise VlpError(
            f"checkpoint {checkpoint} was trained on features from extractor "
            f"{(want.get('extractor') or {}).get('name')} "
            f"({want.get('extractor_fingerprint', want.get('fingerprint'))}); {store.path} "
            f"was extracted with {have}: extract features with the same configuration")


def features_meta(store: FeatureStore) -> dict:
    """What a checkpoint records about its features, so later stages can match or refuse."""
    return {"fingerprint": store.fingerprint,
            "extractor_fingerprint": store.extractor_fingerprint,
            "feature_dim": store.feature_dim,
            "extractor": store.meta.get("extractor"), "labels": store.labels}


def corpus_meta(corpus: Corpus) -> dict:
    """What a checkpoint records about the corpus it was trained on."""
    return {"path": str(corpus.path.resolve()), "sources": corpus.meta.get("sources"),
            "fingerprint": corpus.meta.get("fingerprint")}


def checkpoint_recipe(checkpoint: Path, recipe: Path | None, overrides: list[str]) -> Recipe:
    """The recipe a fine-tuning or evaluation run uses: the given file, else the checkpoint's."""
    if recipe is not None:
        return load_recipe(recipe, overrides)
    stored = Path(checkpoint) / "recipe.yaml"
    base = load_recipe_data(stored) if stored.is_file() else {}
    return load_recipe(None, overrides, base=base,
                       source=str(stored) if stored.is_file() else "recipe")


# Keys of a training section that may differ between a run and its resumption: they change
# when or how long it runs, or what it logs, not what a step computes.
RESUMABLE_TRAIN_KEYS = ("steps", "save_every", "save_minutes", "keep_states", "log_every",
                        "eval_every", "eval_batches", "num_workers", "max_nonfinite",
                        "eval_at_start", "trackers")


def run_identity(stage: str, task: str, recipe: Recipe, sections: list[str],
                 inputs: dict) -> dict:
    """What a training run is, recorded in its saved states and checked by `--resume`."""
    import json

    from vlp_cli.config import recipe_to_dict

    d = recipe_to_dict(recipe)
    parts = {}
    for section in sections:
        sec = dict(d[section])
        if "train" in sec:
            sec["train"] = {k: v for k, v in sec["train"].items()
                            if k not in RESUMABLE_TRAIN_KEYS}
        if section == "pretrain":
            # An entry without objectives of its own reads as vlp 0.4.0 wrote it (before
            # `tasks`), so that the runs it started still resume.
            sec["corpora"] = [{k: v for k, v in c.items() if k != "tasks" or v}
                              for c in sec.get("corpora", [])]
        parts[section] = sec
    # "layout" 2: task modules (vlp 0.3); states of older runs hold other head and recipe
    # names, which this vlp cannot continue.
    ident = {"stage": stage, "task": task, "seed": recipe.seed, "layout": 2,
             "recipe": {**parts, "data": d["data"], "model": d["model"]}, "inputs": inputs}
    return json.loads(json.dumps(ident))  # as it reads back from JSON: lists, not tuples


def apply_model_options(model: Any, recipe: Recipe) -> None:
    """What the recipe's model section asks of a model about to train: the regions' dropout
    (a training setting, not architecture: a checkpoint's own is replaced and saved with it)
    and gradient checkpointing."""
    model.img_embed.dropout.p = model.config.img_dropout = recipe.model.img_dropout
    if recipe.model.gradient_checkpointing:
        model.enable_checkpointing()


def warn_fixed_model_keys(recipe: Recipe, model: Any, checkpoint: Any) -> None:
    """A model loaded from a checkpoint keeps its architecture: name the recipe's model keys
    that ask for another (`--set model.pos_fourier=4` on a checkpoint built with 0)."""
    for key in ("image_embedder", "pos_fourier"):
        if getattr(recipe.model, key) != getattr(model.config, key):
            logger.warning("model.%s %r is not used: %s was built with %r, and goes on so "
                           "(set it when pre-training from a text encoder)", key,
                           getattr(recipe.model, key), checkpoint, getattr(model.config, key))


def freeze_unused(model: Any, tasks: list[Any]) -> None:
    """Freeze the pooler when no task reads the pooled [CLS] (captioning): every parameter
    left trainable then gets a gradient in every step, as DDP without unused-parameter search
    requires."""
    if not any(t.uses_pooler for t in tasks) and model.bert.pooler is not None:
        model.bert.pooler.requires_grad_(False)


def check_writable(out: Path) -> None:
    """The output's nearest existing folder accepts new files (checked before any work)."""
    import os

    out = Path(out)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise VlpError(f"{probe} is a file, not a folder: choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise VlpError(f"cannot write into {probe} (permission denied): choose another --out")


def prepare_out(out: Path, resume: bool, identity: dict | None = None,
                auto_resume: bool = False) -> Any:
    """A training output directory is new, or resumed on purpose: returns the state to resume
    from (runstate.SavedState) or None. Creates nothing: the training loop makes the folder
    once every check has passed, so a refusal leaves no empty folder behind."""
    from vlp_cli import runstate

    out = Path(out)
    check_writable(out)
    has_files = out.exists() and any(out.iterdir())
    if has_files and _killed_before_first_save(out):
        if resume:
            raise VlpError(f"--resume: {out} holds a run killed before its first save, so there "
                           "is nothing to resume: run the same command without --resume (or "
                           "with --auto-resume) to start it over")
        # Nothing there can be resumed or is worth keeping: start over instead of making the
        # user delete files by hand.
        logger.warning("%s holds a run killed before its first save: starting it over", out)
        _clear_debris(out)
        has_files = False
    if resume or auto_resume:
        if has_files or resume:
            return runstate.check_resumable(out, identity or {}, auto=auto_resume and
                                            not has_files)
        return None
    if has_files:
        state = None
        try:
            state = runstate.latest_state(out)
        except VlpError:
            pass
        saved = state.trainer.get("identity", {}) if state is not None else {}
        if identity and saved and (saved.get("stage"), saved.get("task")) != (
                identity.get("stage"), identity.get("task")):
            raise VlpError(f"{out} already holds {runstate.run_name(saved)}: choose a new --out "
                           "(nothing was changed)")
        what = "a checkpoint" if is_checkpoint(out) else "files"
        raise VlpError(f"{out} already holds {what}: pass --resume to continue that run, or "
                       "choose a new --out (nothing was changed)")
    return None


def _killed_before_first_save(out: Path) -> bool:
    """Only a metrics log and an unfinished state folder: a run killed before any save."""
    from vlp_cli import runstate

    names = {p.name for p in out.iterdir()}
    if not names <= {"metrics.jsonl", runstate.STATE_DIR}:
        return False
    root = runstate.state_root(out)
    return not root.exists() or all(p.name.startswith(".partial-") for p in root.iterdir())


def _clear_debris(out: Path) -> None:
    import shutil

    from vlp_cli import runstate

    (out / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(runstate.state_root(out), ignore_errors=True)
