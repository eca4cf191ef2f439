"""The training loop, written once, over Hugging Face Accelerate.

Pre-training and every fine-tuning task call `train()` with a dataset, a step function
(tasks.py) and a TrainCfg. The loop is explicit: prepare, accumulate, backward, clip, step;
held-out statistics every `eval_every` steps; resumable state every `save_every` steps
(`accelerator.save_state`, optimizer and scheduler and RNG included); metrics appended as JSON
lines; a progress bar on the main process only. It runs unchanged on one CPU process, several
processes, or multi-node GPUs with fp16/bf16 (`accelerate launch vlp ...`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vlp_cli.config import TrainCfg
from vlp_cli.console import progress
from vlp_cli.tasks import Stats, Step

logger = logging.getLogger(__name__)

STATE_DIR = "state"
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    step: int
    last: dict[str, float]  # the last logged training statistics
    held_out: dict[str, float]  # the last held-out statistics
    seconds: float


def make_accelerator(cfg: TrainCfg) -> Any:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    precision = cfg.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        logger.warning("fp16 needs a GPU; training in fp32 on the CPU")
        precision = "no"
    # Without a GPU, several processes (torchrun, accelerate launch) only form a gloo group
    # when accelerate is told it is on the CPU; alone, this changes nothing.
    # Heads a task does not use (the VQA head in pre-training...) get no gradient; DDP must be
    # told, or it waits for them forever.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                       cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def _optimizer(model: torch.nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # BERT practice: no weight decay on biases and LayerNorm weights.
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def _schedule(cfg: TrainCfg) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear decay to zero at `steps` (Oscar and UNITER)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        return max(0.0, (cfg.steps - step) / max(cfg.steps - cfg.warmup_steps, 1))

    return factor


class _Meter:
    """Adds (sum, count) statistics; `result` reduces over processes and divides."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, stats: Stats) -> None:
        for k, (s, n) in stats.items():
            s, n = s.detach().float().reshape(()), n.detach().float().reshape(()).to(s.device)
            self.sums[k] = self.sums.get(k, 0) + s
            self.counts[k] = self.counts.get(k, 0) + n

    def result(self, accelerator: Any) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        packed = torch.stack([torch.stack([self.sums[k], self.counts[k]]) for k in keys])
        packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum")
        return {k: float(s / n) if n > 0 else math.nan for k, (s, n) in zip(keys, packed.tolist())}


class TaskModule(torch.nn.Module):
    """The model and one task's step as a single module, so that everything a step computes
    (encoder and heads) runs inside `forward`, where DistributedDataParallel can see it."""

    def __init__(self, model: torch.nn.Module, step_fn: Step):
        super().__init__()
        self.model = model
        self.step_fn = step_fn

    def forward(self, batch: dict) -> tuple[torch.Tensor, Stats]:
        return self.step_fn(self.model, batch)


def evaluate_stats(task: torch.nn.Module, loader: DataLoader, accelerator: Any,
                   max_batches: int = 0) -> dict[str, float]:
    """Held-out statistics of a (prepared) TaskModule over a (prepared) loader."""
    was_training = task.training
    task.eval()
    meter = _Meter()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            with accelerator.autocast():
                _, stats = task(batch)
            meter.add(stats)
    task.train(was_training)
    return meter.result(accelerator)


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    collate: Callable,
    step_fn: Step,
    cfg: TrainCfg,
    out_dir: Path,
    *,
    seed: int,
    eval_dataset: Dataset | None = None,
    save_fn: Callable[[torch.nn.Module, int], None] | None = None,
    resume: bool = False,
    description: str = "train",
    accelerator: Any | None = None,
) -> TrainResult:
    """Run `cfg.steps` optimiser steps.

    Args:
        model: the model (unwrapped).
        dataset: training items; `set_epoch(e)` is called on it when present.
        collate: the batch collator.
        step_fn: (model, batch) -> (loss, stats).
        cfg: optimisation settings.
        out_dir: where metrics.jsonl and state/ go.
        seed: seeds torch, numpy and the shuffling.
        eval_dataset: held-out items scored every `cfg.eval_every` steps.
        save_fn: (unwrapped model, step) -> None, called on the main process to write the
            checkpoint files at every save and at the end.
        resume: continue from out_dir/state when it exists.
        description: progress-bar label.
        accelerator: an existing Accelerator (tests, or a caller that already made one).
    """
    from accelerate.utils import set_seed

    accelerator = accelerator or make_accelerator(cfg)
    set_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate, num_workers=cfg.num_workers, generator=generator,
                        persistent_workers=False)
    if len(loader) == 0:
        raise ValueError(f"{description}: {len(dataset)} examples give no full batch of "
                         f"{cfg.batch_size}; lower the batch size")
    eval_loader = None
    if eval_dataset is not None and len(eval_dataset) > 0:
        eval_loader = DataLoader(eval_dataset, batch_size=cfg.batch_size, shuffle=False,
                                 collate_fn=collate, num_workers=cfg.num_workers)
    optimizer = _optimizer(model, cfg)
    # The scheduler is stepped by hand once per optimiser step: accelerate's wrapper would step
    # it once per process, which shortens the schedule under data parallelism.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    task = TaskModule(model, step_fn)
    task, optimizer, loader = accelerator.prepare(task, optimizer, loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    accelerator.register_for_checkpointing(scheduler)

    state_dir = out_dir / STATE_DIR
    step, epoch = 0, 0
    if resume and (state_dir / "progress.json").is_file():
        accelerator.load_state(str(state_dir))
        done = json.loads((state_dir / "progress.json").read_text())
        step, epoch = int(done["step"]), int(done["epoch"]) + 1
        logger.info("resumed %s at step %d", out_dir, step)

    def save(final: bool = False) -> None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(state_dir))
        if accelerator.is_main_process:
            (state_dir / "progress.json").write_text(json.dumps({"step": step, "epoch": epoch}))
            if save_fn is not None:
                save_fn(accelerator.unwrap_model(task).model, step)
        accelerator.wait_for_everyone()

    metrics_path = out_dir / METRICS
    meter, last, held = _Meter(), {}, {}
    start = time.time()
    task.train()
    with progress(disable=not accelerator.is_main_process) as bar:
        bar_task = bar.add_task(description, total=cfg.steps, completed=step)
        while step < cfg.steps:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            generator.manual_seed(seed + epoch)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch in loader:
                with accelerator.accumulate(task):
                    with accelerator.autocast():
                        loss, stats = task(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(task.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                meter.add(stats)
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                bar.update(bar_task, completed=step)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    last = meter.result(accelerator)
                    meter = _Meter()
                    if accelerator.is_main_process:
                        _append(metrics_path, {"step": step, "split": "train",
                                               "lr": scheduler.get_last_lr()[0], **last,
                                               "elapsed_s": round(time.time() - start, 1)})
                        bar.update(bar_task, description=f"{description} loss {last['loss']:.3f}")
                if eval_loader is not None and (
                        (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                    held = evaluate_stats(task, eval_loader, accelerator,
                                          cfg.eval_batches)
                    if accelerator.is_main_process:
                        _append(metrics_path, {"step": step, "split": "val", **held})
                        logger.info("step %d held-out: %s", step,
                                    ", ".join(f"{k} {v:.4f}" for k, v in held.items()))
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save()
                if step >= cfg.steps:
                    break
            epoch += 1
    save(final=True)
    return TrainResult(step=step, last=last, held_out=held, seconds=time.time() - start)
