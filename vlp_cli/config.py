"""Typed recipes: every default lives here, an unknown or misspelt key is an error.

A recipe is a YAML file whose sections map onto the dataclasses below. `load_recipe` reads it
with `yaml.safe_load`, applies `--set a.b=c` overrides, and checks every key and type; the
resolved recipe is written into every output directory (`recipe.yaml`), so a run can be
repeated from its output alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlp_cli import VlpError


@dataclass
class TrainCfg:
    """One optimisation run: the explicit Accelerate loop in training.py reads only this."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    eval_every: int = 200  # held-out metrics every N optimiser steps (0: only at the end)
    eval_batches: int = 20  # held-out batches per evaluation (0: the whole split)
    # Crash safety: the whole training state (runstate.py) is saved every `save_every` steps
    # (0: not by count), at least every `save_minutes` of wall time (0: not by time), on
    # SIGTERM/SIGINT and at the end; the newest `keep_states` are kept.
    save_every: int = 500
    save_minutes: float = 5.0
    keep_states: int = 2
    max_nonfinite: int = 10  # non-finite losses in a row (each update skipped) before stopping
    log_every: int = 20
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = 0  # DataLoader workers per process


@dataclass
class ExtractCfg:
    """Region features from pixels (vlp extract-features)."""

    backbone: Literal["efficientnet-lite0"] = "efficientnet-lite0"
    min_size: int = 224  # shorter image side fed to the backbone
    max_size: int = 640  # cap on the longer side, bounds memory on huge images
    roi_output: int = 3  # RoIAlign grid per box, averaged into one vector
    # Boxes and tags: "yolov3-tiny" (embedded COCO detector), "darknet" (detector_cfg,
    # detector_weights, detector_labels), or "grid" (whole image plus grid x grid cells, no
    # tags). --boxes FILE overrides all three.
    detector: Literal["yolov3-tiny", "darknet", "grid"] = "yolov3-tiny"
    detector_cfg: str = ""
    detector_weights: str = ""
    detector_labels: str = ""
    detector_input: int = 0  # network input side; 0 = the cfg's width
    # Every box above this low threshold is kept; recipes choose at read time (data.conf_th,
    # min_boxes, max_boxes), so one extraction serves every recipe.
    keep_conf_th: float = 0.05
    nms_iou: float = 0.45
    max_detections: int = 100
    fallback_grid: int = 3
    batch_size: int = 32
    num_workers: int = 0
    commit_every: int = 256  # records per LMDB write transaction


@dataclass
class DataCfg:
    """How examples are assembled from a corpus and a feature store (shared by every stage)."""

    max_text_len: int = 35  # [CLS] words [SEP] tags [SEP], in word pieces (Oscar pre-training: 35)
    max_tag_len: int = 15  # word pieces of tags kept at most, before pair truncation
    max_regions: int = 50  # regions fed to the model (Oscar: 50)
    conf_th: float = 0.2  # read-time box selection, UNITER's policy: conf >= 0.2 ...
    min_boxes: int = 10  # ... but at least 10 ...
    max_boxes: int = 100  # ... and at most 100 boxes
    image_region: bool = True  # prepend the whole-image region (no tag) when the store has one
    pos_kind: Literal["uniter7", "oscar6"] = "uniter7"
    use_tags: bool = True


@dataclass
class CorpusCfg:
    """Corpus building (vlp build-corpus)."""

    tokenizer: str = "embedded:minilm"  # HF tokenizer dir or hub id
    val_fraction: float = 0.1  # of train images held out as 'val' (by image, never by example)
    max_answers: int = 3129  # VQA answer vocabulary size (VQA v2 practice)
    seed: int = 0


@dataclass
class ModelCfg:
    """The single-stream encoder and its heads."""

    init: str = "embedded:minilm"  # HF BERT checkpoint dir or hub id; "random:tiny" for tests
    img_dropout: float = 0.1


@dataclass
class PretrainCfg:
    """Oscar pre-training: masked token loss over words and tags, polluted-tag contrastive."""

    train: TrainCfg = field(default_factory=TrainCfg)
    mask_prob: float = 0.15
    # Oscar: with p=0.5 the pair is polluted: its tags are replaced by another image's.
    pollute_prob: float = 0.5
    # Oscar+ (VinVL): of that, p=0.25 (absolute, as `texta_false_prob` in the Oscar code)
    # replaces the caption instead, and the [CLS] head classifies 3 ways. 0 keeps Oscar's
    # binary loss.
    caption_pollute_prob: float = 0.0
    contrastive_weight: float = 1.0
    text: list[str] = field(default_factory=lambda: ["caption"])  # corpus kinds used as text


@dataclass
class VqaCfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    max_text_len: int = 128
    classifier: Literal["linear", "mlp"] = "mlp"


@dataclass
class RetrievalCfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    # Oscar draws the negative from any other image (0.0). With p > 0 it is drawn, with that
    # probability, among examples whose image has the same tags: tags are Oscar's anchors, and
    # negatives that share them teach the model to look past them (a cheap stand-in for
    # UNITER's mined hard negatives).
    shared_tag_negatives: float = 0.0
    eval_images: int = 1000  # images in the all-pairs evaluation (0: every unique-caption image)
    eval_batch_size: int = 256


@dataclass
class CaptioningCfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    mask_prob: float = 0.15
    max_masked: int = 3  # Oscar: at most 3 masked caption tokens per example
    label_smoothing: float = 0.1
    max_caption_len: int = 20  # word pieces of caption, in training and decoding


@dataclass
class Recipe:
    """A whole recipe. Sections a stage does not use are carried along untouched."""

    name: str = "unnamed"
    seed: int = 42
    extract: ExtractCfg = field(default_factory=ExtractCfg)
    corpus: CorpusCfg = field(default_factory=CorpusCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)
    vqa: VqaCfg = field(default_factory=VqaCfg)
    retrieval: RetrievalCfg = field(default_factory=RetrievalCfg)
    captioning: CaptioningCfg = field(default_factory=CaptioningCfg)


# ---------------------------------------------------------------------------------------------
# strict conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise VlpError(f"{source}: '{where}' must be a section (mapping), got {value!r}")
        return _build(tp, value, where, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where, source)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise VlpError(
                f"{source}: '{where}' must be one of {', '.join(map(str, args))}; "
                f"got {value!r}{hint}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise VlpError(f"{source}: '{where}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise VlpError(f"{source}: '{where}' needs {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{where}[{i}]", source) for i, (v, a) in
                         enumerate(zip(value, args)))
        item = args[0] if args else Any
        seq = [_convert(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept what anyone means by it.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is Any:
        return value
    raise VlpError(f"{source}: '{where}' must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise VlpError(f"{source}: unknown key '{where}'{hint}")
        kwargs[key] = _convert(value, hints[key], where, source)
    return cls(**kwargs)


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    """Build a Recipe from plain data, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VlpError(f"{source}: a recipe must be a YAML mapping of sections")
    return _build(Recipe, data, "", source)


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to nested plain data."""
    for item in overrides:
        if "=" not in item:
            raise VlpError(f"{source} {item!r}: expected KEY=VALUE, e.g. pretrain.train.lr=1e-4")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise VlpError(f"{source} {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_recipe_data(path: str | Path) -> dict:
    """Read a recipe file as plain data (safe YAML only)."""
    path = Path(path)
    if not path.is_file():
        builtin = Path(__file__).resolve().parent.parent / "recipes" / f"{path.name}.yaml"
        if not path.suffix and builtin.is_file():
            path = builtin
        else:
            raise VlpError(f"recipe {path} not found: pass a YAML file (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise VlpError(f"recipe {path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})")
    return data or {}


def load_recipe(path: str | Path | None, overrides: list[str] | None = None,
                base: dict | None = None) -> Recipe:
    """Load and check a recipe.

    Args:
        path: the recipe YAML, or None to start from `base` (or the defaults).
        overrides: `a.b=c` strings applied on top.
        base: plain data used when `path` is None (e.g. the recipe stored in a checkpoint).
    """
    data = load_recipe_data(path) if path is not None else dict(base or {})
    source = str(path) if path is not None else "recipe"
    if overrides:
        data = apply_overrides(data, list(overrides))
    return recipe_from_dict(data, source)


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain data for YAML/JSON (tuples become lists)."""

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return fix(dataclasses.asdict(recipe))


def save_recipe(recipe: Recipe, directory: str | Path) -> Path:
    """Write the resolved recipe into an output directory."""
    path = Path(directory) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")
    return path
