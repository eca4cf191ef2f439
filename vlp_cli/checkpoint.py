"""Checkpoint directories that describe themselves.

    ckpt/
      config.json          ModelConfig (BERT config + image embedder + heads)
      model.safetensors    weights (the tied MLM decoder is the word-embedding matrix)
      tokenizer files      vocab.txt, tokenizer.json, tokenizer_config.json, ...
      recipe.yaml          the resolved recipe that produced it
      meta.json            vlp version, task, step, corpus fingerprint, the feature store's
                           extractor identity and dimension, answer vocabulary (vqa)
      metrics.jsonl        training log
      state/               accelerate training state, for --resume

A later stage reads meta.json to check that it is fed matching features, or to extract
matching features from raw images.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from vlp_cli import VlpError, __version__

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
META = "meta.json"


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
    return (p / CONFIG).is_file() and (p / META).is_file()


def save_checkpoint(directory: str | Path, model: Any, tokenizer: Any, meta: dict,
                    recipe: Any | None = None) -> Path:
    """Write config, weights, tokenizer, recipe and meta into `directory`."""
    from safetensors.torch import save_file

    from vlp_cli.config import save_recipe

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "vlp_version": __version__})
    tmp.replace(out / WEIGHTS)  # never a half-written weights file under the real name
    (out / CONFIG).write_text(json.dumps({"model_type": "vlp", **model.config.to_dict()},
                                         indent=2), encoding="utf-8")
    tokenizer.save_pretrained(str(out))
    if recipe is not None:
        save_recipe(recipe, out)
    full = {"vlp_version": __version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
    (out / META).write_text(json.dumps(full, indent=2), encoding="utf-8")
    return out


def read_meta(directory: str | Path) -> dict:
    p = Path(directory)
    if not is_checkpoint(p):
        raise VlpError(f"{p} is not a vlp checkpoint directory (needs {CONFIG} and {META}); "
                       "pass the --out of `vlp pretrain` or `vlp finetune`")
    return json.loads((p / META).read_text(encoding="utf-8"))


def load_checkpoint(directory: str | Path) -> tuple[Any, Any, dict]:
    """(model, tokenizer, meta) from a checkpoint directory; weights via safetensors only."""
    from safetensors.torch import load_file

    from vlp_cli.model import ModelConfig, VLPModel

    p = Path(directory)
    meta = read_meta(p)
    raw = json.loads((p / CONFIG).read_text(encoding="utf-8"))
    raw.pop("model_type", None)
    try:
        cfg = ModelConfig(**raw)
    except TypeError as exc:
        raise VlpError(f"{p / CONFIG}: not a vlp model config ({exc})")
    model = VLPModel(cfg)
    if not (p / WEIGHTS).is_file():
        raise VlpError(f"{p / WEIGHTS} is missing: the checkpoint is incomplete")
    state = load_file(str(p / WEIGHTS))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VlpError(f"{p / WEIGHTS} does not match {p / CONFIG}: missing "
                       f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    tokenizer = load_tokenizer(p)
    return model, tokenizer, meta


def describe(directory: str | Path) -> dict:
    """Task, step, sizes and provenance of a checkpoint, for `vlp inspect`."""
    from safetensors import safe_open

    p = Path(directory)
    meta = read_meta(p)
    cfg = json.loads((p / CONFIG).read_text(encoding="utf-8"))
    n = 0
    with safe_open(str(p / WEIGHTS), framework="pt") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            size = 1
            for s in shape:
                size *= s
            n += size
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
        "num_answers": cfg.get("num_answers"),
        "resumable": (p / "state").is_dir(),
        "meta": {k: v for k, v in meta.items() if k != "answers"},
    }
