"""The training loop, written once, over Hugging Face Accelerate.

Pre-training and every fine-tuning task call `train()` with one or several tasks (each a
dataset, a collator, a step function and a mix ratio) and a TrainCfg. Each optimiser step runs
one task, drawn from an RNG seeded by (seed, step): the same on every process, so all ranks run
the same task in a step (UNITER's MetaLoader), and nothing to save for an exact resume. The loop
is explicit: prepare, accumulate, backward, clip, step; held-out statistics every `eval_every`
steps; metrics appended as JSON lines; a progress bar on the main process only. It runs
unchanged on one CPU process, several processes, or multi-node GPUs with fp16/bf16 (`accelerate
launch vlp ...`).

Crash safety (runstate.py): the whole training state is saved every `save_every` steps, every
`save_minutes` of wall time and on SIGTERM/SIGINT, atomically, without pickle; the last
`keep_states` are kept. Resuming is exact: the data order comes from (seed, epoch) and the
position inside the epoch is saved, with every RNG and the partial metric sums, so a killed and
resumed run gives the same per-step losses and final weights as an uninterrupted one (CPU, same
thread count and process count). Decisions that all processes must share (save now, stop, skip
a non-finite step) are taken once, from one all-reduce per optimiser step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlp_cli import VlpError, faults, probes, runstate
from vlp_cli.config import TrainCfg
from vlp_cli.console import progress
from vlp_cli.data.datasets import eval_loader
from vlp_cli.launch import make_accelerator
from vlp_cli.streams import Interrupted, StopRequest, Stream
from vlp_cli.tasks.base import region_spread

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]
Step = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, Stats]]
__all__ = ["Interrupted", "TrainTask", "train"]

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


@dataclass
class TrainTask:
    """One task of a training run."""

    name: str
    dataset: Dataset
    collate: Callable
    step: Step
    ratio: float = 1.0  # share of the optimiser steps (mixed runs)
    eval_dataset: Dataset | None = None
    sampler: Any | None = None  # a batch sampler (see streams.Stream); None: EpochBatches


@dataclass
class TrainResult:
    step: int
    last: dict[str, float]  # the last logged training statistics
    held_out: dict[str, float]  # the last held-out statistics
    seconds: float


def _sampler(task: TrainTask, cfg: TrainCfg, seed: int, rank: int, world: int,
             cfg_key: str) -> Any | None:
    """The task's own batch sampler; else, with `batching: units`, length buckets over its
    dataset's `units()`; else None (the Stream's fixed-size EpochBatches)."""
    if task.sampler is not None or cfg.batching == "fixed":
        return task.sampler
    from vlp_cli.data.buckets import units_sampler

    return units_sampler(task.name, task.dataset, cfg, seed, rank, world, cfg_key)


def _optimizer(model: torch.nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # BERT practice: no weight decay on biases and LayerNorm weights; UNITER's task heads
        # learn `head_lr_mult` times faster.
        # (With no multiplier, the two groups of earlier versions, whose saved states resume.)
        key = (p.ndim < 2 or "norm" in name.lower(),
               cfg.head_lr_mult != 1.0 and name.startswith("heads."))
        groups.setdefault(key, []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
          "lr": cfg.lr * (cfg.head_lr_mult if head else 1.0)}
         for (no_decay, head), ps in sorted(groups.items())], lr=cfg.lr, betas=tuple(cfg.betas))


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

    def state(self) -> dict[str, torch.Tensor]:
        """The partial sums as tensors, for a saved state (each process keeps its own)."""
        out = {f"sum/{k}": v for k, v in self.sums.items()}
        out.update({f"count/{k}": v for k, v in self.counts.items()})
        return out

    def load(self, tensors: dict[str, torch.Tensor], device: Any) -> None:
        for key, value in tensors.items():
            kind, name = key.split("/", 1)
            (self.sums if kind == "sum" else self.counts)[name] = value.to(device)

    def result(self, accelerator: Any) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        packed = torch.stack([torch.stack([self.sums[k], self.counts[k]]) for k in keys])
        packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum")
        return {k: float(s / n) if n > 0 else math.nan for k, (s, n) in zip(keys, packed.tolist())}


class TaskModule(torch.nn.Module):
    """The model and the tasks' steps as a single module, so that everything a step computes
    (encoder and heads) runs inside `forward`, where DistributedDataParallel can see it."""

    def __init__(self, model: torch.nn.Module, steps: list[Step]):
        super().__init__()
        self.model = model
        self.steps = steps

    def forward(self, batch: dict, task: int = 0) -> tuple[torch.Tensor, Stats]:
        return self.steps[task](self.model, batch)


def evaluate_stats(task: torch.nn.Module, loader: DataLoader, accelerator: Any,
                   max_batches: int = 0, index: int = 0) -> dict[str, float]:
    """Held-out statistics of a (prepared) TaskModule over a (prepared) loader."""
    was_training = task.training
    task.eval()
    # Every evaluation scores the same held-out draws (masks, polluted pairs): accelerate's
    # loader would otherwise pass its own iteration count to the dataset as the epoch, so the
    # numbers of a resumed run would differ from an uninterrupted one's.
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    meter = _Meter()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            with accelerator.autocast():
                _, stats = task(batch, index)
                if i == 0:  # every rank's first batch: the same keys on every rank
                    spread = region_spread(accelerator.unwrap_model(task).model, batch)
                    if spread is not None:
                        stats = {**stats, "region_spread": spread}
            meter.add(stats)
    task.train(was_training)
    result = meter.result(accelerator)
    if not np.isfinite(result.get("region_spread", 0.0)):  # no image with differing regions
        del result["region_spread"]
    return result


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _prefixed(stats: dict, name: str, mixed: bool) -> dict:
    return {f"{name}/{k}": v for k, v in stats.items()} if mixed else stats


@contextlib.contextmanager
def _closed_on_error(accelerator: Any, trackers: bool) -> Iterator[None]:
    """Close the trackers (flushing their files) when the loop stops on a signal or an error;
    a run that finishes closes them after its last save."""
    try:
        yield
    except BaseException:
        if trackers:
            accelerator.end_training()
        raise


def train(
    model: torch.nn.Module,
    tasks: list[TrainTask],
    cfg: TrainCfg,
    out_dir: Path,
    *,
    seed: int,
    identity: dict,
    cfg_key: str,
    save_fn: Callable[[torch.nn.Module, int], None] | None = None,
    resume_from: runstate.SavedState | None = None,
    description: str = "train",
    accelerator: Any | None = None,
    best_key: str = "",
    best_fn: Callable[[torch.nn.Module, int, float], None] | None = None,
) -> TrainResult:
    """Run `cfg.steps` optimiser steps over one or several tasks.

    Args:
        model: the model (unwrapped).
        tasks: what to train; with several, each step runs one, drawn by `ratio` from an RNG
            seeded by (seed, step), and statistics are logged as `task/name`.
        cfg: optimisation settings.
        out_dir: where metrics.jsonl and state/ go.
        seed: seeds torch, numpy and the data order.
        identity: what this run is (stage, task, recipe, inputs), recorded in every state and
            checked by `--resume` (runstate.check_resumable).
        cfg_key: the recipe section of `cfg`, for messages (`pretrain.train`).
        save_fn: (unwrapped model, step) -> None, called on the main process to write the
            checkpoint files at every save and at the end.
        resume_from: a checked state (runstate.check_resumable) to continue from.
        description: progress-bar label.
        accelerator: an existing Accelerator (tests, or a caller that already made one).
        best_key, best_fn: after each held-out evaluation whose `best_key` statistic beats
            every earlier one (higher is better), `best_fn(model, step, value)` runs on the
            main process (fine-tuning keeps the best checkpoint beside the last one); the
            best value so far is part of the saved state, so a resumed run compares with it.
    """
    from accelerate.utils import send_to_device, set_seed

    mixed = len(tasks) > 1
    accelerator = accelerator or make_accelerator(cfg, mixed, Path(out_dir))
    set_seed(seed)
    out_dir = Path(out_dir)
    if cfg.trackers:
        accelerator.init_trackers(description, config={"cfg_key": cfg_key, "steps": cfg.steps,
                                                       "lr": cfg.lr,
                                                       "tasks": ",".join(t.name for t in tasks)})

    def record(row: dict) -> None:
        """A metrics row into metrics.jsonl and, when the recipe names any, the trackers."""
        _append(metrics_path, row)
        if cfg.trackers:
            split = row.get("split", "")
            accelerator.log({f"{split}/{k}": v for k, v in row.items()
                             if isinstance(v, (int, float)) and k != "step"}, step=row["step"])
    rank, world = accelerator.process_index, accelerator.num_processes
    streams = [Stream(t.dataset, t.collate, cfg.batch_size, seed, rank, world, cfg.grad_accum,
                      cfg.num_workers, _sampler(t, cfg, seed, rank, world, cfg_key))
               for t in tasks]
    for t, stream in zip(tasks, streams):
        if stream.per_rank == 0:
            per = f" per process ({world} processes)" if world > 1 else ""
            accum = f" x {cfg.grad_accum} accumulated" if cfg.grad_accum > 1 else ""
            what = f"{description} ({t.name})" if mixed else description
            if cfg.batching == "units" and t.sampler is None:
                raise VlpError(f"{what}: {len(t.dataset)} training examples give fewer than "
                               f"{cfg.grad_accum * world} batches of {cfg.max_units} units"
                               f"{per}; lower {cfg_key}.max_units")
            raise VlpError(f"{what}: {len(t.dataset)} training examples give no full batch of "
                           f"{cfg.batch_size}{accum}{per}; lower {cfg_key}.batch_size")
    ratios = np.array([t.ratio for t in tasks], dtype=np.float64)
    ratios /= ratios.sum()

    def pick(step: int) -> int:
        return 0 if not mixed else int(np.random.default_rng([seed, step]).choice(
            len(tasks), p=ratios))

    out_dir.mkdir(parents=True, exist_ok=True)
    eval_loaders: list[Any] = []
    for t in tasks:
        ev = None
        if t.eval_dataset is not None and len(t.eval_dataset) > 0:
            ev = eval_loader(t.eval_dataset, batch_size=cfg.batch_size, shuffle=False,
                             collate_fn=t.collate, num_workers=cfg.num_workers)
        eval_loaders.append(ev)
    optimizer = _optimizer(model, cfg)
    # The scheduler is stepped by hand once per optimiser step: accelerate's wrapper would step
    # it once per process, which shortens the schedule under data parallelism.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    module = TaskModule(model, [t.step for t in tasks])
    # The training loaders are not prepared: each Stream shards its data and knows its position.
    module, optimizer = accelerator.prepare(module, optimizer)
    eval_loaders = [accelerator.prepare(ev) if ev is not None else None for ev in eval_loaders]

    metrics_path = out_dir / METRICS
    meter, last, held = _Meter(), {}, {}
    best: dict = {}  # {"step", "value"} of the best held-out `best_key` so far
    step = 0
    nonfinite = {"in_a_row": 0, "total": 0}
    warned: set[str] = set()  # warnings given once a run
    if accelerator.is_main_process:
        runstate.clean_partial(out_dir)
    if resume_from is not None:
        step = runstate.restore(resume_from, accelerator, module, optimizer, scheduler, meter,
                                streams, metrics_path)
        nonfinite = dict(resume_from.trainer.get("nonfinite", nonfinite))
        last, held = resume_from.trainer.get("last", {}), resume_from.trainer.get("held_out", {})
        best = resume_from.trainer.get("best", best)
        if step > cfg.steps:
            raise VlpError(f"--resume: {out_dir} is at step {step}, past {cfg_key}.steps="
                           f"{cfg.steps}: pass --set {cfg_key}.steps=N with N >= {step} to "
                           "continue it (nothing was changed)")
        if step == cfg.steps:
            logger.info("%s is already at step %d of %d", out_dir, step, cfg.steps)

    def save() -> None:
        accelerator.wait_for_everyone()
        if runstate.complete_states(out_dir) and \
                runstate.complete_states(out_dir)[0][0] == step:
            pass  # this very state is on disk already (a resumed run that did nothing new)
        else:
            tmp = runstate.partial_dir(out_dir, step)
            if accelerator.is_main_process:
                runstate.begin_save(out_dir, step)
            accelerator.wait_for_everyone()
            runstate.write_rank_files(tmp, rank, meter.state())
            if accelerator.is_main_process:
                trainer = {
                    "step": step, "epoch": streams[0].epoch, "position": streams[0].position,
                    "streams": [[s.epoch, s.position] for s in streams],
                    "tasks": [t.name for t in tasks], "world_size": world,
                    "seed": seed, "scheduler": runstate.scheduler_state(scheduler),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
                    "nonfinite": nonfinite, "last": last, "held_out": held, "best": best,
                    "metrics_bytes": metrics_path.stat().st_size if metrics_path.exists() else 0,
                    "identity": identity,
                }
                runstate.write_main_files(tmp, accelerator.unwrap_model(module).model,
                                          optimizer, trainer)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                runstate.finish_save(out_dir, tmp, step, cfg.keep_states)
        if accelerator.is_main_process and save_fn is not None:
            save_fn(accelerator.unwrap_model(module).model, step)
        accelerator.wait_for_everyone()

    def held_out() -> dict:
        held = {}
        for i, (t, ev) in enumerate(zip(tasks, eval_loaders)):
            if ev is not None:
                held.update(_prefixed(evaluate_stats(module, ev, accelerator, cfg.eval_batches,
                                                     i), t.name, mixed))
        if accelerator.is_main_process and held:  # nothing held out: nothing to say
            record({"step": step, "split": "val", **held})
            logger.info("step %d held-out: %s", step,
                        ", ".join(f"{k} {v:.4f}" for k, v in held.items()))
            _collapsed(held, step, warned)
        value = held.get(best_key)
        if best_fn is not None and step > 0 and value is not None and np.isfinite(value) and \
                (not best or value > best["value"]):
            best.update(step=step, value=float(value))
            if accelerator.is_main_process:
                best_fn(accelerator.unwrap_model(module).model, step, float(value))
            accelerator.wait_for_everyone()
        return held

    if cfg.eval_at_start and step == 0 and any(ev is not None for ev in eval_loaders):
        held = held_out()  # the untrained model: the level each statistic starts from
    start = last_save = time.time()
    module.train()
    with StopRequest() as stop, progress(disable=not accelerator.is_main_process) as bar, \
            _closed_on_error(accelerator, bool(cfg.trackers)):
        bar_task = bar.add_task(description, total=cfg.steps, completed=step)
        while step < cfg.steps:
            index = pick(step)
            # Non-finite losses of this accumulation window (a tensor: no device sync per
            # micro-batch) and the statistics that wait to be added until the window is judged.
            window_bad = torch.zeros((), device=accelerator.device)
            window_stats: list[Stats] = []
            while True:
                batch = send_to_device(streams[index].next(), accelerator.device)
                with accelerator.accumulate(module):
                    with accelerator.autocast():
                        loss, stats = module(batch, index)
                    window_bad = window_bad + (~torch.isfinite(loss.detach())).any().float()
                    window_stats.append(_prefixed(stats, tasks[index].name, mixed))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # One collective per step carries every shared decision.
                        timer = cfg.save_minutes > 0 and \
                            time.time() - last_save >= cfg.save_minutes * 60
                        flags = torch.cat([window_bad.reshape(1), torch.tensor(
                            [float(stop.signum), float(timer)], device=accelerator.device)])
                        flags = accelerator.reduce(flags, reduction="sum").tolist()
                        skip = flags[0] > 0
                        if not skip:
                            for st in window_stats:
                                meter.add(st)
                        faults.point("step:mid")
                        if not skip:
                            if cfg.max_grad_norm > 0:
                                accelerator.clip_grad_norm_(module.parameters(),
                                                            cfg.max_grad_norm)
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    break
            scheduler.step()
            step += 1
            if skip:
                nonfinite["in_a_row"] += 1
                nonfinite["total"] += 1
                _nonfinite(nonfinite, step, cfg, cfg_key, out_dir, accelerator, metrics_path)
            else:
                nonfinite["in_a_row"] = 0
            bar.update(bar_task, completed=step)
            if step % cfg.log_every == 0 or step == cfg.steps:
                last = meter.result(accelerator)
                meter = _Meter()
                if accelerator.is_main_process:
                    record({"step": step, "split": "train",
                                           "lr": scheduler.get_last_lr()[0], **last,
                                           "nonfinite_skipped": nonfinite["total"],
                                           "elapsed_s": round(time.time() - start, 1)})
                    shown = [k for k in last if k == "loss" or k.endswith("/loss")]
                    if shown:
                        bar.update(bar_task, description=f"{description} " + " ".join(
                            f"{k} {last[k]:.3f}" for k in shown))
            if any(ev is not None for ev in eval_loaders) and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                held = held_out()
            if step >= cfg.steps:
                break  # the final save follows
            if (cfg.save_every and step % cfg.save_every == 0) or flags[1] or flags[2]:
                save()
                last_save = time.time()
            if flags[1]:
                signum = stop.signum or signal.SIGTERM
                raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {step}: "
                                  f"state saved in {runstate.state_root(out_dir)}; continue "
                                  "with --resume", signum)
    save()
    if cfg.trackers:
        accelerator.end_training()
    return TrainResult(step=step, last=last, held_out=held, seconds=time.time() - start)


def _collapsed(held: dict, step: int, warned: set[str]) -> None:
    """Warn once a run when the regions of an image have one final state (probes.py)."""
    note = probes.collapse_note(held)
    if note is not None and "collapse" not in warned:
        warned.add("collapse")
        logger.warning("step %d: %s", step, note)


def _nonfinite(count: dict, step: int, cfg: TrainCfg, cfg_key: str, out_dir: Path,
               accelerator: Any, metrics_path: Path) -> None:
    """Log a skipped step; stop the run after `cfg.max_nonfinite` of them in a row."""
    if accelerator.is_main_process:
        # Its own split: the "train" rows keep one row per logged step.
        _append(metrics_path, {"step": step, "split": "skipped", "reason": "non-finite loss",
                               "nonfinite_skipped": count["total"]})
    logger.warning("step %d: non-finite loss, update skipped (%d in a row, %d in all)", step,
                   count["in_a_row"], count["total"])
    if count["in_a_row"] >= cfg.max_nonfinite:
        states = runstate.complete_states(out_dir)
        good = f"the last saved state is {states[0][1]}" if states else "no state was saved"
        raise VlpError(f"step {step}: the loss was not finite for {count['in_a_row']} steps in a "
                       f"row, so the run stopped ({good}); check the inputs with `vlp verify`, "
                       f"or start again into a new --out with a lower {cfg_key}.lr")
