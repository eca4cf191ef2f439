"""Typed recipes: every default lives here, an unknown or misspelt key is an error.

A recipe is a YAML file whose sections map onto the dataclasses below. `load_recipe` reads it
with `yaml.safe_load`, applies `--set a.b=c` overrides, and checks every key and type; the
resolved recipe is written into every output directory (`recipe.yaml`), so a run can be
repeated from its output alone.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlp_cli import VlpError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# ranges: declared beside each field, checked by load_recipe with the dotted key named


@dataclass(frozen=True)
class Range:
    """The values a numeric field (or each item of a numeric tuple) may take."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str = ""  # said after the range when a value is refused

    def ok(self, v: float) -> bool:
        # Written so that NaN fails every comparison.
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def text(self) -> str:
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            return (f"in {'[' if self.ge is not None else '('}{low:g}, {high:g}"
                    f"{']' if self.le is not None else ')'}")
        if low is not None:
            return f"{'>=' if self.ge is not None else '>'} {low:g}"
        return f"{'<=' if self.le is not None else '<'} {high:g}"


def num(default: Any, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, why: str = "") -> Any:
    """A numeric field with its allowed range."""
    return field(default=default, metadata={"range": Range(ge, gt, le, lt, why)})


def prob(default: float, why: str = "") -> Any:
    """A probability or fraction: in [0, 1]."""
    return num(default, ge=0, le=1, why=why)


# Cross-field rules: each yields (message) with keys spelt through `k`, which adds the dotted
# prefix of the section being checked.
Key = Callable[[str], str]


@dataclass
class TrainCfg:
    """One optimisation run: the explicit Accelerate loop in training.py reads only this."""

    steps: int = num(1000, ge=1, why="optimiser steps")
    batch_size: int = num(32, ge=1, why="examples per process per step")
    lr: float = num(5e-5, gt=0)
    # the task heads' learning rate, as a multiple of `lr` (UNITER's VQA: 10)
    head_lr_mult: float = num(1.0, gt=0)
    warmup_steps: int = num(100, ge=0)
    weight_decay: float = num(0.01, ge=0)
    betas: tuple[float, float] = num((0.9, 0.999), ge=0, lt=1)
    grad_accum: int = num(1, ge=1, why="1: no accumulation")
    max_grad_norm: float = num(1.0, ge=0, why="0: no clipping")
    # held-out metrics every N optimiser steps (0: only at the end)
    eval_every: int = num(200, ge=0)
    eval_batches: int = num(20, ge=0)  # held-out batches per evaluation (0: the whole split)
    eval_at_start: bool = False  # also before the first step: where each statistic starts
    # Accelerate trackers that also receive every metrics row (e.g. [tensorboard], [wandb]);
    # files under OUT/trackers. metrics.jsonl is written either way.
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml",
                           "dvclive", "swanlab", "trackio"]] = field(default_factory=list)
    # Crash safety: the whole training state (runstate.py) is saved every `save_every` steps
    # (0: not by count), at least every `save_minutes` of wall time (0: not by time), on
    # SIGTERM/SIGINT and at the end; the newest `keep_states` are kept.
    save_every: int = num(500, ge=0)
    save_minutes: float = num(5.0, ge=0)
    keep_states: int = num(2, ge=1)
    # non-finite losses in a row (each update skipped) before the run stops
    max_nonfinite: int = num(10, ge=1)
    log_every: int = num(20, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = num(0, ge=0)  # DataLoader workers per process
    # "fixed": batches of `batch_size` examples. "units" (UNITER): length-bucketed batches of
    # at most `max_units` padded positions (longest member's text tokens + regions, times the
    # count), sorted within buckets of `bucket_size` shuffled examples (data/buckets.py);
    # `batch_size` then only sizes the held-out batches.
    batching: Literal["fixed", "units"] = "fixed"
    max_units: int = num(10240, ge=1, why="UNITER: 10240")
    bucket_size: int = num(8192, ge=1, why="UNITER: 8192")

    def problems(self, k: Key) -> Iterator[str]:
        if self.batching == "units" and self.max_units < 8:
            yield (f"'{k('max_units')}' ({self.max_units}) is a budget of padded positions per "
                   f"batch (longest example x count): it must hold at least one example, "
                   f"e.g. --set {k('max_units')}=10240 (UNITER's)")
        if self.warmup_steps > self.steps:
            # Refused rather than scaled: a schedule that silently changes is worse.
            yield (f"'{k('warmup_steps')}' ({self.warmup_steps}) is more than "
                   f"'{k('steps')}' ({self.steps}): the learning rate would never finish "
                   f"warming up; pass e.g. --set {k('warmup_steps')}="
                   f"{max(self.steps // 10, 0)} (10% of the steps)")


@dataclass
class ExtractCfg:
    """Region features from pixels (vlp extract-features).

    The defaults suit real photos (a 640 x 480 photo is fed to the backbone at 299 x 224); the
    demo's 64-pixel images use recipes/tiny.yaml's own sizes.
    """

    backbone: Literal["efficientnet-lite0"] = "efficientnet-lite0"
    min_size: int = num(224, ge=1)  # shorter image side fed to the backbone
    max_size: int = num(640, ge=1)  # cap on the longer side, bounds memory on huge images
    roi_output: int = num(3, ge=1)  # RoIAlign grid per box, averaged into one vector
    # Also pool the backbone's map at this finer stride (4, 8 or 16; 0: none) and append its
    # channels (efficientnet-lite0: 24, 40, 112): the stride-32 map keeps little colour (a
    # linear probe reads easy-VQA's colours at 98% from it, 100% from stride 8's 40 channels),
    # which VinVL's detector learns through its attribute head. Feature-pyramid practice.
    fine_stride: Literal[0, 4, 8, 16] = 0
    # Boxes and tags: "yolov3-tiny" (embedded COCO detector), "darknet" (detector_cfg,
    # detector_weights, detector_labels), or "grid" (whole image plus grid x grid cells, no
    # tags). --boxes FILE overrides all three.
    detector: Literal["yolov3-tiny", "darknet", "grid"] = "yolov3-tiny"
    detector_cfg: str = ""
    detector_weights: str = ""
    detector_labels: str = ""
    detector_input: int = num(0, ge=0)  # network input side, a multiple of 32; 0 = the cfg's
    # Every box above this low threshold is kept; recipes choose at read time (data.conf_th,
    # min_boxes, max_boxes), so one extraction serves every recipe.
    keep_conf_th: float = prob(0.05)
    nms_iou: float = prob(0.45)
    max_detections: int = num(100, ge=1)
    fallback_grid: int = num(3, ge=1)
    batch_size: int = num(32, ge=1)
    num_workers: int = num(0, ge=0)
    commit_every: int = num(256, ge=1)  # records per LMDB write transaction

    def problems(self, k: Key) -> Iterator[str]:
        if self.min_size > self.max_size:
            yield (f"'{k('min_size')}' ({self.min_size}) is more than '{k('max_size')}' "
                   f"({self.max_size}): raise max_size or lower min_size")
        if self.detector_input % 32:
            yield (f"'{k('detector_input')}' must be 0 (the cfg's size) or a multiple of 32, "
                   f"got {self.detector_input}")


# `[CLS] word [SEP] tag [SEP]`: three special tokens and at least one word and one tag.
MIN_TEXT_LEN = 5


@dataclass
class DataCfg:
    """How examples are assembled from a corpus and a feature store (shared by every stage)."""

    # [CLS] words [SEP] tags [SEP], in word pieces (Oscar pre-training: 35)
    max_text_len: int = num(35, ge=MIN_TEXT_LEN, why="[CLS] word [SEP] tag [SEP] needs 5")
    max_tag_len: int = num(15, ge=0)  # word pieces of tags kept at most, before pair truncation
    max_regions: int = num(50, ge=1)  # regions fed to the model (Oscar: 50)
    conf_th: float = prob(0.2)  # read-time box selection, UNITER's policy: conf >= 0.2 ...
    min_boxes: int = num(10, ge=0)  # ... but at least 10 ...
    max_boxes: int = num(100, ge=1)  # ... and at most 100 boxes
    image_region: bool = True  # prepend the whole-image region (no tag) when the store has one
    pos_kind: Literal["uniter7", "oscar6"] = "uniter7"
    use_tags: bool = True
    # A text-only model for baselines: every region's features and position are zeros and no
    # tags are read (the regions' count is kept, so region-scoring heads keep their candidates).
    blank_regions: bool = False

    def problems(self, k: Key) -> Iterator[str]:
        if self.min_boxes > self.max_boxes:
            yield (f"'{k('min_boxes')}' ({self.min_boxes}) is more than '{k('max_boxes')}' "
                   f"({self.max_boxes})")


@dataclass
class CorpusCfg:
    """Corpus building (vlp build-corpus)."""

    tokenizer: str = "embedded:minilm"  # HF tokenizer dir or hub id
    # Of train images, moved to 'val' when the sources give no val split (by image, never by
    # example); 0 keeps every train image for training.
    val_fraction: float = num(0.1, ge=0, lt=1, why="1 would leave no training images")
    seed: int = num(0, ge=0, le=2**32 - 1)
    # The feature-store key of each image, from the key its reader gives (the data set's own
    # file name, readers/): a Python format string over {key} (as the reader gives it),
    # {stem} (without its extension), {lower} (the stem in lower case) and {id} (the number
    # that ends the stem, an integer: {id:012d}). For stores imported from released features:
    # Oscar / VinVL TSVs of COCO "{id}"; UNITER's npz of COCO "{lower}.npz", of NLVR2
    # "nlvr2_{stem}.npz", of Flickr30K "flickr30k_{stem}.npz". On the command line, quote
    # the braces for YAML: --set 'corpus.image_keys="{id}"'.
    image_keys: str = "{key}"


@dataclass
class ModelCfg:
    """The single-stream encoder and its heads."""

    # HF BERT checkpoint dir or hub id; or a random model of a preset's size (model.py):
    # "random:tiny" (tests), "random:base", "random:large"; or a vlp checkpoint, from which
    # `vlp pretrain` goes on (UNITER's second stage on VCR)
    init: str = "embedded:minilm"
    img_dropout: float = prob(0.1)
    # How regions enter the encoder. "uniter": LN(Linear(features)) + LN(Linear(7 position
    # numbers)) + type embedding, then LN. "oscar": one Linear over the features concatenated
    # with 6 position numbers, then LN (VinVL's use_img_layernorm), no type embedding; needs
    # data.pos_kind oscar6. Released Oscar / UNITER weights load into their own embedder.
    image_embedder: Literal["uniter", "oscar"] = "uniter"
    # Sine and cosine of each position number at this many octaves (pi, 2 pi, 4 pi, ...) join
    # the numbers before the position Linear. 0: the numbers alone, as UNITER and Oscar (and
    # their released weights) take them. LN(Linear(p)) is blind to a box's size (model.py,
    # `fourier_positions`); the demo's recipes use 4 (README, "Where the box is").
    pos_fourier: int = num(0, ge=0, le=12, why="octaves of pi: 12 resolves 1/4096 of the image")
    # Recompute each layer's activations in the backward pass instead of keeping them: about a
    # third more compute for much less memory (base-size recipes on one consumer GPU).
    gradient_checkpointing: bool = False


@dataclass
class PretrainCfg:
    """vlp pretrain: the objectives mixed (tasks of stage "pretrain") and the optimisation.

    Each optimiser step runs one objective, drawn with these ratios from an RNG seeded the same
    on every process (UNITER's MetaLoader); each objective's settings are its own section.
    """

    train: TrainCfg = field(default_factory=TrainCfg)
    tasks: dict[str, float] = field(default_factory=lambda: {"oscar": 1.0})
    # UNITER's masked objectives (mlm, mrfr, mrc, mrckl) mask one modality at a time and keep
    # the other whole ("conditional", the paper's choice); "joint" masks words and regions in
    # the same example (the ablation of UNITER Table 2, L12).
    masking: Literal["conditional", "joint"] = "conditional"
    # Several corpora, each built by `vlp build-corpus` on its own feature store, sampled by
    # ratio (both papers pre-train on a union), each with its own objectives when it names
    # them (UNITER's per-dataset "tasks" and "mix_ratio"). Entries without directories
    # describe the command line's --corpus / --features, in order (the demo's way); without
    # entries, every corpus of the command line has ratio 1 and `tasks`.
    corpora: list[CorpusSourceCfg] = field(default_factory=list)

    def problems(self, k: Key) -> Iterator[str]:
        if not self.tasks:
            yield f"'{k('tasks')}' is empty: name at least one objective, e.g. {{oscar: 1}}"
        for name, ratio in self.tasks.items():
            if not ratio > 0:
                yield f"'{k('tasks')}.{name}' must be > 0 (a mix ratio), got {ratio!r}"
        if len({bool(e.corpus or e.features) for e in self.corpora}) > 1:
            yield (f"'{k('corpora')}': give every entry its directories, or none (entries "
                   "without them describe the command line's --corpus, in order)")
        for i, e in enumerate(self.corpora):
            for name, ratio in e.tasks.items():
                where = f"{k('corpora')}[{i}].tasks.{name}"
                if name not in self.tasks:
                    yield (f"'{where}': a corpus picks among the run's objectives "
                           f"('{k('tasks')}': {', '.join(self.tasks)}), and {name} is not "
                           f"one: name one of them, add {name} there, or drop the "
                           f"per-corpus mixes with --set '{k('corpora')}=[]'")
                elif not ratio > 0:
                    yield f"'{where}' must be > 0 (a mix ratio), got {ratio!r}"
        if self.corpora and all(e.tasks for e in self.corpora):
            idle = [n for n in self.tasks if not any(n in e.tasks for e in self.corpora)]
            if idle:
                yield (f"'{k('tasks')}': {', '.join(idle)} runs on no corpus (no "
                       f"'{k('corpora')}' entry's tasks names it): add it to one, or remove it")


@dataclass
class CorpusSourceCfg:
    """One corpus of a pre-training union."""

    corpus: str = ""  # a corpus directory (vlp build-corpus); empty: the command line's
    features: str = ""  # the feature store it was built on
    ratio: float = num(1.0, gt=0, why="a sampling ratio")
    # The objectives run on this corpus and their ratios (a subset of pretrain.tasks, whose
    # sections configure them); empty: pretrain.tasks. A stream's weight is its objective's
    # ratio times the corpus's.
    tasks: dict[str, float] = field(default_factory=dict)

    def problems(self, k: Key) -> Iterator[str]:
        if bool(self.corpus) != bool(self.features):
            yield f"'{k('corpus')}' and '{k('features')}' are both needed (directories)"


@dataclass
class MaskedObjectiveCfg:
    """What UNITER's masked objectives share: the texts read, the masking rate, and whether
    Oscar's object tags join the text (UNITER's inputs have none)."""

    text: list[str] = field(default_factory=lambda: ["caption"])  # corpus kinds used as text
    mask_prob: float = prob(0.15)  # of the words (mlm) or of the regions (mrfr, mrc, mrckl)
    tags: bool = False


@dataclass
class MlmCfg(MaskedObjectiveCfg):
    """UNITER's masked language modelling: 15% of the word pieces, 80/10/10, regions whole."""


@dataclass
class MrfrCfg(MaskedObjectiveCfg):
    """Masked region feature regression: L2 to the masked regions' input features, through a
    layer tied to the image embedding."""


@dataclass
class MrcCfg(MaskedObjectiveCfg):
    """Masked region classification: cross-entropy to the detector's top class."""


@dataclass
class MrcklCfg(MaskedObjectiveCfg):
    """Masked region classification with KL divergence to the detector's class distribution."""


@dataclass
class ItmCfg:
    """Image-text matching (2-way on [CLS]; negatives by swapping the image) with word-region
    alignment by optimal transport (WRA) computed in the same step."""

    text: list[str] = field(default_factory=lambda: ["caption"])
    neg_prob: float = prob(0.5)  # UNITER: half the pairs get another image
    tags: bool = False
    wra_weight: float = num(0.1, ge=0, why="0: no WRA")  # UNITER's itm_ot_lambda
    ot_beta: float = num(0.5, gt=0)  # IPOT's proximal step (UNITER appendix Algorithm 1)
    ot_iters: int = num(50, ge=1)


@dataclass
class OscarCfg:
    """Oscar pre-training: masked token loss over words and tags, polluted-tag contrastive."""

    mask_prob: float = prob(0.15)
    # Oscar: with p=0.5 the pair is polluted: its tags are replaced by another image's.
    pollute_prob: float = prob(0.5)
    # Oscar+ (VinVL): of that, p=0.25 (absolute, as `texta_false_prob` in the Oscar code)
    # replaces the caption instead, and the [CLS] head classifies 3 ways. 0 keeps Oscar's
    # binary loss.
    caption_pollute_prob: float = prob(0.0)
    contrastive_weight: float = num(1.0, ge=0)
    text: list[str] = field(default_factory=lambda: ["caption"])  # corpus kinds used as text

    def problems(self, k: Key) -> Iterator[str]:
        if self.caption_pollute_prob > self.pollute_prob:
            yield (f"'{k('caption_pollute_prob')}' ({self.caption_pollute_prob:g}) is a part "
                   f"of '{k('pollute_prob')}' ({self.pollute_prob:g}) and cannot exceed it")


@dataclass
class VqaCfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    max_text_len: int = num(128, ge=MIN_TEXT_LEN, why="[CLS] word [SEP] tag [SEP] needs 5")
    # "mlp" (UNITER's) or "linear" on the pooled [CLS]; "masked_tokens": a [MASK] after the
    # question, answered by the pre-training's masked-token head (tasks/vqa.py)
    classifier: Literal["linear", "mlp", "masked_tokens"] = "mlp"
    # answers kept: the most frequent of the train and val examples (VQA v2 practice: 3,129)
    max_answers: int = num(3129, ge=1)
    # Resampling of the train questions by their most common answer: each question drawn with
    # weight count(answer)^-answer_balance (0: as they come, 0.5: square-root balancing, 1: every
    # answer equally often). Neither Oscar nor UNITER does it (0 by default); it helps where a
    # few answers dominate (easy-VQA: 74% yes/no, colour 13%).
    answer_balance: float = num(0.0, ge=0.0, le=1.0)


@dataclass
class GqaCfg(VqaCfg):
    """GQA (tasks/gqa.py): the VQA model and its keys; every answer of GQA's balanced train
    and val questions fits the default vocabulary."""

    max_answers: int = num(2000, ge=1)


@dataclass
class Nlvr2Cfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    max_text_len: int = num(60, ge=MIN_TEXT_LEN, why="UNITER: 60")
    # UNITER's three ways to read two images (tasks/nlvr2.py); its released config trains
    # "paired-attn", here "pair-biattn", its best.
    setting: Literal["pair", "pair-biattn", "triplet"] = "pair-biattn"
    # UNITER's use_img_type (its code, default on; the paper is silent): the second image's
    # regions take token type 2 in every setting, so that in "pair" and "pair-biattn" each
    # sequence knows whether it holds the left or the right image ("the left image contains
    # ..."). false: type 1 for both, as vlp did before (the triplet setting keeps 2 either way).
    image_types: bool = True


@dataclass
class SnliVeCfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    max_text_len: int = num(60, ge=MIN_TEXT_LEN, why="UNITER: 60")


@dataclass
class RefcocoCfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    max_text_len: int = num(60, ge=MIN_TEXT_LEN, why="UNITER: 60")


@dataclass
class VcrCfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    # question + answer + rationale, with region references written out: longer than the
    # other tasks' texts
    max_text_len: int = num(200, ge=MIN_TEXT_LEN)


@dataclass
class RetrievalCfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    # Oscar draws the negative from any other image (0.0). With p > 0 it is drawn, with that
    # probability, among examples whose image has the same tags: tags are Oscar's anchors, and
    # negatives that share them teach the model to look past them (a cheap stand-in for
    # UNITER's mined hard negatives).
    shared_tag_negatives: float = prob(0.0)
    # images in the all-pairs evaluation (0: every unique-caption image)
    eval_images: int = num(1000, ge=0)
    eval_batch_size: int = num(256, ge=1)
    # The training loss. "binary": Oscar's matched/unmatched classifier on [CLS] (one
    # negative per caption). "ranking": UNITER's, a score per pair (Linear(H, 1) on [CLS]),
    # sigmoid, hinge max(0, margin + s(neg) - s(pos)) over negatives: per caption
    # `sampled_negatives` other images and as many other captions are scored with the current
    # model (no gradient, every step) and the `hard_negatives` hardest of each kind are
    # trained on (UNITER: 399 sampled, 31 kept; hard_negatives >= sampled_negatives trains on
    # all of them, UNITER's plain ranking).
    loss: Literal["binary", "ranking"] = "binary"
    margin: float = num(0.2, gt=0, why="UNITER: 0.2")
    sampled_negatives: int = num(15, ge=1, why="UNITER: 399")
    hard_negatives: int = num(3, ge=1, why="UNITER: 31")
    # A dual-encoder head trained alongside (LAVIS's shortlist: image-text contrastive on
    # the [CLS] of text alone and of tags + regions alone, in-batch negatives); weight 0: none.
    itc_weight: float = num(0.0, ge=0)
    itc_dim: int = num(128, ge=1)
    itc_temperature: float = num(0.05, gt=0)
    # Evaluation. "full": the cross-encoder on every pair. "fast": the dual encoder
    # shortlists `shortlist` candidates per query (both ways) and the cross-encoder re-scores
    # only those; needs itc_weight > 0 in fine-tuning. "both": each, on the same images.
    eval_mode: Literal["full", "fast", "both"] = "full"
    shortlist: int = num(16, ge=1)
    # Also the mean over `folds` equal folds of the evaluated images (COCO 1K: 5 folds of
    # the 5K test images); 0 or 1: none.
    folds: int = num(0, ge=0)


@dataclass
class CaptioningCfg:
    train: TrainCfg = field(default_factory=TrainCfg)
    mask_prob: float = prob(0.15)
    max_masked: int = num(3, ge=1)  # Oscar: at most 3 masked caption tokens per example
    label_smoothing: float = num(0.1, ge=0, lt=1, why="1 would make every target uniform")
    max_caption_len: int = num(20, ge=1)  # word pieces of caption, in training and decoding
    # Decoding (vlp caption, evaluate captioning): 1 is greedy; more is beam search as Oscar
    # ran it (its COCO results: beam 5), hypotheses scored sum log p / length ** penalty.
    beam_size: int = num(1, ge=1)
    length_penalty: float = num(1.0, ge=0, why="0 ranks by the summed log-probability")
    # Reuse the keys and values of tags, regions and the caption prefix between steps (the
    # same captions as re-encoding the sequence every step, as the Oscar code does: false).
    incremental: bool = True
    # Sampling instead of the most likely words: softmax(logits / temperature) within the top
    # k (0: all) and the top-p nucleus, drawn from a generator seeded by the recipe's seed.
    sample: bool = False
    top_k: int = num(0, ge=0, why="0 keeps every token")
    top_p: float = num(1.0, gt=0, le=1, why="1 keeps every token")
    temperature: float = num(1.0, gt=0)
    # Constrained beam search (NoCaps' CBS, as Oscar ran it): the caption must hold at least
    # `min_constraints` of the image's first `max_constraints` distinct tags (by detector
    # confidence), each as its word pieces; beam_size beams per search state.
    constrain_tags: bool = False
    min_constraints: int = num(2, ge=1)
    max_constraints: int = num(3, ge=1)
    # Self-critical sequence training (Oscar's --scst), a second run from a captioning
    # checkpoint: per image `scst_samples` captions are sampled (with the sampling settings
    # above) in training mode; each one's mean token log-probability is weighted by its
    # CIDEr-D minus the baseline's, CIDEr-D with the document frequencies of the training
    # captions. Baseline "greedy": the greedy caption's CIDEr-D (Oscar's default); "mean": the
    # mean of the image's other samples (Oscar's other choice, no extra decode). The batch
    # size of `train` counts images.
    scst: bool = False
    scst_samples: int = num(5, ge=1)
    scst_baseline: Literal["greedy", "mean"] = "greedy"

    def problems(self, k: Key) -> Iterator[str]:
        if self.constrain_tags and self.sample:
            yield (f"'{k('constrain_tags')}' is a beam search; it cannot sample: drop "
                   f"'{k('sample')}'")
        if self.min_constraints > self.max_constraints:
            yield (f"'{k('min_constraints')}' ({self.min_constraints}) is more than "
                   f"'{k('max_constraints')}' ({self.max_constraints}): lower it")
        if self.scst and self.scst_baseline == "mean" and self.scst_samples < 2:
            yield (f"'{k('scst_baseline')}' mean needs other samples: set "
                   f"'{k('scst_samples')}' to 2 or more")
        if self.sample and self.beam_size > 1:
            yield (f"'{k('sample')}' and '{k('beam_size')}' ({self.beam_size}) are two ways to "
                   f"decode: pass --set {k('beam_size')}=1 to sample, or drop the sampling")


@dataclass
class AblateCfg:
    """vlp ablate: the papers' ablations at our scale. Each variant pre-trains with its own
    overrides (or not at all), then every task fine-tunes with the same budget (the tasks'
    sections) and is evaluated on the test split, for each seed."""

    tasks: list[str] = field(default_factory=lambda: ["vqa", "retrieval"])
    seeds: int = num(3, ge=1)
    # variant -> recipe overrides of its pre-training and fine-tuning; "no-pretrain" is the
    # one variant that fine-tunes from the initial weights.
    variants: dict[str, list[str]] = field(default_factory=lambda: {
        "full": [],
        "no-pretrain": [],
        "no-tags": ["data.use_tags=false"],
        "joint-masking": ["pretrain.masking=joint"],
        "no-wra": ["itm.wra_weight=0"],
    })
    # The claims, each (better, worse, source): reproduced when the mean gap exceeds twice
    # the pooled standard deviation.
    claims: list[tuple[str, str, str]] = field(default_factory=lambda: [
        ("full", "no-pretrain", "UNITER Table 2, L1 vs L5: pre-training helps"),
        ("full", "no-tags", "Oscar: object tags as anchors help"),
        ("full", "joint-masking",
         "UNITER Table 2, L10 vs L12: conditional beats joint masking (here with WRA in both)"),
        ("full", "no-wra", "UNITER Table 2, L10 vs L11: WRA helps"),
    ])


@dataclass
class Recipe:
    """A whole recipe. Sections a stage does not use are carried along untouched."""

    name: str = "unnamed"
    seed: int = num(42, ge=0, le=2**32 - 1, why="numpy's seeds are unsigned 32-bit")
    extract: ExtractCfg = field(default_factory=ExtractCfg)
    corpus: CorpusCfg = field(default_factory=CorpusCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)
    oscar: OscarCfg = field(default_factory=OscarCfg)
    mlm: MlmCfg = field(default_factory=MlmCfg)
    mrfr: MrfrCfg = field(default_factory=MrfrCfg)
    mrc: MrcCfg = field(default_factory=MrcCfg)
    mrckl: MrcklCfg = field(default_factory=MrcklCfg)
    itm: ItmCfg = field(default_factory=ItmCfg)
    vqa: VqaCfg = field(default_factory=VqaCfg)
    retrieval: RetrievalCfg = field(default_factory=RetrievalCfg)
    gqa: GqaCfg = field(default_factory=GqaCfg)
    nlvr2: Nlvr2Cfg = field(default_factory=Nlvr2Cfg)
    snli_ve: SnliVeCfg = field(default_factory=SnliVeCfg)
    refcoco: RefcocoCfg = field(default_factory=RefcocoCfg)
    vcr: VcrCfg = field(default_factory=VcrCfg)
    captioning: CaptioningCfg = field(default_factory=CaptioningCfg)
    ablate: AblateCfg = field(default_factory=AblateCfg)

    def problems(self, k: Key) -> Iterator[str]:
        if self.model.image_embedder == "oscar" and self.data.pos_kind != "oscar6":
            yield ("'model.image_embedder' oscar takes Oscar's 6 position numbers: set "
                   "'data.pos_kind' to oscar6 (released Oscar weights expect 2048 + 6 inputs)")


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
    if origin is dict:
        if not isinstance(value, dict):
            raise VlpError(f"{source}: '{where}' must be a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_convert(k, kt, f"{where}", source): _convert(v, vt, f"{where}.{k}", source)
                for k, v in value.items()}
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
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept what anyone means by it.
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise VlpError(f"{source}: '{where}' must be a finite number, got {value!r}")
        return float(value)
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
    hint = (f" (YAML read the braces as a mapping: quote it, --set {where}='\"...\"')"
            if tp is str and isinstance(value, dict) else "")
    raise VlpError(f"{source}: '{where}' must be {_type_name(tp)}, got {value!r}{hint}")


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
    obj = cls(**kwargs)
    check(obj, prefix, source)
    return obj


def check(obj: Any, prefix: str = "", source: str = "recipe") -> None:
    """Refuse out-of-range values and inconsistent pairs in one section (not its subsections,
    which `_build` checks as it builds them), naming the dotted key."""
    def k(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    for f in dataclasses.fields(obj):
        rng = f.metadata.get("range")
        if rng is None:
            continue
        value = getattr(obj, f.name)
        for i, v in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
            if not rng.ok(v):
                where = k(f.name) + (f"[{i}]" if i is not None else "")
                why = f" ({rng.why})" if rng.why else ""
                raise VlpError(f"{source}: '{where}' must be {rng.text()}{why}, got {v!r}")
    for problem in getattr(obj, "problems", lambda _: ())(k):
        raise VlpError(f"{source}: {problem}")


# Keys that moved (vlp 0.2 -> 0.3), so that older recipes, and the recipes inside older
# checkpoints, still load: old dotted key -> new one.
MOVED_KEYS = {
    **{f"pretrain.{k}": f"oscar.{k}" for k in ("mask_prob", "pollute_prob",
                                               "caption_pollute_prob", "contrastive_weight",
                                               "text")},
    "corpus.max_answers": "vqa.max_answers",
}


def _migrate(data: dict, source: str) -> dict:
    for old, new in MOVED_KEYS.items():
        (s_old, k_old), (s_new, k_new) = old.split("."), new.split(".")
        section = data.get(s_old)
        if isinstance(section, dict) and k_old in section:
            data.setdefault(s_new, {})
            if isinstance(data[s_new], dict):
                if k_new in data[s_new] and data[s_new][k_new] != section[k_old]:
                    raise VlpError(f"{source}: '{old}' ({section[k_old]!r}) and '{new}' "
                                   f"({data[s_new][k_new]!r}) disagree: '{old}' is the older "
                                   f"name of '{new}'; keep only '{new}'")
                data[s_new][k_new] = section.pop(k_old)
                logger.info("%s: '%s' is now '%s' (read as such)", source, old, new)
    return data


def moved_key(key: str) -> str:
    """The current name of a dotted recipe key (`pretrain.mask_prob` -> `oscar.mask_prob`)."""
    return MOVED_KEYS.get(key, key)


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    """Build a Recipe from plain data, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VlpError(f"{source}: a recipe must be a YAML mapping of sections")
    return _build(Recipe, _migrate(copy.deepcopy(data), source), "", source)


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to nested plain data."""
    for item in overrides:
        if "=" not in item:
            raise VlpError(f"{source} {item!r}: expected KEY=VALUE, e.g. pretrain.train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            what = str(getattr(exc, "problem", "") or exc).splitlines()[0]
            raise VlpError(f"{source} {item!r}: the value is not valid YAML ({what}); quote "
                           f"it: --set {key.strip()}='\"...\"'") from None
        node = data
        # A key that moved is set under its new name: --set wins over the recipe file.
        parts = moved_key(key.strip()).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise VlpError(f"{source} {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


BUILTIN_DIR = Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in recipes/ (`vlp pretrain tiny` finds recipes/tiny.yaml)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe file, or the built-in of the same name.

    `tiny`, and also a path such as `recipes/tiny.yaml` that does not exist here (the README's
    examples, run outside the clone), fall back to the built-in recipe of that stem.
    """
    path = Path(path)
    if path.is_file():
        return path
    names = ", ".join(builtin_recipes())
    if path.is_dir():
        raise VlpError(f"recipe {path} is a folder: pass a YAML file or a built-in recipe name "
                       f"({names})")
    builtin = BUILTIN_DIR / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml", ".yml") and builtin.is_file():
        if path.suffix or len(path.parts) > 1:
            logger.info("recipe %s is not here: using vlp's built-in recipe '%s' (%s)", path,
                        path.stem, builtin)
        return builtin
    raise VlpError(f"recipe {path} not found: pass a YAML file or a built-in recipe name "
                   f"({names})")


def load_recipe_data(path: str | Path) -> dict:
    """Read a recipe file (or a built-in recipe by name) as plain data (safe YAML only)."""
    path = resolve_recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise VlpError(f"recipe {path}: not a text file (expected YAML)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise VlpError(f"recipe {path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})")
    return data or {}


def load_recipe(path: str | Path | None, overrides: list[str] | None = None,
                base: dict | None = None, source: str | None = None) -> Recipe:
    """Load and check a recipe: every key, type and range.

    Args:
        path: the recipe YAML (or a built-in name), or None to start from `base` (or the
            defaults).
        overrides: `a.b=c` strings applied on top.
        base: plain data used when `path` is None (e.g. the recipe stored in a checkpoint).
        source: how error messages name the recipe (default: the path, or "recipe").
    """
    data = load_recipe_data(path) if path is not None else copy.deepcopy(base or {})
    source = source or (str(path) if path is not None else "recipe")
    if not overrides:
        return recipe_from_dict(data, source)
    # Moved keys of the file first, then --set (under the new names): --set wins.
    merged = apply_overrides(_migrate(copy.deepcopy(data), source), list(overrides))
    try:
        return recipe_from_dict(merged, source)
    except VlpError as exc:
        try:  # the file alone is sound: the fault is in --set, so say so
            recipe_from_dict(data, source)
        except VlpError:
            raise exc from None
        msg = str(exc)
        if msg.startswith(f"{source}:"):
            msg = f"--set (over {source}):" + msg[len(source) + 1:]
        raise VlpError(msg) from None


# What a default does that a user may not expect, said with it.
_DEFAULT_NOTES = {
    "corpus.val_fraction": "of the train images moved to 'val' when the sources name no val "
                           "split",
}


def defaults_used(recipe: Recipe, data: dict, overrides: list[str] | None,
                  sections: list[str]) -> dict[str, list[str]]:
    """Per section of `sections` that `data` (the recipe file) does not have, the settings that
    --set does not give either, as `key value` strings: what vlp chose, not the user."""
    given = {item.split("=", 1)[0].strip() for item in overrides or []}
    out: dict[str, list[str]] = {}

    def walk(obj: Any, prefix: str, items: list[str]) -> None:
        for f in dataclasses.fields(obj):
            key, value = f"{prefix}.{f.name}", getattr(obj, f.name)
            if key in given:
                continue
            if dataclasses.is_dataclass(value):
                walk(value, key, items)
            elif value != "":
                shown = list(value) if isinstance(value, tuple) else value
                note = f" ({_DEFAULT_NOTES[key]})" if key in _DEFAULT_NOTES else ""
                items.append(f"{key[len(section) + 1:]} {shown}{note}")

    for section in sections:
        if isinstance(data, dict) and section in data:
            continue
        items: list[str] = []
        walk(getattr(recipe, section), section, items)
        if items:
            out[section] = items
    return out


def load_stage_recipe(path: str | Path | None, overrides: list[str] | None,
                      sections: list[str]) -> Recipe:
    """`load_recipe` for a command, saying once (INFO) which of the settings it reads were not
    the user's: with no recipe, vlp's defaults for `sections`; with one that lacks a section,
    the defaults for that section."""
    data = load_recipe_data(path) if path is not None else {}
    recipe = load_recipe(None, overrides, base=data,
                         source=str(path) if path is not None else "--set")
    chosen = defaults_used(recipe, data, overrides, sections)
    if chosen:
        what = "; ".join(f"{s}.* ({', '.join(items)})" for s, items in chosen.items())
        if path is None:
            logger.info("no --recipe: using vlp's defaults for %s", what)
        else:
            logger.info("recipe %s has no %s: using vlp's defaults for %s", path,
                        " or ".join(f"'{s}' section" for s in chosen), what)
    return recipe


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
