"""The training loop, written once, over Hugging Face Accelerate.

Pre-training and every fine-tuning task call `train()` with a dataset, a step function
(tasks.py) and a TrainCfg. The loop is explicit: prepare, accumulate, backward, clip, step;
held-out statistics every `eval_every` steps; metrics appended as JSON lines; a progress bar
on the main process only. It runs unchanged on one CPU process, several processes, or
multi-node GPUs with fp16/bf16 (`accelerate launch vlp ...`).

Crash safety (runstate.py): the whole training state is saved every `save_every` steps, every
`save_minutes` of wall time and on SIGTERM/SIGINT, atomically, without pickle; the last
`keep_states` are kept. Resuming is exact: the data order comes from (seed, epoch) and the
position inside the epoch is saved, with every RNG and the partial metric sums, so a killed and
resumed run gives the same per-step losses and final weights as an uninterrupted one (CPU, same
thread count and process count). Decisions that all processes must share (save now, stop, skip
a non-finite step) are taken once, from one all-reduce per optimiser step.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vlp_cli import VlpError, faults, runstate
from vlp_cli.config import TrainCfg
from vlp_cli.console import progress
from vlp_cli.tasks import Stats, Step

logger = logging.getLogger(__name__)

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
                _, stats = task(batch)
            meter.add(stats)
    task.train(was_training)
    return meter.result(accelerator)


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class EpochBatches(Sampler[list[int]]):
    """This process's batches of one epoch, from a position inside it.

    The order is a permutation drawn from (seed, epoch) alone (the draws torch's RandomSampler
    makes under a DataLoader with a generator seeded `seed + epoch`), cut into full batches;
    process `rank` of `world` takes every `world`-th batch, as Accelerate's sharded loaders do.
    An epoch holds a whole number of accumulation windows, so a saved position (always at an
    optimiser step) is all a resumed run needs to continue the same sequence.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int,
                 grad_accum: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.per_rank = (n // batch_size) // world // grad_accum * grad_accum
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader's base-seed draw
        perm = torch.randperm(self.n, generator=g).tolist()
        bs = self.batch_size
        for i in range(self.start, self.per_rank):
            b = i * self.world + self.rank
            yield perm[b * bs: (b + 1) * bs]


class StopRequest:
    """SIGTERM / SIGINT set a flag that the loop reads once per optimiser step: the run saves
    its state and stops there. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: saving the training state after this step, then "
                       "stopping (Ctrl-C again to stop at once)", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class Interrupted(VlpError):
    """The run stopped on a signal after saving its state."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    collate: Callable,
    step_fn: Step,
    cfg: TrainCfg,
    out_dir: Path,
    *,
    seed: int,
    identity: dict,
    cfg_key: str,
    eval_dataset: Dataset | None = None,
    save_fn: Callable[[torch.nn.Module, int], None] | None = None,
    resume_from: runstate.SavedState | None = None,
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
        seed: seeds torch, numpy and the data order.
        identity: what this run is (stage, task, recipe, inputs), recorded in every state and
            checked by `--resume` (runstate.check_resumable).
        cfg_key: the recipe section of `cfg`, for messages (`pretrain.train`).
        eval_dataset: held-out items scored every `cfg.eval_every` steps.
        save_fn: (unwrapped model, step) -> None, called on the main process to write the
            checkpoint files at every save and at the end.
        resume_from: a checked state (runstate.check_resumable) to continue from.
        description: progress-bar label.
        accelerator: an existing Accelerator (tests, or a caller that already made one).
    """
    from accelerate.utils import send_to_device, set_seed

    accelerator = accelerator or make_accelerator(cfg)
    set_seed(seed)
    out_dir = Path(out_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    sampler = EpochBatches(len(dataset), cfg.batch_size, seed, rank, world, cfg.grad_accum)
    if sampler.per_rank == 0:
        per = f" per process ({world} processes)" if world > 1 else ""
        accum = f" x {cfg.grad_accum} accumulated" if cfg.grad_accum > 1 else ""
        raise VlpError(f"{description}: {len(dataset)} training examples give no full batch of "
                       f"{cfg.batch_size}{accum}{per}; lower {cfg_key}.batch_size")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The loader's own generator only seeds worker processes; without one, every new iterator
    # would draw from torch's global RNG, and a resumed run would see other dropout masks.
    loader_gen = torch.Generator()
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                        num_workers=cfg.num_workers, generator=loader_gen)
    eval_loader = None
    if eval_dataset is not None and len(eval_dataset) > 0:
        eval_loader = DataLoader(eval_dataset, batch_size=cfg.batch_size, shuffle=False,
                                 collate_fn=collate, num_workers=cfg.num_workers)
    optimizer = _optimizer(model, cfg)
    # The scheduler is stepped by hand once per optimiser step: accelerate's wrapper would step
    # it once per process, which shortens the schedule under data parallelism.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    task = TaskModule(model, step_fn)
    # The training loader is not prepared: EpochBatches shards it and knows its position.
    task, optimizer = accelerator.prepare(task, optimizer)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    metrics_path = out_dir / METRICS
    meter, last, held = _Meter(), {}, {}
    step, epoch, position = 0, 0, 0
    nonfinite = {"in_a_row": 0, "total": 0}
    if accelerator.is_main_process:
        runstate.clean_partial(out_dir)
    if resume_from is not None:
        step, epoch, position = _restore(resume_from, accelerator, task, optimizer, scheduler,
                                         meter, sampler, metrics_path)
        nonfinite = dict(resume_from.trainer.get("nonfinite", nonfinite))
        last, held = resume_from.trainer.get("last", {}), resume_from.trainer.get("held_out", {})
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
                    "step": step, "epoch": epoch, "position": position, "world_size": world,
                    "seed": seed, "scheduler": runstate.scheduler_state(scheduler),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
                    "nonfinite": nonfinite, "last": last, "held_out": held,
                    "metrics_bytes": metrics_path.stat().st_size if metrics_path.exists() else 0,
                    "identity": identity,
                }
                runstate.write_main_files(tmp, accelerator.unwrap_model(task).model, optimizer,
                                          trainer)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                runstate.finish_save(out_dir, tmp, step, cfg.keep_states)
        if accelerator.is_main_process and save_fn is not None:
            save_fn(accelerator.unwrap_model(task).model, step)
        accelerator.wait_for_everyone()

    start = last_save = time.time()
    task.train()
    with StopRequest() as stop, progress(disable=not accelerator.is_main_process) as bar:
        bar_task = bar.add_task(description, total=cfg.steps, completed=step)
        # Non-finite losses of this accumulation window (a tensor: no device sync per
        # micro-batch) and the statistics that wait to be added until the window is judged.
        window_bad = torch.zeros((), device=accelerator.device)
        window_stats: list[Stats] = []
        while step < cfg.steps:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            sampler.set_position(epoch, position)
            loader_gen.manual_seed(seed + epoch)
            faults.point("epoch:start")
            for batch in loader:
                batch = send_to_device(batch, accelerator.device)
                position += 1
                with accelerator.accumulate(task):
                    with accelerator.autocast():
                        loss, stats = task(batch)
                    window_bad = window_bad + (~torch.isfinite(loss.detach())).any().float()
                    window_stats.append(stats)
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
                                accelerator.clip_grad_norm_(task.parameters(), cfg.max_grad_norm)
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                window_bad = torch.zeros((), device=accelerator.device)
                window_stats = []
                scheduler.step()
                step += 1
                if skip:
                    nonfinite["in_a_row"] += 1
                    nonfinite["total"] += 1
                    _nonfinite(nonfinite, step, cfg, cfg_key, out_dir, accelerator,
                               metrics_path)
                else:
                    nonfinite["in_a_row"] = 0
                bar.update(bar_task, completed=step)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    last = meter.result(accelerator)
                    meter = _Meter()
                    if accelerator.is_main_process:
                        _append(metrics_path, {"step": step, "split": "train",
                                               "lr": scheduler.get_last_lr()[0], **last,
                                               "nonfinite_skipped": nonfinite["total"],
                                               "elapsed_s": round(time.time() - start, 1)})
                        if "loss" in last:
                            bar.update(bar_task,
                                       description=f"{description} loss {last['loss']:.3f}")
                if eval_loader is not None and (
                        (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                    held = evaluate_stats(task, eval_loader, accelerator, cfg.eval_batches)
                    if accelerator.is_main_process:
                        _append(metrics_path, {"step": step, "split": "val", **held})
                        logger.info("step %d held-out: %s", step,
                                    ", ".join(f"{k} {v:.4f}" for k, v in held.items()))
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
            else:
                faults.point("epoch:end")
                epoch, position = epoch + 1, 0
    save()
    return TrainResult(step=step, last=last, held_out=held, seconds=time.time() - start)


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


def _restore(state: runstate.SavedState, accelerator: Any, task: torch.nn.Module,
             optimizer: Any, scheduler: Any, meter: _Meter, sampler: EpochBatches,
             metrics_path: Path) -> tuple[int, int, int]:
    """Load a checked state into the prepared objects; returns (step, epoch, position)."""
    t = state.trainer
    model = accelerator.unwrap_model(task).model
    weights = state.tensors(runstate.WEIGHTS)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VlpError(f"--resume: {state.directory / runstate.WEIGHTS} does not fit this model "
                       f"(missing {result.missing_keys[:2]}, unexpected "
                       f"{result.unexpected_keys[:2]})")
    try:
        runstate.load_optimizer_state(optimizer, state.tensors(runstate.OPTIMIZER),
                                      t["optimizer"])
        scheduler.load_state_dict(dict(t["scheduler"]))
        if accelerator.scaler is not None and t.get("scaler"):
            accelerator.scaler.load_state_dict(t["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise VlpError(f"--resume: the optimizer state in {state.directory} does not fit this "
                       f"run ({str(exc).splitlines()[0][:120]})") from None
    step, epoch, position = int(t["step"]), int(t["epoch"]), int(t["position"])
    saved_world, world, rank = state.ranks(), accelerator.num_processes, accelerator.process_index
    if saved_world == world:
        rank_tensors = state.tensors(runstate.rank_name(rank, "safetensors"))
        runstate.set_rng_state({k: v for k, v in rank_tensors.items()
                                if not k.startswith("meter/")},
                               state.json(runstate.rank_name(rank, "json")))
        meter.load({k[6:]: v for k, v in rank_tensors.items() if k.startswith("meter/")},
                   accelerator.device)
    else:
        # Other shards of the data, other RNG streams: continue, but not identically.
        position = position * saved_world // world
        logger.warning("resuming a %d-process run on %d processes: the data order and RNG "
                       "streams change, so the result will differ from an uninterrupted run",
                       saved_world, world)
        from accelerate.utils import set_seed

        set_seed(int(t.get("seed", 0)) + step * 1000 + rank)
    if position >= sampler.per_rank:
        epoch, position = epoch + 1, 0
    if accelerator.is_main_process and metrics_path.exists():
        # Rows written after the save are replayed by this run: cut them, keep each step once.
        keep = int(t.get("metrics_bytes", 0))
        if metrics_path.stat().st_size > keep:
            with metrics_path.open("rb+") as f:
                f.truncate(keep)
    logger.info("resumed %s at step %d (epoch %d, batch %d)", state.directory.parent.parent,
                step, epoch, position)
    return step, epoch, position
