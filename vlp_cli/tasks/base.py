"""What every task declares, and the pieces tasks share.

A task (one file in this folder) is a `Task` subclass: the corpus kinds it reads, how an
example becomes model inputs and targets (`dataset`, `collate`), its heads (`heads`), its
training step (`step`) and its evaluation (`evaluate`). Stages call these and know no task.

Steps return `(loss, stats)` where stats maps a name to a (sum, count) pair of tensors; the
training loop adds them up over steps and processes before dividing, so held-out numbers are
exact under any batching.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vlp_cli.config import Recipe, TrainCfg
from vlp_cli.data.examples import ExampleBuilder, TaskDataset
from vlp_cli.stores.corpus import Corpus

if TYPE_CHECKING:  # task files import without torch (vlp --help); torch comes with a run
    from pathlib import Path

    import torch

    from vlp_cli.model import HeadSpec, VLPModel

Stats = "dict[str, tuple[torch.Tensor, torch.Tensor]]"
Step = "Callable[[VLPModel, dict], tuple[torch.Tensor, Stats]]"

INPUTS = ("input_ids", "token_type_ids", "text_mask", "img_feats", "img_pos", "img_mask")


@dataclass
class Context:
    """What a task works with in one run."""

    recipe: Recipe
    corpus: Corpus
    builder: ExampleBuilder
    tokenizer: Any
    # The region classes of the run (pre-training on several corpora: the union of their
    # feature stores' labels); None: this feature store's labels.
    labels: list[str] | None = None


class Task:
    """One task: pre-training objective or downstream task. Subclasses set the class fields."""

    name: str = ""
    stage: str = "finetune"  # "pretrain": an objective `vlp pretrain` mixes; "finetune"
    help: str = ""  # one line for the CLI
    kinds: tuple[str, ...] = ()  # corpus example kinds read (pre-training: from the recipe)
    metrics: tuple[str, ...] = ()  # names `evaluate` returns (always among its keys)
    report: tuple[str, ...] = ()  # what `vlp report` shows of a result, in this order
    headline: str = ""  # the one metric that ranks runs (ablations); higher is better
    # the held-out step statistic that picks the best checkpoint of a fine-tuning run
    # (higher is better; OUT/best/ beside the last one); "" keeps the last only
    select: str = ""
    uses_pooler: bool = True  # whether a step reads the pooled [CLS] (else it is frozen)
    # heads of the pre-training that fine-tuning keeps, whatever the task's state (their
    # weights do not depend on it)
    pretrained_heads: tuple[str, ...] = ()
    recipe: Recipe  # set by `bind`
    state: dict  # set by `bind`: what `prepare` computed (or the checkpoint kept)

    def bind(self, recipe: Recipe, state: dict | None = None) -> Task:
        """This task under a recipe and with its state (steps and collation read them)."""
        task = copy.copy(self)
        task.recipe, task.state = recipe, dict(state or {})
        return task

    @property
    def key(self) -> str:
        """This task's recipe section key: its name, "-" spelt "_" (`snli_ve` for snli-ve)."""
        return self.name.replace("-", "_")

    def section(self, recipe: Recipe) -> Any:
        """This task's recipe section: the dataclass of the same name in config.py."""
        return getattr(recipe, self.key)

    def train_cfg(self, recipe: Recipe) -> TrainCfg:
        return self.section(recipe).train

    def prepare(self, ctx: Context) -> dict:
        """The task's state computed from the training examples (an answer vocabulary...),
        saved in the checkpoint's meta and handed back through `bind` later."""
        return {}

    def state_from_meta(self, meta: dict) -> dict:
        """This task's state as a checkpoint's meta.json holds it."""
        return dict(meta.get("tasks", {}).get(self.name) or {})

    def heads(self, ctx: Context) -> list[HeadSpec]:
        raise NotImplementedError

    def adapt_model(self, model: VLPModel) -> None:
        """Changes the task makes to the encoder before fine-tuning (NLVR2's triplet adds a
        token type); they are saved with the checkpoint's config."""

    def legacy_heads(self, config: dict) -> list[tuple[str, HeadSpec]]:
        """(attribute, spec) of the heads a schema-1 model config (vlp <= 0.2) had for this
        task: how checkpoint.py maps their weights."""
        return []

    def dataset(self, ctx: Context, split: str, seed: int) -> TaskDataset:
        raise NotImplementedError

    def collate(self, items: list[dict], batch: dict) -> None:
        """Add this task's targets and masks to a batch the generic collator padded."""

    def step(self, model: VLPModel, batch: dict) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        """(metrics, predictions) on a corpus split; scoring is split over processes."""
        raise NotImplementedError

    def result_files(self, predictions: list[dict]) -> dict[str, Any]:
        """Extra JSON files `evaluate` writes beside predictions.jsonl (name -> content), in a
        data set's own results format."""
        return {}

    def score_files(self, predictions: Path, references: Path) -> tuple[dict, list[dict]]:
        """(metrics, predictions) of another system's output file against reference files,
        without a checkpoint (`vlp evaluate TASK --predictions F --references F`)."""
        from vlp_cli import VlpError

        raise VlpError(f"'{self.name}' cannot score a --predictions file; give --checkpoint, "
                       "--corpus and --features")

    def check_checkpoint(self, meta: dict) -> str | None:
        """Why a checkpoint cannot be evaluated for this task, or None."""
        if meta.get("task") != self.name:
            return (f"a '{meta.get('task')}' checkpoint, not '{self.name}': run "
                    f"`vlp finetune {self.name}` on it first")
        return None



class Objective(Task):
    """A pre-training objective: mixed by `vlp pretrain`, scored by its own step's statistics
    on a held-out split, on any checkpoint trained with it."""

    stage = "pretrain"

    def check_checkpoint(self, meta: dict) -> str | None:
        if self.name not in meta.get("tasks", {}):
            return (f"a '{meta.get('task')}' checkpoint, not trained with the '{self.name}' "
                    "objective (its heads are not in it)")
        return None

    def evaluate(self, ctx: Context, model: VLPModel, split: str, limit: int | None,
                 accelerator: Any) -> tuple[dict, list[dict]]:
        return held_out_stats(self, ctx, model, split, limit, accelerator), []


# -- shared pieces -------------------------------------------------------------------------------


def encode(model: VLPModel, batch: dict) -> torch.Tensor:
    return model(*(batch[k] for k in INPUTS), attn_mask=batch.get("attn_mask"),
                 img_type_ids=batch.get("img_type_ids"))


def region_spread(model: VLPModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """probes.spread of the encoder's last layer on a batch of joint sequences, over the
    images whose regions differ as inputs (a text-only baseline's blanked regions do not);
    None for a batch of another shape."""
    import torch

    from vlp_cli.probes import per_image, spread

    if not all(k in batch for k in INPUTS):
        return None
    hidden = encode(model, batch)
    inputs = torch.cat([batch["img_feats"], batch["img_pos"]], -1).float()
    differ = batch["img_mask"].bool() & (per_image(inputs, batch["img_mask"]) > 1e-6)[:, None]
    return spread(hidden, batch["input_ids"].shape[1], differ)


def mean_stat(value: torch.Tensor, n: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    n = torch.as_tensor(n, dtype=torch.float32, device=value.device)
    return value.detach().float() * n, n


def count_stat(correct: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return correct.detach().float(), torch.as_tensor(float(n), device=correct.device)


def classified(loss: torch.Tensor, logits: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """A classification step's result: the loss, with its mean and the accuracy as stats."""
    b = logits.shape[0]
    acc = (logits.argmax(-1) == labels).sum()
    return loss, {"loss": mean_stat(loss, b), "acc": count_stat(acc, b)}


def masked_tokens(model: VLPModel, hidden: torch.Tensor, labels: torch.Tensor,
                  smoothing: float = 0.0, head: str = "mlm") -> tuple[torch.Tensor, Stats]:
    """The masked-token loss over the text positions that carry a label."""
    from vlp_cli.losses import masked_token_loss

    text = hidden[:, : labels.shape[1]]
    where = labels != -100  # [B, T]
    logits = model.mlm_logits(text, where, head)  # [M, V]
    target = labels[where]
    loss = masked_token_loss(logits, target, smoothing)
    correct = (logits.argmax(-1) == target).sum()
    return loss, {"mlm_loss": mean_stat(loss, target.numel()),
                  "mlm_acc": count_stat(correct, target.numel())}


def pad_labels(items: list[dict], key: str, t: int) -> torch.Tensor:
    """Per-item label lists padded with -100 to [B, t]."""
    import torch

    labels = torch.full((len(items), t), -100, dtype=torch.long)
    for i, x in enumerate(items):
        labels[i, : len(x[key])] = torch.as_tensor(x[key])
    return labels


def longs(items: list[dict], key: str) -> torch.Tensor:
    import torch

    return torch.as_tensor([x[key] for x in items], dtype=torch.long)


def held_out_stats(task: Task, ctx: Context, model: VLPModel, split: str, limit: int | None,
                   accelerator: Any) -> dict:
    """Evaluation by the training step's own statistics (pre-training objectives): each
    process sums its share of the examples (every example once), then the sums are added."""
    import torch
    from accelerate.utils import send_to_device

    from vlp_cli import VlpError
    from vlp_cli.data.datasets import Collator, eval_loader

    ds = task.dataset(ctx, split, ctx.recipe.seed + 1)
    if limit is not None:
        ds.indices = ds.indices[:limit]
    if len(ds) == 0:
        raise VlpError(f"corpus {ctx.corpus.path} has no '{split}' examples for {task.name}")
    ds.indices = ds.indices[accelerator.process_index::accelerator.num_processes]
    loader = eval_loader(ds, batch_size=32, collate_fn=Collator(ctx.builder.pad_id, task.collate))
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, batch in enumerate(loader):
            batch = send_to_device(batch, accelerator.device)
            _, stats = task.step(model, batch)
            # probes.py: whether the regions of an image still have states of their own.
            spread = region_spread(model, batch) if i == 0 else None
            if spread is not None:
                stats = {**stats, "region_spread": spread}
            for k, (s, n) in stats.items():
                sums[k] = sums.get(k, torch.zeros(2, device=s.device)) + torch.stack(
                    [s.reshape(()), n.reshape(()).to(s.device)])
    names = list(sums)
    if accelerator.num_processes > 1:  # a process with no examples (--limit) knows no names:
        from accelerate.utils import gather_object  # every process stacks the same keys

        names = gather_object(names)
    keys = sorted(set(names) | {"region_spread"})
    packed = torch.stack([sums.get(k, torch.zeros(2, device=accelerator.device))
                          for k in keys]).to(accelerator.device)
    packed = accelerator.reduce(packed, reduction="sum")
    out = {k: float(s / n) if n > 0 else float("nan") for k, (s, n) in zip(keys, packed.tolist())}
    if math.isnan(out["region_spread"]):  # no batch of joint sequences with differing regions
        del out["region_spread"]
    return out


def sharded_map(accelerator: Any, dataset: Any, collate: Callable, fn: Callable,
                batch_size: int, label: str) -> torch.Tensor:
    """`fn(batch) -> [B, ...]` over a dataset split across processes; the rows of every
    process gathered in dataset order, each example once (`gather_for_metrics` drops the
    padding of an uneven last batch). A progress bar on the main process."""
    import torch

    from vlp_cli.console import progress
    from vlp_cli.data.datasets import eval_loader

    loader = accelerator.prepare(eval_loader(dataset, batch_size=batch_size, collate_fn=collate))
    parts = []
    with progress(disable=not accelerator.is_main_process) as bar, torch.no_grad():
        t = bar.add_task(label, total=len(dataset))
        for batch in loader:
            rows = accelerator.gather_for_metrics(fn(batch))
            parts.append(rows.cpu())
            bar.advance(t, len(rows))
    return torch.cat(parts) if parts else torch.zeros(0)


class TextImageDataset(TaskDataset):
    """Examples of one text and one image: `[CLS] text [SEP] tags [SEP]` + regions, plus the
    fields `fields(example, image)` adds (the targets of a classification task)."""

    def __init__(self, corpus: Corpus, builder: ExampleBuilder, indices: np.ndarray,
                 max_text_len: int, fields: Callable[[dict, Any], dict], seed: int = 0):
        super().__init__(corpus, builder, indices, seed)
        self.max_text_len = max_text_len
        self.fields = fields

    def __getitem__(self, i: int) -> dict:
        idx = int(self.indices[i])
        ex = self.corpus.get(idx)
        img = self.builder.regions(ex["images"][0])
        text = self.builder.text(ex["segments"][0], self.builder.tag_ids(img.tag_classes),
                                 self.max_text_len)
        return self.item(text, img, index=idx, **self.fields(ex, img))


def predict(task: Task, ctx: Context, split: str, limit: int | None, accelerator: Any,
            fn: Callable[[dict], torch.Tensor]) -> list[tuple[dict, Any]]:
    """(example, fn's row) for the first `limit` examples of a split of the task's first kind,
    `fn` (a batch -> [B] or [B, ...]) run over them split across processes."""
    from vlp_cli.data.datasets import Collator

    ds = task.dataset(ctx, split, 0)
    ds.indices = ctx.corpus.require(task.kinds[0], split)[:limit]
    out = sharded_map(accelerator, ds, Collator(ctx.builder.pad_id, task.collate), fn,
                      task.train_cfg(task.recipe).batch_size * 2, f"{task.name} eval")
    return [(ctx.corpus.get(i), row) for i, row in zip(ds.indices.tolist(), out.tolist())]


def split_indices(corpus: Corpus, kind: str, split: str) -> np.ndarray:
    """The examples of a kind in a split: training needs some (one line if none), a held-out
    split may be empty."""
    return corpus.require(kind, split) if split == "train" else corpus.indices(kind, split)
