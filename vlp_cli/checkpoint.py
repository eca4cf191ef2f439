"""Checkpoint directories that describe themselves.

    ckpt/
      config.json          ModelConfig (BERT config + image embedder + heads)
      model.safetensors    weights (the tied MLM decoder is the word-embedding matrix)
      tokenizer files      vocab.txt, tokenizer.json, tokenizer_config.json, ...
      recipe.yaml          the resolved recipe that produced it
      meta.json            vlp version, task, step, corpus fingerprint, the feature store's
                           extractor identity and dimension, each task's state ("tasks")
      manifest.json        size and xxh3-128 of each file above, written last (vlp verify)
      metrics.jsonl        training log
      state/               training states for --resume (runstate.py: safetensors + JSON)

A later stage reads meta.json to check that it is fed matching features, or to extract
matching features from raw images.

Checkpoints of vlp <= 0.2 (config schema 1: fixed `mlm_head`, `contrast_head`, `match_head`
and an optional classifier attribute) load through a short map to the heads the tasks
declare today (`Task.legacy_heads`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from vlp_cli import VlpError, __version__, faults

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
META = "meta.json"
MANIFEST = "manifest.json"
PARTIAL = ".checkpoint-partial"


def quiet_transformers() -> None:
    """No hub access and no download bars: weights come from local directories."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(name_or_dir: str | Path) -> Any:
    """A fast BERT tokenizer from a directory or hub id (offline)."""
    quiet_transformers()
    from transformers import AutoTokenizer

    from vlp_cli.assets import resolve_text_encoder

    name = resolve_text_encoder(str(name_or_dir))
    try:
        return AutoTokenizer.from_pretrained(name, use_fast=True)
    except (OSError, ValueError) as exc:
        raise VlpError(f"cannot load a tokenizer from {name!r}: pass a Hugging Face model "
                       f"directory with vocab.txt/tokenizer.json ({str(exc).splitlines()[0]})")


def tokenizer_identity(tok: Any) -> dict:
    """What identifies a tokenizer for compatibility checks: its vocabulary, hashed."""
    import hashlib

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256("\n".join(t for t, _ in vocab).encode()).hexdigest()[:16]
    return {"name": str(getattr(tok, "name_or_path", "")), "class": type(tok).__name__,
            "vocab_size": len(vocab), "vocab_sha": digest,
            "lowercase": bool(getattr(tok, "do_lower_case", False)
                              or tok("A").input_ids == tok("a").input_ids)}


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    finish_interrupted_save(p)
    return (p / CONFIG).is_file() and (p / META).is_file()


def finish_interrupted_save(p: Path) -> None:
    """Complete a checkpoint save that a kill interrupted while it moved files into place.

    `save_checkpoint` writes every file and then the manifest into `.checkpoint-partial/`
    before moving any: a partial folder holding a manifest is a complete new checkpoint, so
    its remaining files are moved (roll forward); one without is a save that never finished
    writing, and the checkpoint beside it is the old one, whole (dropped).
    """
    import shutil

    tmp = p / PARTIAL
    if not tmp.is_dir():
        return
    try:
        if (tmp / MANIFEST).is_file():
            for f in sorted(tmp.iterdir()):
                if f.name != MANIFEST:
                    os.replace(f, p / f.name)
            os.replace(tmp / MANIFEST, p / MANIFEST)
            tmp.rmdir()
            logging.getLogger(__name__).warning(
                "%s: completed a checkpoint save that was interrupted", p)
        else:
            shutil.rmtree(tmp)
    except OSError as exc:
        raise VlpError(f"{p}: a checkpoint save was interrupted and cannot be completed here "
                       f"({exc.strerror}): run the same command where {p} is writable") from None


def save_checkpoint(directory: str | Path, model: Any, tokenizer: Any, meta: dict,
                    recipe: Any | None = None) -> Path:
    """Write config, weights, tokenizer, recipe, meta and a manifest of their hashes.

    Every file is written complete into `directory/.checkpoint-partial/` and then moved into
    place, the manifest last: a kill leaves whole files, and a mix of two saves is caught by
    the manifest (`vlp verify`, and every load).
    """
    import shutil

    from vlp_cli.config import save_recipe
    from vlp_cli.runstate import fsync_dir, save_safetensors, write_manifest

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / PARTIAL
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # A failed write (a full disk) leaves only the partial folder; what OUT held is untouched.
    save_safetensors(state, tmp / WEIGHTS, {"format": "pt", "vlp_version": __version__})
    (tmp / CONFIG).write_text(json.dumps({"model_type": "vlp", **model.config.to_dict()},
                                         indent=2), encoding="utf-8")
    tokenizer.save_pretrained(str(tmp))
    if recipe is not None:
        save_recipe(recipe, tmp)
    full = {"vlp_version": __version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
    (tmp / META).write_text(json.dumps(full, indent=2), encoding="utf-8")
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for name in files:
        with (tmp / name).open("rb+") as f:
            os.fsync(f.fileno())
    write_manifest(tmp, files)
    faults.point("checkpoint:written")
    for i, name in enumerate(files):
        os.replace(tmp / name, out / name)
        if i == len(files) // 2:
            faults.point("checkpoint:half-moved")
    os.replace(tmp / MANIFEST, out / MANIFEST)
    fsync_dir(out)
    tmp.rmdir()
    return out


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlpError(f"{path} is missing: {what} is incomplete") from None
    except (ValueError, UnicodeDecodeError):
        raise VlpError(f"{path} is damaged (not valid JSON): {what} cannot be used; run "
                       f"`vlp verify {path.parent}`") from None
    if not isinstance(data, dict):
        raise VlpError(f"{path} is damaged (not a JSON object)")
    return data


def read_meta(directory: str | Path) -> dict:
    p = Path(directory)
    if not is_checkpoint(p):
        raise VlpError(f"{p} is not a vlp checkpoint directory (needs {CONFIG} and {META}); "
                       "pass the --out of `vlp pretrain` or `vlp finetune`")
    return _read_json(p / META, f"checkpoint {p}")


def checkpoint_fingerprint(directory: str | Path) -> str:
    """Identifies a checkpoint's contents (its manifest, or its meta for older ones)."""
    import xxhash

    p = Path(directory)
    src = p / MANIFEST if (p / MANIFEST).is_file() else p / META
    return xxhash.xxh3_64_hexdigest(src.read_bytes()) if src.is_file() else ""


def verify_checkpoint(directory: str | Path) -> dict:
    """Check every file of a checkpoint against its manifest, and its weights for NaN/inf.

    Returns a report; raises VlpError naming the first problem.
    """
    from vlp_cli.runstate import check_manifest

    p = Path(directory)
    read_meta(p)
    report: dict[str, Any] = {"kind": "checkpoint", "path": str(p)}
    if (p / MANIFEST).is_file():
        manifest = check_manifest(p, f"checkpoint {p}")
        report["files_checked"] = len(manifest["files"])
    else:
        report["files_checked"] = 0
        report["note"] = "written before vlp kept manifests: file hashes cannot be checked"
    state = _load_weights(p)
    report["tensors"] = len(state)
    report["non_finite_tensors"] = _non_finite(state)
    if report["non_finite_tensors"]:
        raise VlpError(f"{p / WEIGHTS} holds non-finite values (NaN or inf) in "
                       f"{report['non_finite_tensors'][0]}: the run that wrote it diverged")
    states = sorted((p / "state").glob("step-*")) if (p / "state").is_dir() else []
    for s in states:
        check_manifest(s, f"training state {s}")
    report["training_states_checked"] = len(states)
    report["ok"] = True
    return report


def _load_weights(p: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (p / WEIGHTS).is_file():
        raise VlpError(f"{p / WEIGHTS} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlpError(f"{p / WEIGHTS} is damaged ({str(exc).splitlines()[0][:100]}): "
                       "fine-tune or pre-train it again, or restore it") from None


def _non_finite(state: dict) -> list[str]:
    import torch

    return [k for k, v in state.items() if v.is_floating_point() and not bool(
        torch.isfinite(v).all())]


def load_checkpoint(directory: str | Path) -> tuple[Any, Any, dict]:
    """(model, tokenizer, meta) from a checkpoint directory; weights via safetensors only.

    The files are checked against the manifest first, and weights holding NaN or inf are
    refused: a diverged run must not be evaluated into plausible numbers.
    """
    import logging

    from vlp_cli.model import ModelConfig, VLPModel
    from vlp_cli.runstate import check_manifest

    p = Path(directory)
    meta = read_meta(p)
    if (p / MANIFEST).is_file():
        check_manifest(p, f"checkpoint {p}")
    else:
        logging.getLogger(__name__).info("%s has no manifest (written by an older vlp): its "
                                         "files cannot be checked for damage", p)
    raw = _read_json(p / CONFIG, f"checkpoint {p}")
    raw.pop("model_type", None)
    keymap: dict[str, str] = {}
    if "heads" not in raw:
        raw, keymap = upgrade_config(raw)
    try:
        cfg = ModelConfig(**raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise VlpError(f"{p / CONFIG}: not a vlp model config ({exc})")
    model = VLPModel(cfg)
    state = _load_weights(p)
    for old, new in keymap.items():
        state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    bad = _non_finite(state)
    if bad:
        raise VlpError(f"{p / WEIGHTS} holds non-finite values (NaN or inf) in {bad[0]} and "
                       f"{len(bad) - 1} more tensors: the run that wrote it diverged; it is "
                       "not used")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VlpError(f"{p / WEIGHTS} does not match {p / CONFIG}: missing "
                       f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    tokenizer = load_tokenizer(p)
    return model, tokenizer, meta


def upgrade_config(raw: dict) -> tuple[dict, dict[str, str]]:
    """A schema-1 model config (vlp <= 0.2) as schema 2, and the weight-name prefixes to map
    (`contrast_head.` -> `heads.contrast.`...): each task names the heads it had then."""
    from vlp_cli.tasks import TASKS

    specs, keymap = [], {}
    for task in TASKS.values():
        for old, spec in task.legacy_heads(raw):
            if all(s.name != spec.name for s in specs):
                specs.append(spec)
                keymap[f"{old}."] = f"heads.{spec.name}."
    new = {k: v for k, v in raw.items()
           if k in ("bert", "img_feat_dim", "pos_dim", "img_dropout", "fresh_weights")}
    new.update(heads=[s.to_dict() for s in specs], schema=2)
    return new, keymap


def describe(directory: str | Path) -> dict:
    """Task, step, sizes and provenance of a checkpoint, for `vlp inspect`."""
    from safetensors import safe_open

    p = Path(directory)
    meta = read_meta(p)
    cfg = _read_json(p / CONFIG, f"checkpoint {p}")
    from safetensors import SafetensorError

    from vlp_cli.runstate import list_states

    n = 0
    try:
        with safe_open(str(p / WEIGHTS), framework="pt") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                size = 1
                for s in shape:
                    size *= s
                n += size
    except (SafetensorError, OSError) as exc:
        raise VlpError(f"{p / WEIGHTS} is damaged or missing ({str(exc).splitlines()[0][:100]})"
                       ) from None
    bert = cfg.get("bert", {})
    return {
        "kind": "checkpoint",
        "path": str(p),
        "task": meta.get("task"),
        "step": meta.get("step"),
        "parameters": n,
        "encoder": {k: bert.get(k) for k in ("hidden_size", "num_hidden_layers",
                                             "num_attention_heads", "vocab_size")},
        "img_feat_dim": cfg.get("img_feat_dim"),
        "heads": cfg.get("heads") if "heads" in cfg else "schema 1 (vlp <= 0.2)",
        "resumable": bool(list_states(p)),
        "training_states": list_states(p),
        "meta": {k: v for k, v in meta.items() if k not in ("answers", "tasks")},
        "tasks": sorted(meta.get("tasks", {})),
    }
