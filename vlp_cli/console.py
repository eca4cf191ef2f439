"""The one place that talks to rich: logging, progress bars and tables, on the main process only."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)
out = Console()  # results (tables) go to stdout, logs and bars to stderr


def is_main_process() -> bool:
    """True on the process that should log and draw bars (rank 0 under accelerate/torchrun)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class _StderrHandler(logging.StreamHandler):
    """Plain log lines to whatever sys.stderr is now (a file, a pipe, a test's capture)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Route library logging through rich on a terminal, as plain timestamped lines otherwise
    (a log file keeps one line per message, unwrapped); quiet the chatty third-party loggers."""
    level = logging.DEBUG if verbose else logging.INFO
    if not is_main_process():
        level = logging.WARNING
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False,
                                               rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s",
                                               datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in ("transformers", "accelerate", "urllib3", "filelock", "PIL"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class LogProgress(Progress):
    """rich's Progress API, drawn as a plain log line every `every` seconds and when a task
    ends: for logs and pipes, where a bar renders nothing until the run is over.

    Each line: the task's description (callers put live figures there, e.g. the training
    loop's loss), completed/total, the rate per second since the task started, the time left,
    and any fields the caller set (`add_task(..., loss=2.1)` or `update(task, loss=2.1)`).
    """

    def __init__(self, every: float, disable: bool = False) -> None:
        super().__init__(console=console, disable=True)
        self.every = every
        self.quiet = disable
        self._origin: dict[TaskID, tuple[float, float]] = {}  # task -> (time, completed)
        self._said: dict[TaskID, tuple[float, str]] = {}  # task -> (time, line) last said

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0,
                 completed: int = 0, visible: bool = True, **fields: Any) -> TaskID:
        task = super().add_task(description, start=start, total=total, completed=completed,
                                visible=visible, **fields)
        now = self.get_time()
        self._origin[task] = (now, float(completed))
        self._said[task] = (now, "")
        return task

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        if kwargs.get("completed") is not None or kwargs.get("advance") is not None:
            self._maybe_say(task_id)  # a new description alone shows in the next line

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_say(task_id)

    def stop(self) -> None:
        # The last line of each task, with what the caller set after the last count (the
        # training loop writes the final loss into the description after the final step).
        for task in self.tasks:
            if self._said[task.id][1] != self._state(task.id):
                self._say(task.id)
        super().stop()

    def _state(self, task_id: TaskID) -> str:
        task = self._tasks[task_id]
        return f"{task.description}|{task.completed}|{task.fields}"

    def _maybe_say(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if task.finished:
            return  # said once, by stop()
        if self.get_time() - self._said[task_id][0] >= self.every:
            self._say(task_id)

    def line(self, task_id: TaskID) -> str:
        """The log line for a task, as it stands."""
        task = self._tasks[task_id]
        now = self.get_time()
        t0, c0 = self._origin[task_id]
        elapsed = max(now - t0, 1e-9)
        rate = (task.completed - c0) / elapsed
        if task.total:
            count = f"{task.completed:g}/{task.total:g} ({100 * task.completed / task.total:.0f}%)"
        else:
            count = f"{task.completed:g} done"
        parts = [f"{task.description}: {count}",
                 f"{rate:,.0f}/s" if rate >= 100 else f"{rate:.3g}/s"]
        if task.total and task.completed >= task.total:
            parts.append(f"took {_duration(elapsed)}")
        elif task.total and rate > 0:
            parts.append(f"{_duration((task.total - task.completed) / rate)} left")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in task.fields.items()]
        return ", ".join(parts)

    def _say(self, task_id: TaskID) -> None:
        self._said[task_id] = (self.get_time(), self._state(task_id))
        if not self.quiet:
            logging.getLogger("vlp_cli.progress").info(self.line(task_id))


def progress_every() -> float:
    """Seconds between progress lines off a terminal (VLP_PROGRESS_EVERY, default 30)."""
    raw = os.environ.get("VLP_PROGRESS_EVERY", "30")
    try:
        return max(float(raw), 0.0)
    except ValueError:
        return 30.0


def progress(total: int | None = None, description: str = "", disable: bool = False) -> Progress:
    """A progress bar on a terminal, a log line every VLP_PROGRESS_EVERY seconds (default 30)
    and at the end otherwise; silent on every process but the main one."""
    disable = disable or not is_main_process()
    if not console.is_terminal:
        return LogProgress(progress_every(), disable=disable)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


def track(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a progress bar (main process only; log lines off a terminal)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress() as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
