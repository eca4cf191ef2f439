"""Training state on disk, without pickle: what `--resume` needs to continue bit-exactly.

    out/state/step-00000120/
      weights.safetensors      the model's parameters and buffers
      optimizer.safetensors    optimizer tensors, keyed "<param index>/<name>"
      rank-00000.safetensors   one per process: torch RNG states, partial metric sums
      rank-00000.json          one per process: Python and numpy RNG states
      trainer.json             step, epoch, position in the epoch, optimizer groups, scheduler,
                               gradient scaler, the run's identity (stage, task, recipe, inputs)
      manifest.json            size and xxh3-128 of every file above, written last

A state is written complete into `state/.partial-step-N/` and switched in with one rename, so
a kill at any moment leaves whole states only: the old ones, or the old ones and the new one.
Accelerate's `save_state`/`load_state` are not used: they pickle RNG states and registered
objects and unpickle them with `weights_only=False`, so a planted file would run code.
Everything here is safetensors or JSON, checked against the manifest before it is parsed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlp_cli import VlpError, faults

logger = logging.getLogger(__name__)

STATE_DIR = "state"
MANIFEST = "manifest.json"
TRAINER = "trainer.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
FORMAT = "vlp.train-state"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_name(rank: int, ext: str) -> str:
    return f"rank-{rank:05d}.{ext}"


# ---------------------------------------------------------------------------------------------
# hashing and atomic files


def file_digest(path: Path) -> str:
    """xxh3-128 of a file, streamed (hundreds of MB for a base model's optimizer)."""
    import xxhash

    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file inside `path` durable (a no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        faults.point(f"inside:{path.name}")  # a kill with the file half written
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    write_bytes_durably(path, json.dumps(obj, indent=1).encode())


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, its I/O failures raised as the OSError they are (a full disk:
    ENOSPC, naming the file), so the CLI prints one line for them as for any other write."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:  # "... IoError(Os { code: 28, kind: StorageFull, ...
        code = re.search(r"os error (\d+)|code: (\d+)", str(exc))
        if code is None:
            raise
        n = int(code.group(1) or code.group(2))
        raise OSError(n, os.strerror(n), str(path)) from exc


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def write_manifest(directory: Path, files: list[str], extra: dict | None = None) -> None:
    """Sizes and hashes of `files` in `directory`, written last (its presence means complete)."""
    entries = {name: {"bytes": (directory / name).stat().st_size,
                      "xxh3_128": file_digest(directory / name)} for name in sorted(files)}
    write_json(directory / MANIFEST, {"format": "vlp.manifest", "files": entries,
                                      **(extra or {})})


def check_manifest(directory: Path, what: str) -> dict:
    """Every file the manifest lists is there with its size and hash; returns the manifest.

    Raises a one-line VlpError naming the first file that is missing or differs.
    """
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict)
    except FileNotFoundError:
        raise VlpError(f"{what}: {path} is missing, so its files cannot be checked") from None
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError):
        raise VlpError(f"{what}: {path} is damaged (not a vlp manifest)") from None
    for name, want in files.items():
        f = directory / name
        if "/" in name or name.startswith(".") or not f.is_file():
            raise VlpError(f"{what}: {f} is missing")
        if f.stat().st_size != want.get("bytes") or file_digest(f) != want.get("xxh3_128"):
            raise VlpError(f"{what}: {f} is damaged (its size or hash differs from "
                           f"{MANIFEST})")
    return manifest


# ---------------------------------------------------------------------------------------------
# RNG and optimizer state as tensors + JSON


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) holding every RNG a training step may draw from, for this process."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(tensors: dict[str, torch.Tensor], data: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("cuda/"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}/{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         data: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in data.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in data["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def scheduler_state(scheduler: Any) -> dict:
    sd = dict(scheduler.state_dict())
    # LambdaLR keeps its lambdas' __dict__ only for callable objects; ours are closures.
    sd["lr_lambdas"] = [None] * len(sd.get("lr_lambdas", []))
    return sd


# ---------------------------------------------------------------------------------------------
# writing and finding states


def state_root(out: Path) -> Path:
    return Path(out) / STATE_DIR


def clean_partial(out: Path) -> None:
    """Remove what a killed save left behind (never a complete state)."""
    root = state_root(out)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".partial-"):
                shutil.rmtree(p, ignore_errors=True)


def complete_states(out: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete state, newest first."""
    root = state_root(out)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def legacy_state(out: Path) -> bool:
    """A state written by vlp 0.1's Accelerate `save_state` (pickles: never read)."""
    root = state_root(out)
    return root.is_dir() and any(p.suffix in (".pkl", ".bin") or p.name == "progress.json"
                                 for p in root.iterdir())


def partial_dir(out: Path, step: int) -> Path:
    return state_root(out) / f".partial-{step_dir_name(step)}"


def begin_save(out: Path, step: int) -> Path:
    """The empty folder a state is written into (main process only)."""
    tmp = partial_dir(out, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_files(tmp: Path, rank: int, meter: dict[str, torch.Tensor]) -> None:
    tensors, data = rng_state()
    tensors.update({f"meter/{k}": v for k, v in meter.items()})
    save_tensors(tmp / rank_name(rank, "safetensors"), tensors)
    faults.point("save:rank")
    write_json(tmp / rank_name(rank, "json"), data)


def write_main_files(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     trainer: dict) -> None:
    faults.point("save:before")
    save_tensors(tmp / WEIGHTS, model.state_dict())
    faults.point("save:weights")
    tensors, data = optimizer_state(optimizer)
    save_tensors(tmp / OPTIMIZER, tensors)
    faults.point("save:optimizer")
    write_json(tmp / TRAINER, {"format": FORMAT, "format_version": FORMAT_VERSION,
                               **trainer, "optimizer": data})
    faults.point("save:trainer")


def finish_save(out: Path, tmp: Path, step: int, keep: int) -> Path:
    """Manifest, then one rename: the state exists complete or not at all. Prunes old ones."""
    files = [p.name for p in tmp.iterdir() if p.is_file()]
    write_manifest(tmp, files)
    faults.point("save:manifest")
    final = state_root(out) / step_dir_name(step)
    if final.exists():  # the same step saved again (a resumed run that saved nothing new)
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(final.parent)
    faults.point("save:renamed")
    for _, old in complete_states(out)[max(keep, 1):]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# reading states


@dataclass
class SavedState:
    directory: Path
    trainer: dict

    @property
    def step(self) -> int:
        return int(self.trainer["step"])

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.directory / name
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise VlpError(f"--resume: {path} cannot be read as safetensors "
                           f"({str(exc).splitlines()[0][:120]})") from None

    def json(self, name: str) -> dict:
        path = self.directory / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            assert isinstance(data, dict)
            return data
        except (ValueError, AssertionError, UnicodeDecodeError, OSError):
            raise VlpError(f"--resume: {path} is not valid JSON state") from None

    def ranks(self) -> int:
        return int(self.trainer.get("world_size", 1))


def latest_state(out: Path) -> SavedState | None:
    """The newest complete state, checked against its manifest; None if there is none.

    A damaged newest state is refused (not skipped): the user decides whether to fall back.
    """
    states = complete_states(out)
    if not states:
        return None
    step, directory = states[0]
    what = f"--resume: training state {directory}"
    try:
        check_manifest(directory, what)
    except VlpError as exc:
        older = f"; an older state is {states[1][1]} (delete {directory.name} to resume from it)" \
            if len(states) > 1 else ""
        raise VlpError(f"{exc}{older}") from None
    state = SavedState(directory, {})
    trainer = state.json(TRAINER)
    if trainer.get("format") != FORMAT or trainer.get("format_version") != FORMAT_VERSION:
        raise VlpError(f"{what}: {TRAINER} is not a vlp training state of format "
                       f"{FORMAT_VERSION}")
    state.trainer = trainer
    return state


def identity_differences(saved: dict, now: dict) -> list[str]:
    """What differs between the identity a run was started with and this one's."""

    def flat(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
        if isinstance(d, dict):
            for k, v in d.items():
                yield from flat(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            yield prefix, d

    a, b = dict(flat(saved)), dict(flat(now))
    return [f"{k}: {a.get(k)!r} in the saved run, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def run_name(identity: dict) -> str:
    """'a pre-training run (OBJECTIVES)', 'a fine-tuning run for TASK' (for messages)."""
    if identity.get("stage") == "pretrain":
        return f"a pre-training run ({identity.get('task')})"
    return f"a fine-tuning run for {identity.get('task')}"


def check_resumable(out: Path, identity: dict, auto: bool = False) -> SavedState | None:
    """The state `--resume` continues from, after checking it belongs to this run.

    Returns None when `auto` is set and there is no state (start from the beginning).
    """
    out = Path(out)
    if legacy_state(out) and not complete_states(out):
        raise VlpError(f"{state_root(out)} was written by an older vlp with pickled Accelerate "
                       "state, which vlp no longer reads (it could run code): start a new --out")
    state = latest_state(out)
    if state is None:
        if auto:
            return None
        raise VlpError(f"--resume: {out} holds no saved training state; run without --resume "
                       "(or with --auto-resume, which starts when there is none)")
    saved = state.trainer.get("identity", {})
    if saved.get("layout") != identity.get("layout"):
        raise VlpError(f"--resume: {out} was started by vlp 0.2 or older, whose training state "
                       "(head and recipe names) this vlp cannot continue: finish it with that "
                       "version, or start again into a new --out")
    if (saved.get("stage"), saved.get("task")) != (identity.get("stage"), identity.get("task")):
        raise VlpError(f"--resume: {out} holds {run_name(saved)}, not {run_name(identity)}: "
                       "nothing was changed; choose another --out")
    diffs = identity_differences(saved, identity)
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise VlpError(f"--resume: {out} was started with other settings or inputs: "
                       f"{diffs[0]}{more}; resume with the same ones, or choose a new --out")
    return state


def describe_state(directory: Path) -> dict:
    """A saved training state, for `vlp inspect` (files are not hashed: `vlp verify` does)."""
    state = SavedState(Path(directory), {})
    t = state.json(TRAINER)
    ident = t.get("identity", {})
    return {"kind": "training state", "path": str(directory), "run": run_name(ident),
            "step": t.get("step"), "epoch": t.get("epoch"), "batch_in_epoch": t.get("position"),
            "processes": t.get("world_size"), "nonfinite_skipped": (t.get("nonfinite") or {})
            .get("total"), "last_train": t.get("last"), "inputs": ident.get("inputs")}


def list_states(out: Path) -> list[dict]:
    """The complete states of a run folder, newest first (for `vlp inspect CKPT`)."""
    return [{"step": step, "path": str(p)} for step, p in complete_states(out)]


def restore(state: SavedState, accelerator: Any, task: torch.nn.Module, optimizer: Any,
            scheduler: Any, meter: Any, streams: list, metrics_path: Path) -> int:
    """Load a checked state into the prepared objects of a run (training.py: its TaskModule,
    optimizer, scheduler, metric sums) and its data streams; returns the step."""
    t = state.trainer
    model = accelerator.unwrap_model(task).model
    weights = state.tensors(WEIGHTS)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VlpError(f"--resume: {state.directory / WEIGHTS} does not fit this model "
                       f"(missing {result.missing_keys[:2]}, unexpected "
                       f"{result.unexpected_keys[:2]})")
    try:
        load_optimizer_state(optimizer, state.tensors(OPTIMIZER),
                                      t["optimizer"])
        scheduler.load_state_dict(dict(t["scheduler"]))
        if accelerator.scaler is not None and t.get("scaler"):
            accelerator.scaler.load_state_dict(t["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise VlpError(f"--resume: the optimizer state in {state.directory} does not fit this "
                       f"run ({str(exc).splitlines()[0][:120]})") from None
    step = int(t["step"])
    positions = [tuple(p) for p in t.get("streams", [[t["epoch"], t["position"]]])]
    if len(positions) != len(streams):
        raise VlpError(f"--resume: {state.directory} was saved by a run of {len(positions)} "
                       f"tasks, this one has {len(streams)}")
    saved_world, world, rank = state.ranks(), accelerator.num_processes, accelerator.process_index
    if saved_world == world:
        rank_tensors = state.tensors(rank_name(rank, "safetensors"))
        set_rng_state({k: v for k, v in rank_tensors.items()
                                if not k.startswith("meter/")},
                               state.json(rank_name(rank, "json")))
        meter.load({k[6:]: v for k, v in rank_tensors.items() if k.startswith("meter/")},
                   accelerator.device)
    else:
        # Other shards of the data, other RNG streams: continue, but not identically.
        positions = [(e, p * saved_world // world) for e, p in positions]
        logger.warning("resuming a %d-process run on %d processes: the data order and RNG "
                       "streams change, so the result will differ from an uninterrupted run",
                       saved_world, world)
        from accelerate.utils import set_seed

        set_seed(int(t.get("seed", 0)) + step * 1000 + rank)
    for stream, (epoch, position) in zip(streams, positions):
        stream.restore(int(epoch), int(position))
    if accelerator.is_main_process and metrics_path.exists():
        # Rows written after the save are replayed by this run: cut them, keep each step once.
        keep = int(t.get("metrics_bytes", 0))
        if metrics_path.stat().st_size > keep:
            with metrics_path.open("rb+") as f:
                f.truncate(keep)
    logger.info("resumed %s at step %d (epoch %d, batch %d)", state.directory.parent.parent,
                step, streams[0].epoch, streams[0].position)
    return step
